"""Operator trials after free sampling, on a real SQLite log: which tasks get which trials
(learner/explore.py: trial_plan), and how a solved task's failed trials even out the directions the
never-solved tasks' trials bring (learner/pairs.py: reserve pairs)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from learner.explore import OPERATIONS, trial_plan
from learner.pairs import build_pairs, collect, first_operation
from runtime.store import TrajectoryStore
from tests.test_pairs import VAL, Log, calc, ids_of, keys, prepared_test_model


@pytest.fixture
def log(tmp_path: Path):
    with TrajectoryStore(tmp_path / "hone.db") as store:
        lg = Log(store, tmp_path / "hone.db")
        yield lg
        lg.close()


def test_trials_go_to_the_never_solved_and_to_the_other_operations_of_the_solved(log: Log) -> None:
    never, by_times, two_ways, by_python, tried, words, asks_python = keys("train", 7)
    log.run(never, False, call=calc("12 * 4"))
    log.run(never, False, call=calc("12 + 4"))
    log.run(by_times, True, call=calc("6 * 7"))
    log.run(by_times, False, call=calc("6 + 7"))
    log.run(two_ways, True, call=calc("6 * 7"))
    log.run(two_ways, True, call=calc("7 * 6 "))  # same operator written another way: still one
    log.run(two_ways, True, call=calc("84 / 2"))  # two operations solved it: no wrong one to show
    log.run(by_python, True)  # solved with python: no operator to compare against
    log.run(tried, False, call=calc("1 + 1"))
    log.run(tried, False, call=calc("8 - 2"), explore_operation="-", cycle_id=1)  # tried in an earlier cycle
    log.run(words, False, expected="Paris")
    log.run(asks_python, False, question="Use Python to count the primes below 8500.")  # wants that tool
    log.label()
    groups = collect(log.db, val_fraction=VAL)

    planned = trial_plan(groups, log.store, budget=100)
    by_task = collections.defaultdict(list)
    for task, op in planned:
        by_task[task.key].append(op)
    assert dict(by_task) == {never: list(OPERATIONS), by_times: ["+", "-", "/"]}
    assert len(trial_plan(groups, log.store, budget=5)) == 5
    assert trial_plan(groups, log.store, budget=0) == []


def test_a_solved_tasks_failed_trial_evens_out_what_the_never_solved_tasks_trials_bring(log: Log) -> None:
    model_dir = prepared_test_model()
    div1, div2, times, times_only = keys("train", 4)
    made: dict[str, list[str]] = {}
    for k in (div1, div2):  # the model multiplied; the "/" trial solved it: "/ over *"
        made[k] = [log.run(k, False, call=calc("12 * 4")),
                   log.run(k, True, call=calc("12 / 4"), explore_operation="/"),
                   log.run(k, False, call=calc("12 - 4"), explore_operation="-")]
    # solved with "*" and failed with "+" on its own ("* over +", which nothing reverses); its failed
    # trials are the reserve: "* over /" is the direction most behind
    made[times] = [log.run(times, True, call=calc("3 * 4")), log.run(times, False, call=calc("3 + 4")),
                   *(log.run(times, False, call=calc(f"3 {op} 4"), explore_operation=op) for op in "+-/")]
    # solved every time on its own: its only failure is a trial, so its own pair is already "* over /"
    made[times_only] = [log.run(times_only, True, call=calc("5 * 2")),
                        log.run(times_only, False, call=calc("5 / 2"), explore_operation="/")]
    log.label()
    groups = collect(log.db, val_fraction=VAL)

    plain = build_pairs(log.store, groups, per_task=1, max_pairs=10, model_dir=model_dir)
    assert sorted(ids_of(plain.pairs)) == sorted([(made[div1][1], made[div1][0]), (made[div2][1], made[div2][0]),
                                                  (made[times][0], made[times][1]),
                                                  (made[times_only][0], made[times_only][1])])
    assert plain.reserve_added == 0

    built = build_pairs(log.store, groups, per_task=1, max_pairs=10, model_dir=model_dir, balance_operations=True)
    assert sorted(ids_of(built.pairs)) == sorted([(made[div1][1], made[div1][0]), (made[div2][1], made[div2][0]),
                                                  (made[times][0], made[times][4]),  # own "*" over the "/" trial
                                                  (made[times_only][0], made[times_only][1])])
    assert built.reserve_added == 1 and built.unbalanced == 1  # "* over +" had no reverse

    def direction(pair) -> str:
        return " over ".join(first_operation(log.store.get(q.trajectory_id)) for q in (pair.chosen, pair.rejected))
    assert collections.Counter(map(direction, built.pairs)) == {"/ over *": 2, "* over /": 2}

    # a cut that would leave "/ over *" without its reverse is balanced again
    cut = build_pairs(log.store, groups, per_task=1, max_pairs=3, model_dir=model_dir, balance_operations=True)
    directions = collections.Counter(map(direction, cut.pairs))
    assert directions["/ over *"] == directions["* over /"] and len(cut.pairs) == 2
