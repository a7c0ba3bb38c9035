"""The guard (`gate_guard_file`) on real parts: two real cycles (real vLLM on CPU, SmolLM2, the learner
process) with two multi-turn storage tasks as the guard. After the gate (margin -1: always passed),
the candidate and what serves now run the guard through the real agent and storage tool; the
candidate is promoted only if it solved at least as many. The second cycle reuses the recorded
guard results of what serves now instead of running it again. With gate_pool_guard on (gate_max_p 1,
so the decision is the same), the gate's and the guard's task-by-task results are pooled in the record.

Whether the tiny candidate keeps the storage tasks is up to the model, so the test checks the rule
against what was measured, not a fixed outcome."""

from __future__ import annotations

import json

import httpx
import pytest

from .integration_support import REPO
from .test_learner_integration import TASKS, hone, learner_server, post_run

pytestmark = pytest.mark.integration

GUARD = [json.loads(line) for line in (REPO / "tasks" / "storage.jsonl").read_text().splitlines()[:2]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    guard_file = tmp_path_factory.mktemp("guard") / "guard.jsonl"
    guard_file.write_text("".join(json.dumps(t) + "\n" for t in GUARD))
    with learner_server(tmp_path_factory, "guard-home", explore_budget="0", gate_guard_file=str(guard_file),
                        gate_pool_guard="true") as s:
        yield s


def feedback_contrast(server, tasks: list[dict]) -> None:
    for task in tasks:
        ids = [post_run(server, input=task["question"], temperature=0.7, metadata={"task_id": task["id"]})
               ["trajectory_id"] for _ in range(2)]
        for traj_id, verdict in zip(ids, ("success", "failure")):
            r = httpx.post(f"{server.url}/v1/trajectories/{traj_id}/feedback", json={"score": verdict}, timeout=30)
            assert r.status_code == 200, r.text


def guard_runs(server) -> list[dict]:
    r = httpx.get(server.url + "/v1/trajectories", params={"source": "guard", "limit": 100}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def train(server) -> dict:
    proc = hone(server, "train", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def check_the_rule(cycle: dict) -> dict:
    guard = cycle["gate"]["guard"]
    assert guard["n_tasks"] == 2 and guard["candidate"] == cycle["candidate"]
    assert "guard" in cycle["timings"]
    assert list(guard["groups"]) == ["storage"]
    gate, both = cycle["gate"], cycle["gate"]["pooled"]
    assert both["n"] == gate["n_tasks"] + guard["n_tasks"]
    assert (both["fixed"], both["broken"]) == (gate["fixed"] + guard["fixed"], gate["broken"] + guard["broken"])
    kept = guard["candidate_successes"] >= guard["current_successes"]  # one kind of task: the totals decide
    assert guard["promote"] is kept and guard["worse"] == ([] if kept else ["storage"])
    if kept:
        assert cycle["state"] == "promoted", cycle
    else:
        assert cycle["state"] == "rejected" and cycle["error"].startswith("guard: "), cycle
    return guard


def test_the_guard_decides_promotion_and_its_results_are_reused(server) -> None:
    feedback_contrast(server, TASKS[:2])
    first = train(server)
    guard = check_the_rule(first)
    assert guard["current"] == "base" and guard["current_reused"] == 0
    runs = guard_runs(server)
    # both sides ran both tasks, turn by turn (a failed turn ends its task early), each task in a
    # storage namespace of its own
    for side in ("candidate", "current"):
        mine = [t for t in runs if t["metadata"]["gate_side"] == side]
        assert 2 <= len(mine) <= 4, mine
    serving = first["candidate"] if first["state"] == "promoted" else "base"
    shown = hone(server, "cycles", str(first["id"]))
    assert shown.returncode == 0 and (f"guard:   {first['candidate']} vs base: storage {guard['candidate_successes']}/2"
                                      f" vs {guard['current_successes']}/2") in shown.stdout, shown.stdout

    feedback_contrast(server, TASKS[2:4])
    second = train(server)
    guard = check_the_rule(second)
    assert guard["current"] == serving and guard["current_reused"] == 2
    seen = {t["id"] for t in runs}
    new_runs = [t for t in guard_runs(server) if t["id"] not in seen]
    assert {t["metadata"]["gate_side"] for t in new_runs} == {"candidate"}
    assert {t["adapter"] for t in new_runs} == {second["candidate"]}
