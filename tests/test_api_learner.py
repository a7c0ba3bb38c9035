"""The learner's HTTP routes on a real app and real SQLite log. The engine is an ExternalEngine on a
port where nothing listens (as in test_api.py), except for one rollback that needs vLLM to load an
adapter: there a fake engine answers health and LoRA calls."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from learner.registry import Registry
from runtime.app import create_app
from runtime.config import Settings
from runtime.engine import ExternalEngine, free_port

ADMIN = "admin-token-123"
ALICE = "alice-token-123"


def _client(settings: Settings, engine: ExternalEngine | None = None) -> TestClient:
    engine = engine or ExternalEngine(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    # learner_enabled=False: these routes only touch the registry; no learner child process
    return TestClient(create_app(settings.replace(learner_enabled=False), engine=engine))


@pytest.fixture
def client(settings: Settings):
    with _client(settings) as c:
        yield c


@pytest.fixture
def authed(settings: Settings):
    with _client(settings.replace(api_tokens={"alice": ALICE}, admin_token=ADMIN)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def registry(c: TestClient) -> Registry:
    return c.app.state.hone.registry


def add_adapter(c: TestClient, settings: Settings, version: str) -> Path:
    path = settings.adapters_dir / version
    registry(c).add_adapter(version, path, parent=None, cycle_id=None, train={"counts": {"pairs": 4}})
    return path


# ---------------------------------------------------------------- cycles


def test_list_cycles_empty_then_after_a_request(client: TestClient) -> None:
    r = client.get("/v1/learner/cycles")
    assert r.status_code == 200
    assert r.json() == {"cycles": [], "learner": {"enabled": False, "pid": None, "restarts": 0, "last_exit": None}}

    r = client.post("/v1/learner/cycles")
    assert r.status_code == 202
    body = r.json()
    cycle = body["cycle"]
    assert (cycle["state"], cycle["trigger"], cycle["requested_by"]) == ("requested", "manual", "local")
    assert "learner_enabled=false" in body["note"]

    listed = client.get("/v1/learner/cycles").json()["cycles"]
    assert [c["id"] for c in listed] == [cycle["id"]] and listed[0]["state"] == "requested"
    assert client.get(f"/v1/learner/cycles/{cycle['id']}").json() == cycle


def test_trigger_is_idempotent_while_queued(client: TestClient) -> None:
    first = client.post("/v1/learner/cycles").json()["cycle"]
    second = client.post("/v1/learner/cycles")
    assert second.status_code == 202 and second.json()["cycle"]["id"] == first["id"]
    assert len(client.get("/v1/learner/cycles").json()["cycles"]) == 1
    # once it runs, a new trigger queues another
    registry(client).start_cycle("manual", cycle_id=first["id"])
    third = client.post("/v1/learner/cycles").json()["cycle"]
    assert third["id"] != first["id"]
    assert [c["state"] for c in client.get("/v1/learner/cycles").json()["cycles"]] == ["requested", "running"]


def test_cycle_fields_come_back_decoded(client: TestClient) -> None:
    reg = registry(client)
    cid = reg.start_cycle("count")
    reg.finish_cycle(cid, "skipped", counts={"pairs": 1, "excluded": {"drift": 2}}, timings={"label": 0.1},
                     error="1 preference pairs, fewer than min_pairs=2")
    c = client.get(f"/v1/learner/cycles/{cid}").json()
    assert c["counts"] == {"pairs": 1, "excluded": {"drift": 2}} and c["timings"] == {"label": 0.1}
    assert c["state"] == "skipped" and c["error"].startswith("1 preference pairs")
    assert [x["id"] for x in client.get("/v1/learner/cycles", params={"state": "skipped"}).json()["cycles"]] == [cid]
    assert client.get("/v1/learner/cycles", params={"state": "failed"}).json()["cycles"] == []


def test_unknown_cycle_is_a_json_404(client: TestClient) -> None:
    r = client.get("/v1/learner/cycles/999")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "no cycle 999", "type": "not_found", "code": 404}}
    assert client.get("/v1/learner/cycles/abc").status_code == 422


@pytest.mark.parametrize("params", [{"state": "bogus"}, {"limit": 0}, {"limit": 1001}])
def test_invalid_list_parameters_are_422(client: TestClient, params: dict) -> None:
    r = client.get("/v1/learner/cycles", params=params)
    assert r.status_code == 422
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_invalid_state_message_lists_the_states(client: TestClient) -> None:
    msg = client.get("/v1/learner/cycles", params={"state": "bogus"}).json()["error"]["message"]
    assert msg == "state must be one of requested, running, promoted, rejected, skipped, failed"


def test_auth_on_cycles(authed: TestClient) -> None:
    assert authed.get("/v1/learner/cycles").status_code == 401
    assert authed.post("/v1/learner/cycles").status_code == 401
    r = authed.post("/v1/learner/cycles", headers=bearer(ALICE))
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert authed.get("/v1/learner/cycles", headers=bearer(ADMIN)).json()["cycles"] == []  # nothing was queued
    r = authed.post("/v1/learner/cycles", headers=bearer(ADMIN))
    assert r.status_code == 202 and r.json()["cycle"]["requested_by"] == "admin"
    # reading is open to any authenticated caller
    assert authed.get("/v1/learner/cycles", headers=bearer(ALICE)).status_code == 200
    cid = r.json()["cycle"]["id"]
    assert authed.get(f"/v1/learner/cycles/{cid}").status_code == 401
    assert authed.get(f"/v1/learner/cycles/{cid}", headers=bearer(ALICE)).status_code == 200


# ---------------------------------------------------------------- adapters


def test_adapters_lists_the_registry_and_active(client: TestClient, settings: Settings) -> None:
    r = client.get("/v1/adapters").json()
    assert (r["base"], r["active"], r["active_path"], r["engine_models"], r["adapters"]) == \
        ("hone-base", None, None, None, [])
    p1 = add_adapter(client, settings, "hone-v1")
    add_adapter(client, settings, "hone-v2")
    registry(client).promote("hone-v1")
    r = client.get("/v1/adapters").json()
    assert (r["active"], r["active_path"]) == ("hone-v1", str(p1))
    assert [(a["version"], a["status"]) for a in r["adapters"]] == [("hone-v2", "candidate"), ("hone-v1", "promoted")]
    assert r["adapters"][1]["train"] == {"counts": {"pairs": 4}}
    assert [a["version"] for a in client.get("/v1/adapters", params={"limit": 1}).json()["adapters"]] == ["hone-v2"]


def test_rollback_with_nothing_to_roll_back_is_409_even_with_the_engine_down(client: TestClient) -> None:
    assert not client.app.state.hone.engine.ready.is_set()
    r = client.post("/v1/adapters/rollback")
    assert r.status_code == 409
    assert r.json()["error"]["type"] == "conflict" and "base model is serving" in r.json()["error"]["message"]


def test_rollback_to_an_adapter_needs_the_engine(client: TestClient, settings: Settings) -> None:
    add_adapter(client, settings, "hone-v1")
    add_adapter(client, settings, "hone-v2")
    registry(client).promote("hone-v1")
    registry(client).promote("hone-v2")
    r = client.post("/v1/adapters/rollback")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "engine_unavailable"
    assert client.get("/v1/adapters").json()["active"] == "hone-v2"  # nothing switched


def test_rollback_to_the_base_model_works_with_the_engine_down(client: TestClient, settings: Settings) -> None:
    add_adapter(client, settings, "hone-v1")
    registry(client).promote("hone-v1")
    r = client.post("/v1/adapters/rollback")
    assert r.status_code == 200, r.text
    assert r.json() == {"from": "hone-v1", "to": None, "verify": None}
    assert client.app.state.hone.store.get_active_adapter() == (None, None)
    assert registry(client).get_adapter("hone-v1")["reason"] == "rolled back by local"


def test_rollback_is_admin_only(authed: TestClient, settings: Settings) -> None:
    assert authed.post("/v1/adapters/rollback").status_code == 401
    r = authed.post("/v1/adapters/rollback", headers=bearer(ALICE))
    assert r.status_code == 403
    assert authed.post("/v1/adapters/rollback", headers=bearer(ADMIN)).status_code == 409


class FakeVllm(ExternalEngine):
    """Stands in for a vLLM server: healthy, loads and lists LoRA adapters (no model behind it)."""

    def __init__(self) -> None:
        super().__init__(f"http://127.0.0.1:{free_port()}")
        self.loaded: list[tuple[str, str]] = []

    async def healthy(self) -> bool:
        return True

    async def served_models(self) -> list[str]:
        return ["hone-base", *[n for n, _ in self.loaded]]

    async def load_adapter(self, name: str, path) -> None:
        self.loaded.append((name, str(path)))


def test_rollback_to_a_previous_adapter_loads_it_first(settings: Settings) -> None:
    engine = FakeVllm()
    with _client(settings, engine) as c:
        deadline = time.monotonic() + 10
        while not engine.ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.ready.is_set()
        p1 = add_adapter(c, settings, "hone-v1")
        add_adapter(c, settings, "hone-v2")
        registry(c).promote("hone-v1")
        registry(c).promote("hone-v2")
        r = c.post("/v1/adapters/rollback")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from"], body["to"]) == ("hone-v2", "hone-v1")
        # the adapter has no hone-adapter.json probe: served, but the response says it is unverified
        assert body["verify"]["ok"] is None and "no usable probe" in body["verify"]["error"]
        assert engine.loaded == [("hone-v1", str(p1))]
        assert c.app.state.hone.store.get_active_adapter() == ("hone-v1", str(p1))
        assert c.get("/v1/adapters").json()["engine_models"] == ["hone-base", "hone-v1"]
