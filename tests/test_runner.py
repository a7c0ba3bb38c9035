"""The learner's in-process runner on multi-turn tasks (gate and exploration use it): turns share the
namespace, `new_thread` drops the history, only the last turn is checked and carries the expected
answer. The service is a stand-in that records requests: this is the runner's own logic."""

from __future__ import annotations

import asyncio

from learner.runner import AgentRunner
from learner.tasks import Task, Turn
from runtime.service import RunResult


class RecordingService:
    def __init__(self, statuses: list[str] | None = None) -> None:
        self.requests = []
        self.statuses = statuses or []

    async def run(self, req):
        self.requests.append(req)
        n = len(self.requests)
        status = self.statuses[n - 1] if n <= len(self.statuses) else "ok"
        text = req.messages[-1].content
        answer = "It is blue-7." if "what" in text else "Saved."
        return RunResult(f"t{n}", status, answer, None, "m", None, 2, 1.0, [])


TASK = Task("file:m", (), "blue-7", "contains",
            turns=(Turn("save blue-7 as c"), Turn("also note it"), Turn("what is c?", True)))


def _attempt(service: RecordingService):
    runner = AgentRunner(settings=None, service=service, engine=None)  # type: ignore[arg-type]
    return asyncio.run(runner.attempt(TASK, source="gate", namespace="ns1", adapter=None, temperature=0.0))


def test_turns_share_the_namespace_and_a_new_thread_drops_the_history() -> None:
    service = RecordingService()
    a = _attempt(service)
    assert a.success and a.steps == 6 and a.trajectory_id == "t3"
    r1, r2, r3 = service.requests
    assert {r.namespace for r in service.requests} == {"ns1"}
    assert [m.content for m in r2.messages] == ["save blue-7 as c", "Saved.", "also note it"]  # continued
    assert [m.content for m in r3.messages] == ["what is c?"]  # new thread: no history
    assert "expected_answer" not in r1.metadata and r1.metadata["task_id"] == "file:m#turn0"
    assert r3.metadata["expected_answer"] == "blue-7" and r3.metadata["task_id"] == "file:m"


def test_a_task_with_a_storage_state_runs_in_a_namespace_holding_exactly_it(tmp_path) -> None:
    from tools.storage import KVStore

    kv = KVStore(tmp_path / "hone.db", max_keys=2)
    seen = {}

    class Service(RecordingService):
        toolbox = type("Box", (), {"kv": kv})()

        async def run(self, req):
            seen["state"] = kv.snapshot(req.namespace, 1000)
            return await super().run(req)

    kv.put("explore-c1-0", "leftover", "x")
    recall = Task("req:r", ({"role": "user", "content": "what is gym_pin?"},), "7807", "numeric",
                  storage={"gym_pin": "7807"})
    a = asyncio.run(AgentRunner(None, Service(), None).attempt(recall, source="exploration", namespace="explore-c1-0",
                                                                adapter=None, temperature=1.0))
    assert seen["state"] == {"gym_pin": "7807"} and a.status == "ok"
    too_big = Task("req:r2", recall.messages, "7807", "numeric", storage={"a": "1", "b": "2", "c": "3"})
    a = asyncio.run(AgentRunner(None, Service(), None).attempt(too_big, source="exploration", namespace="ns2",
                                                                adapter=None, temperature=1.0))
    assert not a.success and a.status == "storage_error" and "limit of 2" in a.answer  # one task fails, not the batch


def test_a_failed_earlier_turn_ends_the_attempt_as_a_failure() -> None:
    service = RecordingService(["tool_error"])
    a = _attempt(service)
    assert not a.success and a.status == "tool_error" and len(service.requests) == 1


