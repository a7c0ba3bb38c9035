"""Exploration, trial-and-error style (ETO): a training task whose attempts all failed (or all
succeeded) teaches DPO nothing. Re-run it with sampling, through the real agent and the current
adapter, so that some attempts succeed and some fail; the verifier labels them and the next
pairing step finds the contrast."""

from __future__ import annotations

from typing import Any

from .runner import AgentRunner, Attempt
from .tasks import Task


def plan(tasks: list[tuple[Task, int]], *, attempts: int, budget: int) -> list[Task]:
    """`attempts` re-runs per task, in the given priority order, until the budget is spent."""
    out: list[Task] = []
    for task, _n in tasks:
        take = min(attempts, budget - len(out))
        if take <= 0:
            break
        out.extend([task] * take)
    return out


async def explore(runner: AgentRunner, tasks: list[tuple[Task, int]], *, cycle_id: int, on_done=None) -> dict[str, Any]:
    s = runner.settings
    planned = plan(tasks, attempts=s.explore_attempts, budget=s.explore_budget)
    jobs = [
        dict(task=t, source="exploration", namespace=f"explore-c{cycle_id}-{i}", adapter=None,
             temperature=s.explore_temperature, extra_metadata={"cycle_id": cycle_id})
        for i, t in enumerate(planned)
    ]
    attempts: list[Attempt] = await runner.attempt_all(jobs, on_done=on_done)
    solved = {a.task.key for a in attempts if a.success}
    failed = {a.task.key for a in attempts if not a.success}
    return {"explore_tasks": len({t.key for t in planned}), "explore_rollouts": len(attempts),
            "explore_successes": sum(a.success for a in attempts),
            "explore_new_contrast_tasks": len(solved & failed)}
