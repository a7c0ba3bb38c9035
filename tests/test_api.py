"""The HTTP surface on a real app, real SQLite log and an engine URL where nothing answers:
every error path must be a clean JSON 4xx/503 and every attempted run must be logged."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from runtime.app import create_app
from runtime.config import Settings
from runtime.engine import ExternalEngine, free_port

ADMIN = "admin-token-123"
ALICE = "alice-token-123"
BOB = "bob-token-4567"


def _client(settings: Settings) -> TestClient:
    engine = ExternalEngine(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    return TestClient(create_app(settings, engine=engine))


@pytest.fixture
def client(settings: Settings):
    with _client(settings) as c:
        yield c


@pytest.fixture
def authed(settings: Settings):
    s = settings.replace(api_tokens={"alice": ALICE, "bob": BOB}, admin_token=ADMIN)
    with _client(s) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_healthz_reports_engine_down_with_retry_after(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["engine"] in ("starting", "down")


def test_run_while_engine_down_is_503_and_still_logged(client: TestClient) -> None:
    r = client.post("/v1/runs", json={"input": "What is 2+2?", "metadata": {"task_id": "t9"}})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    err = r.json()["error"]
    assert err["type"] == "engine_unavailable"
    t = client.get(f"/v1/trajectories/{err['trajectory_id']}").json()
    assert t["status"] == "engine_error" and t["task_id"] == "t9" and t["request"]["input"] == "What is 2+2?"


def test_chat_completions_engine_down_is_503(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "hone", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503


@pytest.mark.parametrize("body, fragment", [
    ({}, "exactly one of"),
    ({"input": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
    ({"input": "a", "thread_id": "../etc"}, "thread_id"),
    ({"input": "a", "temperature": 9}, "temperature"),
    ({"input": "a", "surprise": 1}, "surprise"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": []}, "no messages"),
    ({"input": 5}, "input"),
    ({"input": "a", "namespace": "../bob"}, "namespace"),
    ({"input": "a", "source": "exploration"}, "source"),
])
def test_invalid_run_bodies_are_422_with_a_message(client: TestClient, body: dict, fragment: str) -> None:
    r = client.post("/v1/runs", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_oversized_body_is_413(settings: Settings) -> None:
    with _client(settings.replace(max_body_bytes=2000)) as c:
        r = c.post("/v1/runs", json={"input": "x" * 5000})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit must hold for streamed bodies too
            yield b'{"input": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = c.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_unknown_ids_are_404(client: TestClient) -> None:
    assert client.get("/v1/trajectories/t_nope").status_code == 404
    r = client.post("/v1/trajectories/t_nope/feedback", json={"score": "success"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.get("/v1/nothing-here").status_code == 404


def test_feedback_round_trip_and_validation(client: TestClient) -> None:
    tid = client.post("/v1/runs", json={"input": "hi"}).json()["error"]["trajectory_id"]
    assert client.post(f"/v1/trajectories/{tid}/feedback", json={"score": 1.5}).status_code == 422
    assert client.post(f"/v1/trajectories/{tid}/feedback", json={"score": "great"}).status_code == 422
    r = client.post(f"/v1/trajectories/{tid}/feedback", json={"score": "failure", "comment": "wrong"})
    assert r.status_code == 200, r.text
    fb = client.get(f"/v1/trajectories/{tid}").json()["feedback"]
    assert [(f["score"], f["comment"]) for f in fb] == [(0.0, "wrong")]


def test_list_filters_and_cursor_paging(client: TestClient) -> None:
    ids = [client.post("/v1/runs", json={"input": f"q{i}"}).json()["error"]["trajectory_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "status": "engine_error"} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/trajectories", params=params).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    assert client.get("/v1/trajectories", params={"status": "ok"}).json()["data"] == []
    assert client.get("/v1/trajectories", params={"cursor": "garbage!"}).status_code == 422
    assert client.get("/v1/trajectories", params={"since": "yesterday"}).status_code == 422
    assert client.get("/v1/trajectories", params={"limit": 0}).status_code == 422


def test_auth(authed: TestClient) -> None:
    assert authed.post("/v1/runs", json={"input": "hi"}).status_code == 401
    r = authed.post("/v1/runs", json={"input": "hi"}, headers=bearer("wrong-token-xx"))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = authed.post("/v1/runs", json={"input": "hi"}, headers=bearer(ALICE))
    assert r.status_code == 503  # authenticated; the engine is what is missing
    tid = r.json()["error"]["trajectory_id"]
    # inspection is admin-only; a caller sees only its own runs
    assert authed.get("/v1/trajectories", headers=bearer(ALICE)).status_code == 403
    assert authed.get("/v1/trajectories", headers=bearer(ADMIN)).status_code == 200
    assert authed.get(f"/v1/trajectories/{tid}", headers=bearer(ALICE)).json()["caller"] == "alice"
    assert authed.get(f"/v1/trajectories/{tid}", headers=bearer(BOB)).status_code == 404
    assert authed.post(f"/v1/trajectories/{tid}/feedback", json={"score": 1}, headers=bearer(BOB)).status_code == 404
    assert authed.post(f"/v1/trajectories/{tid}/feedback", json={"score": 1}, headers=bearer(ALICE)).status_code == 200
    # forcing an adapter is an admin power
    r = authed.post("/v1/runs", json={"input": "hi", "adapter": "base"}, headers=bearer(ALICE))
    assert r.status_code == 403


def test_adapters_endpoint(client: TestClient) -> None:
    r = client.get("/v1/adapters")
    assert r.status_code == 200
    assert r.json()["base"] == "hone-base" and r.json()["active"] is None


def test_odd_bytes_and_unstorable_json_are_4xx_not_500(authed: TestClient, client: TestClient) -> None:
    r = authed.post("/v1/runs", json={"input": "hi"}, headers={"Authorization": "Bearer t\xf6k\xe9n-123".encode("latin-1")})
    assert r.status_code == 401
    r = client.post("/v1/runs", content=b'{"input": "hi", "metadata": {"x": NaN}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "storable" in r.json()["error"]["message"]
    r = client.post("/v1/runs", content=b'{"input": "\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422
    bad_call = {"role": "assistant", "content": "", "tool_calls": [{"id": 5, "function": {"name": "x", "arguments": "[1]"}}]}
    r = client.post("/v1/runs", json={"messages": [{"role": "user", "content": "q"}, bad_call]})
    assert r.status_code == 422 and "messages[1]" in r.json()["error"]["message"]
    # nothing half-written: none of these reached the log
    assert client.get("/v1/trajectories").json()["data"] == []
