"""A cycle's control flow on a real registry file; pair building and training stand in (the
real-parts cycle, from traffic to swap, is in tests/test_learner_integration.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from learner.cycle import Cycle
from learner.registry import Registry
from runtime.config import Settings


def test_a_cycle_with_nothing_to_gate_on_is_skipped_before_training(tmp_path: Path, monkeypatch) -> None:
    """No verifiable validation traffic and no gate_tasks_file: the candidate could never be gated,
    so it must not cost a training (minutes on CPU) only to be rejected."""
    settings = Settings.load(env={"HONE_HOME": str(tmp_path), "HONE_VAL_FRACTION": "0", "HONE_MIN_PAIRS": "1"})
    settings.ensure_dirs()
    pairs = SimpleNamespace(pairs=[SimpleNamespace(group="t1"), SimpleNamespace(group="t2")], excluded={})
    monkeypatch.setattr("learner.cycle.build_pairs", lambda *a, **k: pairs)

    def no_training(*a, **k):
        raise AssertionError("trained a candidate that nothing can gate")

    monkeypatch.setattr("learner.train_process.train_adapter_isolated", no_training)
    reg = Registry(settings.db_path)
    try:
        cid = reg.start_cycle("manual")
        assert asyncio.run(Cycle(settings, reg, runner=None, cycle_id=cid).run()) == "skipped"
        cycle = reg.get_cycle(cid)
        assert cycle["error"].startswith("no held-out tasks to gate on") and cycle["counts"]["pairs"] == 2
        assert "train" not in cycle["timings"] and list(settings.adapters_dir.iterdir()) == []
    finally:
        reg.close()
