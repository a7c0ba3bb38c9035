"""bench/sweep.py's view of a past cycle: when it built its pairs, and which adapter it warm-started from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from learner.registry import Registry

_spec = importlib.util.spec_from_file_location("sweep", Path(__file__).resolve().parent.parent / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "hone.db")
    yield r
    r.close()


def test_a_cycle_built_its_pairs_after_labelling_collecting_and_exploring(registry: Registry) -> None:
    cid = registry.start_cycle("manual")
    registry.finish_cycle(cid, "rejected", timings={"label": 1.0, "collect": 2.0, "explore": 30.0, "pairs": 4.0,
                                                    "train": 100.0})
    started = registry.get_cycle(cid)["started_at"]
    assert sweep.cycle_pairs_time(registry, cid) == pytest.approx(started + 33.0 + 0.5)


def test_operator_trials_run_before_the_pairs_too(registry: Registry) -> None:
    cid = registry.start_cycle("manual")
    registry.finish_cycle(cid, "promoted", timings={"label": 1.0, "collect": 2.0, "explore": 30.0, "trials": 40.0,
                                                    "pairs": 4.0, "retain": 0.1, "train": 100.0})
    started = registry.get_cycle(cid)["started_at"]
    assert sweep.cycle_pairs_time(registry, cid) == pytest.approx(started + 73.0 + 0.5)


def test_a_cycle_that_never_built_pairs_or_does_not_exist_is_an_error(registry: Registry) -> None:
    cid = registry.start_cycle("manual")
    registry.finish_cycle(cid, "skipped", timings={"label": 1.0, "collect": 2.0})
    with pytest.raises(LookupError, match="never built pairs"):
        sweep.cycle_pairs_time(registry, cid)
    with pytest.raises(LookupError, match="no cycle 7"):
        sweep.cycle_pairs_time(registry, 7)


def test_the_parent_is_this_homes_copy_when_it_has_one(registry: Registry, tmp_path: Path) -> None:
    original = tmp_path / "elsewhere" / "hone-v1"
    registry.add_adapter("hone-v1", original, parent=None, cycle_id=None, train={})
    adapters = tmp_path / "adapters"
    assert sweep.adapter_dir_of(registry, adapters, "hone-v1") == str(original)  # no copy here: the recorded path
    (adapters / "hone-v1").mkdir(parents=True)
    (adapters / "hone-v1" / "adapter_config.json").write_text("{}")
    assert sweep.adapter_dir_of(registry, adapters, "hone-v1") == str(adapters / "hone-v1")
    with pytest.raises(LookupError, match="no adapter 'hone-v9'"):
        sweep.adapter_dir_of(registry, adapters, "hone-v9")


def test_tasks_are_kept_by_how_serving_did_not_by_what_exploration_found() -> None:
    def row(source: str, label: str) -> dict:
        return {"source": source, "label": label}
    groups = sweep.Groups(train={
        "fixed": [row("exploration", "success"), row("serve", "failure")],
        "kept": [row("exploration", "failure"), row("serve", "success"), row("serve", "failure")],
        "unserved": [row("exploration", "success"), row("exploration", "failure")],
    }, validation={"v": [row("serve", "success")]})
    assert sweep.served_outcome(groups.train["kept"]) == "solved"
    assert sweep.served_outcome(groups.train["unserved"]) is None
    assert list(sweep.keep_tasks(groups, "failed").train) == ["fixed"]
    assert list(sweep.keep_tasks(groups, "solved").train) == ["kept"]
    assert sweep.keep_tasks(groups, "all") is groups
    assert sweep.keep_tasks(groups, "failed").validation == groups.validation


def test_new_tasks_are_those_first_logged_after_the_cutoff() -> None:
    groups = sweep.Groups(train={"old": [{"created_at": 20.0}, {"created_at": 5.0}], "new": [{"created_at": 12.0}]},
                          validation={"v": [{"created_at": 1.0}]})
    kept = sweep.keep_new(groups, 10.0)
    assert list(kept.train) == ["new"] and kept.validation == groups.validation  # "old" was seen at 5.0
