"""bench/drift.py on a real SQLite log: which runs retokenize, and which tasks lose their pairs to it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from learner.registry import Registry
from runtime.store import TrajectoryStore
from tests.test_pairs import Log

_spec = importlib.util.spec_from_file_location("drift", Path(__file__).resolve().parent.parent / "bench" / "drift.py")
drift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drift)


def test_a_task_whose_only_success_retokenized_loses_its_pair_only_when_excluding(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with TrajectoryStore(tmp_path / "hone.db") as store:
        log = Log(store, tmp_path / "hone.db")
        log.run("storage-train-1", True, drift=True)  # the success called a tool and closed it as other tokens
        log.run("storage-train-1", False)
        log.run("asdiv-a-7", True)
        log.run("asdiv-a-7", False, drift=True)
        log.label()
        log.close()
    registry = Registry(tmp_path / "hone.db")
    cid = registry.start_cycle("manual")
    registry.finish_cycle(cid, "rejected", timings={"label": 0.0, "collect": 0.0, "explore": 0.0, "pairs": 0.0})
    registry.close()

    assert drift.main(["--home", str(tmp_path), "--cycle", str(cid), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == {"serve/success": {"ok": 1, "trimmed": 1}, "serve/failure": {"ok": 1, "trimmed": 1}}
    assert report["untrained_tokens"] == {"runs": 2, "median": 1, "max": 1}
    assert report["pairs"]["exclude"]["by_kind"] == {}  # both tasks lost a side
    assert report["pairs"]["exclude"]["excluded"] == {"drift": 2}
    assert report["pairs"]["trim"]["by_kind"] == {"storage": 1, "asdiv": 1}
    assert report["pairs"]["trim"]["drift_trimmed"] == 2


def test_a_missing_log_or_cycle_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert drift.main(["--home", str(tmp_path)]) == 2
    assert "no trajectory log" in capsys.readouterr().err
    Registry(tmp_path / "hone.db").close()
    assert drift.main(["--home", str(tmp_path), "--cycle", "3"]) == 2
    assert "no cycle 3" in capsys.readouterr().err
