"""`hone eval`'s client logic and records: task files (both shapes), the numbers, what each turn
sends, and how failures end an eval. The server side here is an httpx MockTransport that plays
/v1/runs by rule; tests/test_eval_integration.py runs the same code against a real `hone serve`."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from learner.tasks import Task, TaskFileError, Turn, load_task_file
from runtime import evals
from runtime.cli import main
from runtime.config import Settings
from runtime.evals import EvalAborted, EvalOptions, EvalStore, TaskResult, run_eval, summarize, wilson

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- task files
def test_multi_turn_tasks_parse_with_their_turns_and_type(tmp_path: Path) -> None:
    p = write(tmp_path / "t.jsonl",
              '{"id": "s1", "type": "storage", "check": "contains", "answer": "blue-7",'
              ' "turns": [{"content": "Save code blue-7 under key c."}, {"content": "What is key c?", "new_thread": true}]}',
              '{"id": 7, "question": "6*7?", "answer": 42, "source": "mawps"}')
    multi, single = load_task_file(p)
    assert multi == Task("file:s1", (), "blue-7", "contains",
                         turns=(Turn("Save code blue-7 under key c.", False), Turn("What is key c?", True)))
    assert multi.group == "storage" and multi.id == "s1"
    assert single.messages == ({"role": "user", "content": "6*7?"},) and single.group == "mawps" and single.id == "7"


@pytest.mark.parametrize("line, fragment", [
    ('{"id": "a", "answer": 1}', "missing question"),
    ('{"id": "a", "turns": [], "answer": 1}', "turns must be a non-empty list"),
    ('{"id": "a", "turns": [{"content": ""}], "answer": 1}', "turns[0] must be an object with non-empty content"),
    ('{"id": "a", "turns": ["hi"], "answer": 1}', "turns[0] must be an object"),
    ('{"id": "a", "turns": [{"content": "x", "new_thread": "yes"}], "answer": 1}', "turns[0].new_thread"),
    ('{"id": "a", "turns": [{"content": "x", "role": "user"}], "answer": 1}', "unknown field(s) role"),
    ('{"id": "a", "turns": [{"content": "x"}], "question": "q", "answer": 1}', "not both"),
    ('{"id": "a", "turns": [{"content": "x"}], "answer": 1, "check": "fuzzy"}', "check must be one of"),
    ('{"id": "a", "turns": [{"content": "x"}], "answer": 1, "type": 3}', "type must be a string"),
    ('{"id": null, "question": "q", "answer": 1}', "id must be"),
])
def test_bad_multi_turn_lines_name_the_line(tmp_path: Path, line: str, fragment: str) -> None:
    p = write(tmp_path / "t.jsonl", '{"id": "ok", "question": "q", "answer": 1}', line)
    with pytest.raises(TaskFileError) as e:
        load_task_file(p)
    assert f"{p}:2: " in str(e.value) and fragment in str(e.value)


def test_an_empty_task_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="no tasks"):
        load_task_file(write(tmp_path / "empty.jsonl", "", "  "))


@pytest.mark.parametrize("name", ["storage", "python", "mixed", "asdiv-a-sample", "gsm8k-sample"])
def test_shipped_suites_load_and_are_big_enough(name: str) -> None:
    tasks = load_task_file(REPO / "tasks" / f"{name}.jsonl")
    assert len(tasks) >= 30
    if name in ("storage", "mixed"):
        assert all(len(t.turns) >= 2 and any(turn.new_thread for turn in t.turns[1:]) for t in tasks)


# ---------------------------------------------------------------- numbers
def test_wilson_interval_matches_the_formula_at_the_edges_and_middle() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson(30, 30)
    assert lo == pytest.approx(0.8865, abs=1e-4) and hi == 1.0


def test_mcnemar_p_is_the_exact_two_sided_binomial_test() -> None:
    assert evals.mcnemar_p(0, 0) == 1.0
    assert evals.mcnemar_p(3, 3) == 1.0
    assert evals.mcnemar_p(5, 0) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert evals.mcnemar_p(0, 5) == evals.mcnemar_p(5, 0)
    assert evals.mcnemar_p(11, 5) == pytest.approx(2 * sum(math.comb(16, i) for i in range(6)) / 2 ** 16)
    assert evals.mcnemar_p(11, 5) == pytest.approx(0.2101, abs=1e-4)
    assert evals.paired({str(i): False for i in range(27)}, {str(i): i < 24 for i in range(27)})["p_value"] > 0


def test_paired_counts_fixed_and_broken_on_common_tasks_only() -> None:
    before = {"a": True, "b": False, "c": False, "d": True, "only-before": True}
    after = {"a": True, "b": True, "c": True, "d": False, "only-after": False}
    d = evals.paired(before, after)
    assert (d["n"], d["before_success"], d["after_success"]) == (4, 2, 3)
    assert (d["fixed_tasks"], d["broken_tasks"]) == (["b", "c"], ["d"])
    assert d["p_value"] == 1.0


def test_summary_breaks_down_by_type_and_counts_unparsable_calls_as_invalid() -> None:
    results = [
        TaskResult("a", "storage", True, "ok", steps=3, tool_calls=2, latency_ms=100, adapter="hone-v1"),
        TaskResult("b", "storage", False, "tool_error", steps=2, tool_calls=1, tool_errors=1, latency_ms=300),
        TaskResult("c", "python", False, "parse_error", steps=1, latency_ms=200),
        TaskResult("d", "python", False, "error", error="engine_rejected: too long"),
    ]
    s = summarize(results)
    assert (s["n"], s["success"], s["rate"]) == (4, 1, 0.25)
    assert s["by_type"]["storage"]["rate"] == 0.5 and s["by_type"]["python"]["success"] == 0
    assert s["mean_steps"] == 1.5
    assert (s["tool_calls"], s["tool_errors"], s["parse_errors"]) == (3, 1, 1)
    assert s["tool_call_validity"] == 0.5  # 2 accepted of 3 made + 1 that did not parse
    assert s["latency_ms"]["p50"] == 200 and s["request_errors"] == 1
    assert s["served"] == {"hone-v1": 1, "base": 2}


# ---------------------------------------------------------------- runs over HTTP
class FakeServer:
    """Plays POST /v1/runs: answers with `reply(body)`; records every body it got."""

    def __init__(self, reply) -> None:
        self.bodies: list[dict] = []
        self.reply = reply

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/runs"
        body = json.loads(request.content)
        self.bodies.append(body)
        out = self.reply(body)
        if isinstance(out, httpx.Response):
            return out
        n = len(self.bodies)
        return httpx.Response(200, json={"trajectory_id": f"t{n}", "status": "ok", "steps": 2, "tool_calls": 1,
                                         "tool_errors": 0, "latency_ms": 10.0, "adapter": None, **out})


def _run(store: EvalStore, tasks, server: FakeServer, **opts) -> dict:
    return asyncio.run(run_eval(store, tasks, server="http://hone.test", headers={}, tasks_file="t.jsonl",
                                options=EvalOptions(**opts), transport=httpx.MockTransport(server)))


@pytest.fixture
def store(settings: Settings):
    s = EvalStore(settings.db_path)
    yield s
    s.close()


MULTI = Task("file:m", (), "blue-7", "contains",
             turns=(Turn("save blue-7 as c"), Turn("and note it"), Turn("what is c?", True)), group="storage")
SINGLE = Task("file:s", ({"role": "user", "content": "6*7?"},), 42, "numeric", group="arith")


def test_turns_share_a_namespace_continued_turns_share_a_thread_and_only_the_last_is_checked(store) -> None:
    server = FakeServer(lambda b: {"answer": "It is blue-7." if "what" in b.get("input", "") else "Saved 42."})
    row = _run(store, [MULTI, SINGLE], server, concurrency=1, adapter="base")
    m = [b for b in server.bodies if "input" in b]
    assert len({b["namespace"] for b in m}) == 1 and all(b["source"] == "eval" for b in server.bodies)
    assert m[0]["thread_id"] == m[1]["thread_id"] and "thread_id" not in m[2]  # turn 3 is a new conversation
    assert [("expected_answer" in b["metadata"]) for b in m] == [False, False, True]
    assert m[2]["metadata"]["task_id"] == "file:m" and m[0]["metadata"]["task_id"] == "file:m#turn0"
    assert all(b["adapter"] == "base" and b["temperature"] == 0.0 for b in server.bodies)
    single = next(b for b in server.bodies if "messages" in b)
    assert "thread_id" not in single and single["namespace"] != m[0]["namespace"]

    assert row["state"] == "done" and (row["n_done"], row["n_success"]) == (2, 2) and row["success_rate"] == 1.0
    results = {r["task_id"]: r for r in row["results"]}
    assert results["m"]["trajectory_ids"] == ["t1", "t2", "t3"] and results["m"]["steps"] == 6
    assert row["summary"]["by_type"].keys() == {"storage", "arith"}
    assert store.list()[0]["id"] == row["id"]


def test_a_turn_runs_in_a_thread_only_when_a_conversation_goes_on() -> None:
    """A new conversation nothing continues runs thread-less (the learner can re-run such a run,
    with the storage state it recorded); one with a follow-up turn gets a thread both share."""
    from runtime.evals import turn_plan

    task = Task("file:p", (), "x", "contains", turns=(
        Turn("a"), Turn("b", True), Turn("c"), Turn("d", True), Turn("e", True)))
    assert [thread for _, thread in turn_plan(task, "ns")] == [None, "ns.1", "ns.1", None, None]
    task = Task("file:q", (), "x", "contains", turns=(Turn("a"), Turn("b"), Turn("c", True)))
    assert [thread for _, thread in turn_plan(task, "ns")] == ["ns.0", "ns.0", None]
    assert turn_plan(SINGLE, "ns") == [({"messages": list(SINGLE.messages)}, None)]


def test_a_failed_earlier_turn_fails_the_task_without_running_the_rest(store) -> None:
    server = FakeServer(lambda b: {"answer": "oops", "status": "tool_error"})
    row = _run(store, [MULTI], server)
    assert len(server.bodies) == 1 and row["results"][0]["status"] == "tool_error" and row["n_success"] == 0


def test_a_wrong_answer_and_a_rejected_prompt_are_task_failures_not_aborts(store) -> None:
    def reply(b):
        if b["metadata"]["task_id"] == "file:s":
            return httpx.Response(422, json={"error": {"message": "prompt too long", "type": "engine_rejected"}})
        return {"answer": "It is red-1."}

    row = _run(store, [MULTI, SINGLE], FakeServer(reply))
    results = {r["task_id"]: r for r in row["results"]}
    assert row["state"] == "done" and row["n_success"] == 0
    assert results["s"]["error"] == "engine_rejected: prompt too long" and results["m"]["answer"] == "It is red-1."


def test_engine_restarts_are_retried(store, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(_s: float) -> None:
        return None

    monkeypatch.setattr(evals.asyncio, "sleep", no_sleep)
    calls = []

    def reply(b):
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, json={"error": {"message": "engine restarting", "type": "engine_unavailable"}})
        return {"answer": "42"}

    row = _run(store, [SINGLE], FakeServer(reply))
    assert len(calls) == 3 and row["n_success"] == 1


def test_a_refusing_server_aborts_and_keeps_what_was_measured(store) -> None:
    def reply(b):
        if b["metadata"]["task_id"] == "file:m":
            return httpx.Response(403, json={"error": {"message": "this endpoint needs the admin token", "type": "forbidden"}})
        return {"answer": "42"}

    with pytest.raises(EvalAborted, match="403.*admin token"):
        _run(store, [SINGLE, MULTI], FakeServer(reply), concurrency=1)
    row = store.list()[0]
    assert row["state"] == "failed" and "admin token" in row["error"] and row["n_done"] == 1 and row["n_success"] == 1


def test_limit_takes_the_first_tasks(store) -> None:
    server = FakeServer(lambda b: {"answer": "42"})
    row = _run(store, [SINGLE, Task("file:s2", SINGLE.messages, 42, "numeric")], server, limit=1)
    assert row["n_tasks"] == 1 and len(server.bodies) == 1


# ---------------------------------------------------------------- CLI
def test_cli_errors_are_one_line_with_an_exit_code(settings: Settings, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONE_HOME", str(settings.home))
    bad = write(tmp_path / "bad.jsonl", '{"id": "a", "question": "q", "answer": 1}', '{"id": "b"')
    out = CliRunner().invoke(main, ["eval", "--tasks", str(bad)])
    assert out.exit_code == 1 and f"{bad}:2: not valid JSON" in out.stderr

    good = write(tmp_path / "good.jsonl", '{"id": "a", "question": "q", "answer": 1}')
    from runtime.engine import free_port

    out = CliRunner().invoke(main, ["eval", "--tasks", str(good), "--url", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 1 and "cannot reach the hone server" in out.stderr and "Traceback" not in out.output

    listed = CliRunner().invoke(main, ["evals"])
    assert listed.exit_code == 0 and "failed" in listed.stdout  # the aborted eval is on record
    eval_id = listed.stdout.splitlines()[1].split()[0]
    shown = CliRunner().invoke(main, ["evals", eval_id, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["state"] == "failed"
    missing = CliRunner().invoke(main, ["evals", "ev-nope"])
    assert missing.exit_code == 1 and "no eval 'ev-nope'" in missing.stderr


def test_cli_compares_two_evals_task_by_task(settings: Settings, store, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONE_HOME", str(settings.home))
    tasks = [Task(f"file:t{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(6)]
    right = {"q0", "q1", "q2"}
    before = _run(store, tasks, FakeServer(lambda b: {"answer": b["messages"][0]["content"][1:]
                                                     if b["messages"][0]["content"] in right else "no"}))
    right = {"q1", "q2", "q3", "q4", "q5"}  # fixes t3 t4 t5, breaks t0
    after = _run(store, tasks, FakeServer(lambda b: {"answer": b["messages"][0]["content"][1:]
                                                    if b["messages"][0]["content"] in right else "no"}))
    out = CliRunner().invoke(main, ["evals", before["id"], "--compare", after["id"], "--json"])
    assert out.exit_code == 0, out.output
    c = json.loads(out.stdout)
    assert (c["n"], c["before_success"], c["after_success"], c["fixed"], c["broken"]) == (6, 3, 5, 3, 1)
    assert c["fixed_tasks"] == ["t3", "t4", "t5"] and c["broken_tasks"] == ["t0"]
    assert c["p_value"] == pytest.approx(evals.mcnemar_p(3, 1))
    text = CliRunner().invoke(main, ["evals", before["id"], "--compare", after["id"]])
    assert text.exit_code == 0 and "fixed 3, broke 1" in text.stdout and "not significant" in text.stdout

    missing = CliRunner().invoke(main, ["evals", before["id"], "--compare", "ev-nope"])
    assert missing.exit_code == 1 and "no eval 'ev-nope'" in missing.stderr
    alone = CliRunner().invoke(main, ["evals", "--compare", after["id"]])
    assert alone.exit_code == 1 and "needs an EVAL_ID" in alone.stderr


def test_cli_refuses_to_compare_evals_of_different_task_files(settings: Settings, store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONE_HOME", str(settings.home))
    first = _run(store, [SINGLE], FakeServer(lambda b: {"answer": "42"}))
    other = asyncio.run(run_eval(store, [SINGLE], server="http://hone.test", headers={}, tasks_file="other.jsonl",
                                 options=EvalOptions(), transport=httpx.MockTransport(FakeServer(lambda b: {"answer": "1"}))))
    out = CliRunner().invoke(main, ["evals", first["id"], "--compare", other["id"]])
    assert out.exit_code == 1 and "only evals of the same task file" in out.stderr and "Traceback" not in out.output
