"""Exploration planning and operator trials' narrowed calculator (pure logic; the real-vLLM check
that the narrowing holds while sampling is in tests/test_learner_integration.py)."""

from __future__ import annotations

import asyncio
import re

import pytest

from learner.explore import OPERATIONS, explore, numeric, operation_tools, plan
from learner.runner import Attempt
from learner.tasks import Task, Turn
from tools.specs import TOOL_SPECS


def task(key: str, expected, check: str | None = None, **kw) -> Task:
    return Task(key, ({"role": "user", "content": key},), expected, check, **kw)


def expression_pattern(specs: list[dict]) -> str:
    calc = next(s["function"] for s in specs if s["function"]["name"] == "calculator")
    return calc["parameters"]["properties"]["expression"]["pattern"]


@pytest.mark.parametrize("op, good, bad", [
    ("/", ["12 / 4", "1,200/3", "7.5 / 2.25"], ["12 * 4", "(12 / 4)", "12 / 4 / 2", "x / 2", "12 /", "1" * 10 + " / 2"]),
    ("-", ["9 - 5", "10-2"], ["9 + 5", "-9 - 5", "9 - -5"]),
    ("+", ["3 + 4"], ["3 + 4 + 5", "3 - 4"]),
    ("*", ["8 * 2"], ["8 ** 2", "8 x 2"]),
])
def test_an_operation_trial_allows_exactly_a_op_b(op: str, good: list[str], bad: list[str]) -> None:
    pattern = re.compile(expression_pattern(operation_tools(op)))
    assert all(pattern.fullmatch(e) for e in good), good
    assert not any(pattern.fullmatch(e) for e in bad), bad


def test_operation_tools_leave_the_agents_specs_and_other_tools_alone() -> None:
    specs = operation_tools("/")
    assert "pattern" not in str(TOOL_SPECS)
    assert [s["function"]["name"] for s in specs] == [s["function"]["name"] for s in TOOL_SPECS]
    assert [s for s in specs if s["function"]["name"] != "calculator"] == \
        [s for s in TOOL_SPECS if s["function"]["name"] != "calculator"]
    with pytest.raises(ValueError, match="operation must be one of"):
        operation_tools("%")


def test_numeric_tasks_are_the_single_turn_numerically_checked_ones_with_empty_storage() -> None:
    assert numeric(task("a", 42)) and numeric(task("b", "1,234")) and numeric(task("c", "7", "numeric"))
    assert not numeric(task("d", "Paris")) and not numeric(task("e", "42", "exact"))
    assert not numeric(Task("f", (), 42, turns=(Turn("remember 42"), Turn("what was it?"))))
    recall = Task("g", ({"role": "user", "content": "Get gym_pin from storage. What is my gym PIN?"},), 7745,
                  storage={"gym_pin": "7745"})
    assert not numeric(recall)


def test_plan_free_samples_until_the_budget() -> None:
    a, b, c = task("a", 1), task("b", 2), task("c", 3)
    got = plan([(a, 1), (b, 1), (c, 1)], attempts=2, budget=5)
    assert got == [(a, None), (a, None), (b, None), (b, None), (c, None)]
    assert plan([(a, 1)], attempts=2, budget=0) == []


class RecordingRunner:
    """Stands in for AgentRunner: division solves task a, nothing solves the word task."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.jobs: list[dict] = []

    async def attempt_all(self, jobs, *, on_done=None):
        self.jobs = list(jobs)
        return [Attempt(j["task"], None, "ok", "", j["extra_metadata"].get("explore_operation") == "/", 2) for j in jobs]


def test_explore_sends_each_trial_its_narrowed_tools_and_marks_it(settings) -> None:
    runner = RecordingRunner(settings)
    a, words = task("a", 3), task("w", "Paris")
    planned = [*((a, op) for op in OPERATIONS), (words, None), (words, None)]
    counts = asyncio.run(explore(runner, planned, cycle_id=7, prefix="trial"))  # type: ignore[arg-type]
    trials = [j for j in runner.jobs if j["task"] is a]
    assert [j["extra_metadata"] for j in trials] == [{"cycle_id": 7, "explore_operation": op} for op in OPERATIONS]
    assert [expression_pattern(j["first_step_tools"]) for j in trials] == \
        [expression_pattern(operation_tools(op)) for op in OPERATIONS]
    free = [j for j in runner.jobs if j["task"] is words]
    assert len(free) == 2 and all(j["first_step_tools"] is None and j["extra_metadata"] == {"cycle_id": 7} for j in free)
    assert len({j["namespace"] for j in runner.jobs}) == 6 and all(j["namespace"].startswith("trial-c7-") for j in runner.jobs)
    assert counts["trial_rollouts"] == 6 and counts["trial_new_contrast_tasks"] == 1
    assert counts["trial_operation_successes"] == {"+": 0, "-": 0, "*": 0, "/": 1}
    counts = asyncio.run(explore(runner, [(a, None)], cycle_id=1))  # type: ignore[arg-type]
    assert all(j["first_step_tools"] is None for j in runner.jobs) and "explore_operation_successes" not in counts
    assert counts["explore_rollouts"] == 1