def test_the_gate_compares_both_sides_task_by_task_and_promotes_on_the_margin() -> None:
    from learner.gate import run_gate
    from learner.runner import Attempt

    tasks = [Task(f"file:q{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(6)]
    solves = {"hone-v2": {0, 1, 2, 3}, "base": {0, 4}}  # candidate fixes q1 q2 q3, breaks q4

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            return [Attempt(j["task"], None, "ok", "", int(j["task"].key.split("q")[1]) in solves[j["adapter"]], 2)
                    for j in jobs]

    gate = asyncio.run(run_gate(Runner(), tasks, candidate="hone-v2", current=None, cycle_id=3, margin=0.0))
    assert (gate["candidate_successes"], gate["current_successes"], gate["current"]) == (4, 2, "base")
    assert (gate["fixed"], gate["broken"]) == (3, 1) and gate["p_value"] == 0.625 and gate["promote"]
    assert gate["results"]["current"] == {f"file:q{i}": i in (0, 4) for i in range(6)}
    strict = asyncio.run(run_gate(Runner(), tasks, candidate="hone-v2", current=None, cycle_id=3, margin=0.5))
    assert not strict["promote"]
    # fixed 3, broke 1 is p = 0.625: ahead on the rates, but not evidence enough for max_p 0.5
    unproven = asyncio.run(run_gate(Runner(), tasks, candidate="hone-v2", current=None, cycle_id=3, margin=0.0,
                                    max_p=0.5))
    assert unproven["max_p"] == 0.5 and not unproven["promote"]
    assert asyncio.run(run_gate(Runner(), tasks, candidate="hone-v2", current=None, cycle_id=3, margin=0.0,
                                max_p=0.7))["promote"]


def test_a_significance_gate_never_promotes_a_worse_candidate_however_lopsided() -> None:
    from learner.gate import run_gate
    from learner.runner import Attempt

    tasks = [Task(f"file:q{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(20)]
    solves = {"hone-v2": set(), "base": set(range(20))}  # broke all 20: p is tiny, the direction is wrong

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            return [Attempt(j["task"], None, "ok", "", int(j["task"].key.split("q")[1]) in solves[j["adapter"]], 2)
                    for j in jobs]

    gate = asyncio.run(run_gate(Runner(), tasks, candidate="hone-v2", current=None, cycle_id=1, margin=0.0, max_p=0.2))
    assert gate["p_value"] < 1e-5 and not gate["promote"]


def test_the_gate_reuses_the_current_sides_recorded_results_and_runs_only_what_is_missing() -> None:
    from learner.gate import recorded_results, run_gate
    from learner.runner import Attempt
    from learner.tasks import fingerprint

    tasks = [Task(f"file:q{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(4)]
    ran: list[tuple[str, str]] = []

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            ran.extend((j["extra_metadata"]["gate_side"], j["task"].key) for j in jobs)
            return [Attempt(j["task"], None, "ok", "", j["adapter"] == "hone-v2", 2) for j in jobs]

    # hone-v1 serves; it was measured as cycle 1's candidate on q0-q2 (and as nothing on another model)
    prints = {t.key: fingerprint(t) for t in tasks}
    cycles = [
        {"gate": {"model": "/m/other", "candidate": "hone-v1", "current": "base",
                  "results": {"candidate": {"file:q3": True}, "current": {}}, "fingerprints": prints}},
        {"gate": {"model": "/m/smol", "candidate": "hone-v1", "current": "base",
                  "results": {"candidate": {"file:q0": True, "file:q1": False, "file:q2": True},
                              "current": {"file:q0": False}}, "fingerprints": prints}},
    ]
    known = recorded_results(cycles, "hone-v1", "/m/smol", tasks)
    assert known == {"file:q0": True, "file:q1": False, "file:q2": True}
    assert recorded_results(cycles, "base", "/m/smol", tasks) == {"file:q0": False}
    # the task file was edited under the same ids: q1's question and q2's answer changed, so their
    # recorded results are about other tasks
    edited = [tasks[0], Task("file:q1", ({"role": "user", "content": "q1, reworded"},), 1, "numeric"),
              Task("file:q2", tasks[2].messages, 20, "numeric"), tasks[3]]
    assert recorded_results(cycles, "hone-v1", "/m/smol", edited) == {"file:q0": True}
    unprinted = [{"gate": {k: v for k, v in c["gate"].items() if k != "fingerprints"}} for c in cycles]
    assert recorded_results(unprinted, "hone-v1", "/m/smol", tasks) == {}  # recorded before fingerprints
    gate = asyncio.run(run_gate(Runner(), tasks + tasks[:1], candidate="hone-v2", current="hone-v1", cycle_id=2,
                                margin=0.0, known_current=known))
    assert gate["fingerprints"] == prints  # recorded with the results, for the next gate's reuse
    assert sorted(ran) == [("candidate", f"file:q{i}") for i in range(4)] + [("current", "file:q3")]
    assert gate["n_tasks"] == 4 and gate["current_reused"] == 3
    assert (gate["candidate_successes"], gate["current_successes"]) == (4, 2)
    assert (gate["fixed"], gate["broken"]) == (2, 0)


def test_several_candidates_share_one_run_of_the_current_side_and_the_most_successes_win() -> None:
    from learner.gate import best_candidate, run_gates
    from learner.runner import Attempt

    tasks = [Task(f"file:q{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(4)]
    solves = {"hone-v2": {0}, "hone-v2-e1": {0, 1, 2}, "hone-v1": {0, 3}}
    ran: list[tuple[str, str]] = []

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            ran.extend((j["adapter"], j["task"].key) for j in jobs)
            return [Attempt(j["task"], None, "ok", "", int(j["task"].key[-1]) in solves[j["adapter"]], 2) for j in jobs]

    gates = asyncio.run(run_gates(Runner(), tasks, candidates=["hone-v2", "hone-v2-e1"], current="hone-v1",
                                  cycle_id=2, margin=0.0, known_current={"file:q0": True}))
    assert sorted(a for a, _ in ran) == ["hone-v1"] * 3 + ["hone-v2"] * 4 + ["hone-v2-e1"] * 4  # current: once, q1-q3
    assert gates["hone-v2-e1"]["current_reused"] == 4 and gates["hone-v2-e1"]["current_successes"] == 2
    assert [g["candidate_successes"] for g in gates.values()] == [1, 3]
    assert best_candidate(gates) == "hone-v2-e1"
    tie = {"hone-v3": {"candidate_successes": 2}, "hone-v3-e1": {"candidate_successes": 2}}
    assert best_candidate(tie) == "hone-v3"  # the final epoch, gated first, wins ties


def test_the_guard_rejects_a_candidate_that_solves_one_fewer_and_its_results_are_reused_later() -> None:
    from learner.gate import recorded_results, run_guard
    from learner.runner import Attempt

    tasks = [Task(f"file:s{i}", ({"role": "user", "content": f"s{i}"},), i, "numeric") for i in range(5)]
    solves = {"hone-v1": {0, 1, 2}, "hone-v2": {0, 1, 3}, "hone-v3": {0, 4}}
    ran: list[dict] = []

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            ran.extend(jobs)
            return [Attempt(j["task"], None, "ok", "", int(j["task"].key.split("s")[1]) in solves[j["adapter"]], 2)
                    for j in jobs]

    # a tie passes: fixed one, broke one is not worse
    tie = asyncio.run(run_guard(Runner(), tasks, candidate="hone-v2", current="hone-v1", cycle_id=4))
    assert (tie["candidate_successes"], tie["current_successes"], tie["fixed"], tie["broken"]) == (3, 3, 1, 1)
    assert tie["promote"]
    assert {j["source"] for j in ran} == {"guard"} and all(j["namespace"].startswith("guard-c4-") for j in ran)
    assert len({j["namespace"] for j in ran}) == 10  # every run in a namespace of its own
    # one fewer fails, however good the gate was: no margin and no p-value here
    worse = asyncio.run(run_guard(Runner(), tasks, candidate="hone-v3", current="hone-v2", cycle_id=5))
    assert (worse["candidate_successes"], worse["current_successes"]) == (2, 3) and not worse["promote"]
    # a later cycle finds what serves now's guard results in the cycle records, beside the gate's
    tie["model"] = "/m/smol"
    cycles = [{"gate": {"model": "/m/smol", "candidate": "hone-v2", "current": "hone-v1", "results": {"candidate": {},
                                                                                                 "current": {}},
                        "guard": tie}}]
    assert recorded_results(cycles, "hone-v2", "/m/smol", tasks) == {f"file:s{i}": i in (0, 1, 3) for i in range(5)}
    assert recorded_results(cycles, "hone-v1", "/m/smol", tasks) == {f"file:s{i}": i in (0, 1, 2) for i in range(5)}
    ran.clear()
    again = asyncio.run(run_guard(Runner(), tasks, candidate="hone-v3", current="hone-v2", cycle_id=5,
                                  known_current=recorded_results(cycles, "hone-v2", "/m/smol", tasks)))
    assert again["current_reused"] == 5 and {j["adapter"] for j in ran} == {"hone-v3"}


def test_the_guard_rejects_a_loss_in_any_group_even_when_another_group_gains_more() -> None:
    from learner.gate import run_guard
    from learner.runner import Attempt

    tasks = [Task(f"file:s{i}", ({"role": "user", "content": f"s{i}"},), i, "numeric", group="storage") for i in range(3)]
    tasks += [Task(f"file:p{i}", ({"role": "user", "content": f"p{i}"},), i, "numeric", group="python") for i in range(2)]
    solves = {"hone-v2": {"file:s0", "file:s1", "file:s2"}, "hone-v1": {"file:s0", "file:p0"}}

    class Runner:
        async def attempt_all(self, jobs, *, on_done=None):
            return [Attempt(j["task"], None, "ok", "", j["task"].key in solves[j["adapter"]], 2) for j in jobs]

    guard = asyncio.run(run_guard(Runner(), tasks, candidate="hone-v2", current="hone-v1", cycle_id=2))
    assert (guard["candidate_successes"], guard["current_successes"]) == (3, 2)  # ahead overall ...
    assert guard["groups"] == {"python": {"n": 2, "candidate_successes": 0, "current_successes": 1},
                               "storage": {"n": 3, "candidate_successes": 3, "current_successes": 1}}
    assert guard["worse"] == ["python"] and not guard["promote"]  # ... but python lost its one success
