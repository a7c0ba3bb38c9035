"""The gate: a candidate serves only if it does at least as well as what serves now on held-out tasks.

Both sides run the same validation tasks through the real agent, greedily (temperature 0), with the
adapter forced per run. Promote if candidate_rate >= current_rate + margin. Validation tasks come
from the held-out split of logged traffic plus an optional task file (`gate_tasks_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.engine import Engine

from .probe import check_adapter_files
from .runner import AgentRunner
from .tasks import Task


async def check_candidate(engine: Engine, version: str, path: str | Path, *, max_rank: int | None = None) -> str | None:
    """Why the candidate must not serve (NaN, corrupt, garbage, or vLLM refuses it), or None once it is
    loaded under its own name, ready for the gate."""
    reason = check_adapter_files(path, max_rank=max_rank)
    if reason is not None:
        return reason
    try:
        await engine.load_adapter(version, path)
    except Exception as e:
        return f"vLLM could not load it: {e}"
    return None


async def run_gate(runner: AgentRunner, tasks: list[Task], *, candidate: str, current: str | None,
                   cycle_id: int, margin: float, on_done=None) -> dict[str, Any]:
    sides = {"candidate": candidate, "current": current or "base"}
    jobs = [
        dict(task=t, source="gate", namespace=f"gate-c{cycle_id}-{side}-{i}", adapter=version, temperature=0.0,
             extra_metadata={"cycle_id": cycle_id, "gate_side": side})
        for side, version in sides.items() for i, t in enumerate(tasks)
    ]
    attempts = await runner.attempt_all(jobs, on_done=on_done)
    n = len(tasks)
    cand = attempts[:n]
    cur = attempts[n:]
    cand_rate = sum(a.success for a in cand) / n
    cur_rate = sum(a.success for a in cur) / n
    return {
        "n_tasks": n, "candidate": candidate, "current": sides["current"],
        "candidate_rate": cand_rate, "current_rate": cur_rate, "margin": margin,
        "candidate_successes": sum(a.success for a in cand), "current_successes": sum(a.success for a in cur),
        "promote": cand_rate >= cur_rate + margin,
    }
