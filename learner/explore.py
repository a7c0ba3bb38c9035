"""Exploration, trial-and-error style (ETO): a training task whose attempts all failed (or all
succeeded) teaches DPO nothing. Re-run it with sampling, through the real agent and the current
adapter, so that some attempts succeed and some fail; the verifier labels them and the next
pairing step finds the contrast.

Operator trials (`explore_operator_trials`): free sampling almost never tries what the model rarely
does. After cycle 1 most failures are the right numbers under the wrong operation, and the explorer
wrote `/` in 1 to 7 of 176 calculator calls, so no pair ever had a division on its chosen side
(docs/benchmarks.md, "What the plateau is made of"). A numerically checked task is instead tried
once per operation: each run's first model call may only call the calculator as `a op b` for one
`op` (vLLM enforces a strict function's argument schema while sampling); the model still picks
whether to call, the numbers, and everything after. The verifier decides which operation was right."""

from __future__ import annotations

import copy
from typing import Any

from tools.specs import CALCULATOR, TOOL_SPECS

from .checks import default_check
from .runner import AgentRunner, Attempt
from .tasks import Task

OPERATIONS = ("+", "-", "*", "/")
# Bounded digits: an unbounded number lets a sampled run write digits until max_tokens.
_NUMBER = r"\d{1,9}(,\d{3})*(\.\d{1,6})?"


def operation_tools(operation: str) -> list[dict[str, Any]]:
    """The agent's tool specs with the calculator's expression narrowed to `a <operation> b`."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {' '.join(OPERATIONS)}, got {operation!r}")
    specs = copy.deepcopy(TOOL_SPECS)
    calc = next(s["function"] for s in specs if s["function"]["name"] == CALCULATOR)
    calc["parameters"]["properties"]["expression"]["pattern"] = rf"^{_NUMBER} ?\{operation} ?{_NUMBER}$"
    return specs


def numeric(task: Task) -> bool:
    """A single-turn, numerically checked task that starts with empty storage. A run that found data
    in storage is a recall ("Get gym_pin from storage. What is my gym PIN?"): its number is looked up,
    not calculated (trials replaying run 30's cycle 2 spent 48 of 256 runs on recalls before this)."""
    return (task.check or default_check(task.expected)) == "numeric" and not task.turns and not task.storage


def plan(tasks: list[tuple[Task, int]], *, attempts: int, budget: int,
         operator_trials: bool = False) -> list[tuple[Task, str | None]]:
    """(task, operation or None for a free sample): `attempts` free samples per task, or with
    `operator_trials` one trial per operation for numerically checked tasks, in the given priority
    order, until the budget is spent."""
    out: list[tuple[Task, str | None]] = []
    for task, _n in tasks:
        runs: list[str | None] = list(OPERATIONS) if operator_trials and numeric(task) else [None] * attempts
        runs = runs[: budget - len(out)]
        if not runs:
            break
        out.extend((task, op) for op in runs)
    return out


async def explore(runner: AgentRunner, tasks: list[tuple[Task, int]], *, cycle_id: int, on_done=None) -> dict[str, Any]:
    s = runner.settings
    planned = plan(tasks, attempts=s.explore_attempts, budget=s.explore_budget,
                   operator_trials=s.explore_operator_trials)
    narrowed = {op: operation_tools(op) for op in OPERATIONS}  # built once, shared read-only by the runs
    jobs = [
        dict(task=t, source="exploration", namespace=f"explore-c{cycle_id}-{i}", adapter=None,
             temperature=s.explore_temperature,
             extra_metadata={"cycle_id": cycle_id, **({"explore_operation": op} if op else {})},
             first_step_tools=narrowed[op] if op else None)
        for i, (t, op) in enumerate(planned)
    ]
    attempts: list[Attempt] = await runner.attempt_all(jobs, on_done=on_done)
    solved = {a.task.key for a in attempts if a.success}
    failed = {a.task.key for a in attempts if not a.success}
    counts = {"explore_tasks": len({t.key for t, _ in planned}), "explore_rollouts": len(attempts),
              "explore_successes": sum(a.success for a in attempts),
              "explore_new_contrast_tasks": len(solved & failed)}
    if any(op for _, op in planned):
        counts["explore_operation_successes"] = {
            op: sum(a.success for a, (_, o) in zip(attempts, planned) if o == op) for op in OPERATIONS}
    return counts
