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
    built = SimpleNamespace(pairs=pairs, excluded={})
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
    built = SimpleNamespace(pairs=[pair("t1", 100)], excluded={})
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
