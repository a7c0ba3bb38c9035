"""A cycle's control flow on a real registry file; pair building and training stand in (the
real-parts cycle, from traffic to swap, is in tests/test_learner_integration.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from learner import worker
from learner.cycle import Cycle
from learner.pairs import PairSet
from learner.registry import Registry
from learner.tasks import TaskFileError
from learner.train import TrainingError
from learner.types import Pair, TokenSequence
from runtime.config import Settings


def test_a_cycle_with_nothing_to_gate_on_is_skipped_before_training(tmp_path: Path, monkeypatch) -> None:
    """No verifiable validation traffic and no gate_tasks_file: the candidate could never be gated,
    so it must not cost a training (minutes on CPU) only to be rejected."""
    settings = Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_VAL_FRACTION": "0", "HONE_MIN_PAIRS": "1"})
    cycle = run_cycle(settings, monkeypatch, pairs=[pair("t1", 100), pair("t2", 100)])
    assert cycle["error"].startswith("no held-out tasks to gate on") and cycle["counts"]["pairs"] == 2


def test_a_cycle_whose_pairs_are_all_too_long_is_skipped_before_training(tmp_path: Path, monkeypatch) -> None:
    """The trainer drops pairs longer than dpo_max_length; with none left it would fail the cycle."""
    settings = Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_MIN_PAIRS": "2", "HONE_DPO_MAX_LENGTH": "512"})
    cycle = run_cycle(settings, monkeypatch, pairs=[pair("t1", 100), pair("t2", 600), pair("t3", 513)])
    assert cycle["error"] == "1 preference pairs (2 longer than dpo_max_length=512), fewer than min_pairs=2"


def pair(group: str, length: int) -> Pair:
    return Pair(TokenSequence((1,) * length, (0,) + (1,) * (length - 1)), TokenSequence((1,) * 50, (0,) + (1,) * 49), group)


def untrained_cycle(settings: Settings, monkeypatch, *, pairs: list[Pair]) -> tuple[Registry, Cycle]:
    """A cycle whose pair building returns `pairs` and which fails the test if it trains."""
    settings.ensure_dirs()
    built = PairSet(pairs, {})
    monkeypatch.setattr("learner.cycle.build_pairs", lambda *a, **k: built)

    def no_training(*a, **k):
        raise AssertionError("trained a candidate that this cycle cannot use")

    monkeypatch.setattr("learner.train_process.train_adapter_isolated", no_training)
    reg = Registry(settings.db_path)
    return reg, Cycle(settings, reg, runner=None, cycle_id=reg.start_cycle("manual"))


def run_cycle(settings: Settings, monkeypatch, *, pairs: list[Pair]) -> dict:
    """Runs a cycle that must end skipped before it trains; returns its record."""
    reg, cycle = untrained_cycle(settings, monkeypatch, pairs=pairs)
    try:
        assert asyncio.run(cycle.run()) == "skipped"
        record = reg.get_cycle(cycle.id)
    finally:
        reg.close()
    assert "train" not in record["timings"] and list(settings.adapters_dir.iterdir()) == []
    return record


def test_a_bad_guard_file_fails_the_cycle_before_training(tmp_path: Path, monkeypatch) -> None:
    """Found after training, it would cost minutes; the reason names the file and line."""
    gate_file = tmp_path / "gate.jsonl"
    gate_file.write_text('{"id": "g1", "question": "1+1?", "answer": 2}\n')
    guard_file = tmp_path / "guard.jsonl"
    guard_file.write_text('{"id": "s1", "question": "recall?"}\n')  # no answer
    settings = Settings.load(env={"HONE_HOME": str(tmp_path / "home"), "HONE_MIN_PAIRS": "1",
                                  "HONE_GATE_TASKS_FILE": str(gate_file), "HONE_GATE_GUARD_FILE": str(guard_file)})
    reg, cycle = untrained_cycle(settings, monkeypatch, pairs=[pair("t1", 100)])
    try:
        with pytest.raises(TaskFileError, match=f"{guard_file}:1: missing answer"):
            asyncio.run(cycle.run())
    finally:
        reg.close()


def test_cancelling_a_cycle_mid_training_stops_the_training(tmp_path: Path, monkeypatch) -> None:
    """A learner told to stop must not sit in its shutdown until a minutes-long training ends."""
    gate_file = tmp_path / "gate.jsonl"
    gate_file.write_text('{"id": "g1", "question": "1+1?", "answer": 2}\n')
    settings = Settings.load(env={"HONE_HOME": str(tmp_path / "home"), "HONE_MIN_PAIRS": "1",
                                  "HONE_GATE_TASKS_FILE": str(gate_file)})
    settings.ensure_dirs()
    built = PairSet([pair("t1", 100)], {})
    monkeypatch.setattr("learner.cycle.build_pairs", lambda *a, **k: built)
    monkeypatch.setattr("learner.cycle.ensure_model", lambda *a, **k: "model")
    training, stopped = threading.Event(), threading.Event()

    def trains_until_stopped(*a, stop, **k):
        training.set()
        if stop.wait(timeout=30):
            stopped.set()
        raise TrainingError("stopped")

    monkeypatch.setattr("learner.train_process.train_adapter_isolated", trains_until_stopped)

    async def cancel_mid_training(reg: Registry) -> None:
        task = asyncio.create_task(worker.run_cycle(settings, reg, runner=None, trigger="manual"))
        await asyncio.to_thread(training.wait, 30)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    reg = Registry(settings.db_path)
    try:
        asyncio.run(cancel_mid_training(reg))
        cycle = reg.list_cycles(limit=1)[0]
    finally:
        reg.close()
    assert training.is_set() and stopped.is_set()
    assert cycle["state"] == "failed" and cycle["error"] == "stopped during phase 'train': the learner was shut down"


GATE_SOLVED = {"base": {"g0", "g1"}, "cand": {"g0", "g2", "g3"}}  # fixed 2, broke 1: p = 1.0 alone
GUARD = [("s0", "storage"), ("s1", "storage"), ("s2", "storage"), ("s3", "storage"), ("s4", "storage"),
         ("s5", "storage"), ("p0", "python")]


def gated_cycle(tmp_path: Path, monkeypatch, *, pool: bool, solved: dict[str, set[str]],
                env: dict[str, str] | None = None, trained: list[dict] | None = None) -> dict:
    """A cycle that trains (stood in: each training's keyword arguments go to `trained`) and then runs
    the real gate, guard and decision code against an agent that solves the tasks `solved` names for
    each side ("base", "cand"); returns its record."""
    from learner.runner import Attempt

    tmp_path.mkdir(exist_ok=True)
    gate_file = tmp_path / "gate.jsonl"
    gate_file.write_text("".join(f'{{"id": "g{i}", "question": "q{i}", "answer": {i}}}\n' for i in range(6)))
    guard_file = tmp_path / "guard.jsonl"
    guard_file.write_text("".join(f'{{"id": "{k}", "question": "q{k}", "answer": 1, "type": "{g}"}}\n' for k, g in GUARD))
    settings = Settings.load(env={"HONE_HOME": str(tmp_path / "home"), "HONE_MIN_PAIRS": "1", "HONE_DPO_EPOCHS": "1",
                                  "HONE_GATE_TASKS_FILE": str(gate_file), "HONE_GATE_GUARD_FILE": str(guard_file),
                                  "HONE_GATE_MAX_P": "0.25", "HONE_GATE_POOL_GUARD": str(pool).lower(),
                                  **(env or {})})
    settings.ensure_dirs()
    monkeypatch.setattr("learner.cycle.build_pairs", lambda *a, **k: PairSet([pair("t1", 100)], {}))
    monkeypatch.setattr("learner.cycle.ensure_model", lambda *a, **k: "model")

    def trains(model, pairs, cfg, out, **k):
        (trained if trained is not None else []).append({"cfg": cfg, **k})
        return SimpleNamespace(path=out, metrics={}, counts={}, timings={}, epoch=1, snapshots=[])

    monkeypatch.setattr("learner.train_process.train_adapter_isolated", trains)

    async def loads(*a, **k):
        return None

    async def swaps(*a, **k):
        return {"swapped": True}

    monkeypatch.setattr("learner.cycle.check_candidate", loads)
    monkeypatch.setattr("learner.cycle.promote", swaps)

    class Runner:
        engine = SimpleNamespace(unload_adapter=loads)

        async def attempt_all(self, jobs, *, on_done=None):
            side = lambda j: "base" if j["adapter"] == "base" else "cand"  # noqa: E731
            return [Attempt(j["task"], None, "ok", "", j["task"].key.split(":")[1] in solved[side(j)], 1) for j in jobs]

    reg = Registry(settings.db_path)
    try:
        asyncio.run(Cycle(settings, reg, runner=Runner(), cycle_id=reg.start_cycle("manual")).run())
        return reg.list_cycles(limit=1)[0]
    finally:
        reg.close()


def test_an_arithmetic_only_gate_turns_away_a_candidate_whose_gains_are_elsewhere(tmp_path: Path, monkeypatch) -> None:
    solved = {"base": GATE_SOLVED["base"] | {"p0"}, "cand": GATE_SOLVED["cand"] | {"s0", "s1", "s2", "s3", "s4", "s5", "p0"}}
    cycle = gated_cycle(tmp_path, monkeypatch, pool=False, solved=solved)
    assert cycle["state"] == "rejected" and cycle["error"].startswith("gate: 0.500 vs 0.333, fixed 2 broke 1: McNemar p 1")
    assert "guard" not in cycle["gate"] and "guard" not in cycle["timings"]  # never looked at storage


def test_pooled_with_the_guard_the_same_candidate_is_promoted(tmp_path: Path, monkeypatch) -> None:
    solved = {"base": GATE_SOLVED["base"] | {"p0"}, "cand": GATE_SOLVED["cand"] | {"s0", "s1", "s2", "s3", "s4", "s5", "p0"}}
    cycle = gated_cycle(tmp_path, monkeypatch, pool=True, solved=solved)
    assert cycle["state"] == "promoted", cycle["error"]
    both = cycle["gate"]["pooled"]
    assert (both["n"], both["fixed"], both["broken"]) == (13, 8, 1) and both["p_value"] <= 0.25 and both["promote"]
    assert cycle["gate"]["p_value"] > 0.25  # the gate alone would have refused it


def test_pooled_evidence_does_not_excuse_a_loss_on_any_kind(tmp_path: Path, monkeypatch) -> None:
    solved = {"base": GATE_SOLVED["base"] | {"p0"}, "cand": GATE_SOLVED["cand"] | {"s0", "s1", "s2", "s3", "s4", "s5"}}
    cycle = gated_cycle(tmp_path, monkeypatch, pool=True, solved=solved)
    assert cycle["state"] == "rejected" and cycle["error"].startswith("guard: python: hone-v1 solved 0 of 1, base 1")
    # nor a loss on the gate's own kind: then the guard need not even run
    solved = {"base": {"g0", "g1", "g2"}, "cand": {"g0", "g3", "s0", "s1", "s2", "s3", "s4", "s5", "p0"}}
    cycle = gated_cycle(tmp_path / "b", monkeypatch, pool=True, solved=solved)
    assert cycle["state"] == "rejected" and cycle["error"].startswith("gate: 0.333 < 0.500")
    assert "guard" not in cycle["timings"]


def test_pooled_but_still_unconvincing_is_rejected_naming_both(tmp_path: Path, monkeypatch) -> None:
    solved = {"base": GATE_SOLVED["base"] | {"p0"}, "cand": GATE_SOLVED["cand"] | {"s0", "p0"}}
    cycle = gated_cycle(tmp_path, monkeypatch, pool=True, solved=solved)
    assert cycle["state"] == "rejected"
    assert cycle["error"] == "gate and guard pooled: fixed 3 broke 1 of 13 tasks: McNemar p 0.625 > gate_max_p 0.25"


class LoggingRunner:
    """Stands in for AgentRunner's rollouts; each run is logged to the real store as the agent would,
    answering right only under the `/` trial (free samples and other operations answer wrong)."""

    def __init__(self, settings: Settings, log) -> None:
        self.settings, self.log, self.jobs = settings, log, []

    async def attempt_all(self, jobs, *, on_done=None):
        from learner.runner import Attempt
        from tests.test_pairs import calc

        out = []
        for job in jobs:
            self.jobs.append(job)
            op = job["extra_metadata"].get("explore_operation")
            ok = op == "/"
            tid = self.log.run(job["task"].key, ok, source="exploration", call=calc(f"12 {op or '*'} 4"),
                               **job["extra_metadata"])
            out.append(Attempt(job["task"], tid, "ok", "", ok, 2))
            if on_done:
                on_done(out[-1])
        return out


def test_operator_trials_run_after_the_free_samples_on_what_they_never_solved(tmp_path: Path, monkeypatch) -> None:
    from runtime.store import TrajectoryStore
    from tests.test_pairs import Log, calc

    settings = Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_VAL_FRACTION": "0", "HONE_MIN_PAIRS": "100",
                                  "HONE_EXPLORE_ATTEMPTS": "2", "HONE_EXPLORE_OPERATOR_TRIALS": "true"})
    reg, cycle = untrained_cycle(settings, monkeypatch, pairs=[pair("t1", 100)])
    with TrajectoryStore(settings.db_path) as store:
        log = Log(store, settings.db_path)
        log.run("never", False, call=calc("12 * 4"))
        cycle.runner = LoggingRunner(settings, log)
        try:
            assert asyncio.run(cycle.run()) == "skipped"
            record = reg.get_cycle(cycle.id)
        finally:
            log.close()
            reg.close()
    jobs = cycle.runner.jobs
    assert [j["extra_metadata"].get("explore_operation") for j in jobs] == [None, None, "+", "-", "*", "/"]
    assert all(j["namespace"].startswith("trial-") for j in jobs[2:])
    counts = record["counts"]
    assert counts["explore_rollouts"] == 2 and counts["trial_rollouts"] == 4
    assert counts["trial_operation_successes"] == {"+": 0, "-": 0, "*": 0, "/": 1}
    assert counts["labels_after_trials"]["success"] == 1
    assert list(record["timings"])[:5] == ["label", "collect", "explore", "trials", "pairs"]


def test_retained_runs_reach_the_trainer_only_with_a_retain_weight(tmp_path: Path, monkeypatch) -> None:
    from learner.retain import RetainSet

    run = TokenSequence((1, 2, 3), (0, 1, 1), "t_py")
    asked = []

    def retain_runs(store, groups, pairs, *, serving, limit, **k):
        asked.append((serving, limit, len(pairs)))
        return RetainSet([run], {"python": 1}, {"drift": 2})

    monkeypatch.setattr("learner.cycle.retain_runs", retain_runs)
    solved = {"base": set(), "cand": {"g0", "g1", "g2", "g3"}}
    trained: list[dict] = []
    off = gated_cycle(tmp_path / "off", monkeypatch, pool=False, solved=solved, trained=trained)
    assert asked == [] and trained[0]["retain"] == [] and trained[0]["cfg"].retain_weight == 0.0
    assert "retained" not in off["counts"]
    on = gated_cycle(tmp_path / "on", monkeypatch, pool=False, solved=solved, trained=trained,
                     env={"HONE_DPO_RETAIN_WEIGHT": "0.5", "HONE_DPO_RETAIN_RUNS": "7"})
    assert asked == [(None, 7, 1)]  # the base serves: nothing was promoted yet
    assert trained[1]["retain"] == [run] and trained[1]["cfg"].retain_weight == 0.5
    assert on["counts"]["retained"] == {"runs": 1, "tools": {"python": 1}, "excluded": {"drift": 2}}
    assert on["state"] == "promoted"
