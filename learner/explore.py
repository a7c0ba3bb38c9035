"""Exploration, trial-and-error style (ETO): a training task whose attempts all failed (or all
succeeded) teaches DPO nothing. Re-run it with sampling, through the real agent and the current
adapter, so that some attempts succeed and some fail; the verifier labels them and the next
pairing step finds the contrast.

Operator trials (`explore_operator_trials`), a second round after the free samples: free sampling
almost never tries what the model rarely does. After cycle 1 most failures are the right numbers under
the wrong operation, and free sampling solved a division task about 1 time in 20 (16 division tasks,
64 runs, 3 successes), where a `/` trial solved 9 of 13. A trial's first model call may only call the
calculator as `a op b` for one `op` (vLLM enforces a strict function's argument schema while
sampling); the model still picks whether to call, the numbers, and everything after, and the
verifier decides which operation was right. Two kinds of numerically checked task get trials:

- every run failed: one trial per operation, to find the operation the model misses ("/ over *");
- the model solved it with `a X b`: one trial per other operation. The failed ones are the reverse
  directions ("* over /") that learner/pairs.py needs to keep the first kind's pairs balanced:
  trained alone, 9 "/ over *" pairs taught "never multiply" (x 21 -> 1 of 26 held-out,
  docs/benchmarks.md).

Trials replacing the free samples (the first design) made no difference at cycle 2: one trial per
operation gives a word problem one chance at the right operation where free sampling gives it four."""

from __future__ import annotations

import copy
from typing import Any

from runtime.prompts import routed_example
from runtime.store import TrajectoryStore

from tools.specs import CALCULATOR, TOOL_SPECS

from .checks import default_check
from .labels import SUCCESS
from .pairs import Groups, first_operation, in_turn
from .runner import AgentRunner, Attempt
from .tasks import Task, task_from_trajectory

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
    """A single-turn, numerically checked task that starts with empty storage and does not name another
    tool. A run that found data in storage is a recall ("Get gym_pin from storage. What is my gym PIN?"):
    its number is looked up, not calculated (trials replaying run 30's cycle 2 spent 48 of 256 runs on
    recalls before this). A question that names the python or storage tool ("Use Python to count the
    primes below 8500") asks for that tool: a calculator trial that won would teach leaving it out."""
    if (task.check or default_check(task.expected)) != "numeric" or task.turns or task.storage:
        return False
    asked = next((m.get("content") for m in reversed(task.messages) if m.get("role") == "user"), None)
    return routed_example(asked if isinstance(asked, str) else None) is None


def plan(tasks: list[tuple[Task, int]], *, attempts: int, budget: int) -> list[tuple[Task, str | None]]:
    """(task, None): `attempts` free samples per task, in the given priority order, until the budget."""
    return [(t, None) for t, _n in tasks for _ in range(attempts)][:budget]


def trial_plan(groups: Groups, store: TrajectoryStore, *, budget: int) -> list[tuple[Task, str]]:
    """(task, operation): trials for the numeric training tasks that every run failed (each operation)
    and for those the model solved with one operation (each other one), the two kinds in turn and each
    in hash order, until the budget. A task already tried under an operation is not tried again."""
    failed: list[tuple[Task, list[str]]] = []
    solved: list[tuple[Task, list[str]]] = []
    for rows in groups.train.values():
        task = next((t for t in map(task_from_trajectory, rows) if t is not None), None)
        if task is None or not numeric(task):
            continue
        runs = [(row["label"], traj) for row in rows if (traj := store.get(row["id"])) is not None]
        if any((traj.get("metadata") or {}).get("explore_operation") for _, traj in runs):
            continue
        own_wins = {first_operation(traj) for label, traj in runs if label == SUCCESS}
        if not own_wins:
            failed.append((task, list(OPERATIONS)))
        elif len(own_wins) == 1 and None not in own_wins:
            solved.append((task, [op for op in OPERATIONS if op not in own_wins]))
    return [(t, op) for t, ops in in_turn(failed, solved, key=lambda x: x[0].key) for op in ops][:budget]


async def explore(runner: AgentRunner, planned: list[tuple[Task, str | None]], *, cycle_id: int,
                  prefix: str = "explore", on_done=None) -> dict[str, Any]:
    """Run the planned free samples and trials; counts are named `{prefix}_...`."""
    s = runner.settings
    narrowed = {op: operation_tools(op) for op in OPERATIONS}  # built once, shared read-only by the runs
    jobs = [
        dict(task=t, source="exploration", namespace=f"{prefix}-c{cycle_id}-{i}", adapter=None,
             temperature=s.explore_temperature,
             extra_metadata={"cycle_id": cycle_id, **({"explore_operation": op} if op else {})},
             first_step_tools=narrowed[op] if op else None)
        for i, (t, op) in enumerate(planned)
    ]
    attempts: list[Attempt] = await runner.attempt_all(jobs, on_done=on_done)
    solved = {a.task.key for a in attempts if a.success}
    failed = {a.task.key for a in attempts if not a.success}
    counts = {f"{prefix}_tasks": len({t.key for t, _ in planned}), f"{prefix}_rollouts": len(attempts),
              f"{prefix}_successes": sum(a.success for a in attempts),
              f"{prefix}_new_contrast_tasks": len(solved & failed)}
    if any(op for _, op in planned):
        counts[f"{prefix}_operation_successes"] = {
            op: sum(a.success for a, (_, o) in zip(attempts, planned) if o == op) for op in OPERATIONS}
    return counts
