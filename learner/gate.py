"""The gate: a candidate serves only if it does at least as well as what serves now on held-out tasks.

Both sides run the same validation tasks through the real agent, greedily (temperature 0), with the
adapter forced per run. Promote if candidate_rate >= current_rate + margin and, when `max_p` < 1, the
task-by-task difference is that unlikely under chance (exact McNemar p <= max_p). Validation tasks come
from the held-out split of logged traffic plus an optional task file (`gate_tasks_file`).

What serves now was measured on these tasks before: as the candidate of the gate that promoted it
(or, for the base model, as the current side of an earlier gate). Its per-task results are kept in
the cycle records, with each task's fingerprint, and reused (`gate_reuse`) while the task is
unchanged, so a gate runs only the candidate and any task the current side has not run yet: half the cost, which buys a gate big enough to decide (a 48-task gate
rejected a candidate that a 200-task pool of the same distribution rated better; docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.engine import Engine
from runtime.evals import paired

from .probe import check_adapter_files
from .runner import AgentRunner
from .tasks import Task, fingerprint


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
                   cycle_id: int, margin: float, max_p: float = 1.0, known_current: dict[str, bool] | None = None,
                   on_done=None, kind: str = "gate") -> dict[str, Any]:
    """`kind` ("gate", "guard") is the runs' logged source and names their storage namespaces: two sets
    of runs in one cycle must not share a namespace.
    `known_current`: task key -> success of the current side, measured earlier; those tasks are
    not run again for it. `max_p` < 1 also asks for evidence: both adapters the loop promoted that
    then scored below their parent on unseen tasks had won their gates at p = 0.41 (docs/benchmarks.md)."""
    tasks = list({t.key: t for t in tasks}.values())  # a task in both the split and the file runs once
    sides = {"candidate": candidate, "current": current or "base"}
    known = {t.key: known_current[t.key] for t in tasks if known_current and t.key in known_current}
    jobs = [
        dict(task=t, source=kind, namespace=f"{kind}-c{cycle_id}-{side}-{i}", adapter=version, temperature=0.0,
             extra_metadata={"cycle_id": cycle_id, "gate_side": side})
        for side, version in sides.items() for i, t in enumerate(tasks)
        if not (side == "current" and t.key in known)
    ]
    attempts = await runner.attempt_all(jobs, on_done=on_done)
    results: dict[str, dict[str, bool]] = {"candidate": {}, "current": dict(known)}
    for job, a in zip(jobs, attempts):
        results[job["extra_metadata"]["gate_side"]][job["task"].key] = a.success
    n = len(tasks)
    cand, cur = results["candidate"], results["current"]
    cand_successes, cur_successes = sum(cand.values()), sum(cur.values())
    # Task by task too: the rates alone cannot tell "fixed 2, broke 0" from "fixed 11, broke 9".
    diff = paired(cur, cand)
    gate = {
        "n_tasks": n, "candidate": candidate, "current": sides["current"],
        "candidate_rate": cand_successes / n, "current_rate": cur_successes / n, "margin": margin, "max_p": max_p,
        "candidate_successes": cand_successes, "current_successes": cur_successes,
        "current_reused": len(known), "fixed": diff["fixed"], "broken": diff["broken"], "p_value": diff["p_value"],
        "results": results, "fingerprints": {t.key: fingerprint(t) for t in tasks},
    }
    gate["promote"] = rate_ok(gate) and convincing(diff["p_value"], max_p)
    return gate


async def run_gates(runner: AgentRunner, tasks: list[Task], *, candidates: list[str], current: str | None,
                    cycle_id: int, margin: float, max_p: float = 1.0, known_current: dict[str, bool] | None = None,
                    on_done=None) -> dict[str, dict[str, Any]]:
    """`run_gate` for each candidate, in order; what serves now runs each task once, the later
    candidates reuse its results."""
    gates: dict[str, dict[str, Any]] = {}
    known = dict(known_current or {})
    for name in candidates:
        gates[name] = await run_gate(runner, tasks, candidate=name, current=current, cycle_id=cycle_id,
                                     margin=margin, max_p=max_p, known_current=known, on_done=on_done)
        known.update(gates[name]["results"]["current"])
    return gates


def rate_ok(gate: dict[str, Any]) -> bool:
    """The gate's own kind of task did not get worse: candidate rate >= current rate + margin."""
    return gate["candidate_rate"] >= gate["current_rate"] + gate["margin"]


def convincing(p_value: float, max_p: float) -> bool:
    """The task-by-task difference is unlikely by chance (max_p 1.0: not asked)."""
    return max_p >= 1.0 or p_value <= max_p


def pooled(gate: dict[str, Any], guard: dict[str, Any]) -> dict[str, Any]:
    """One McNemar test over the gate's and the guard's tasks together (`gate_pool_guard`), so a gain
    on storage counts as evidence as much as one on arithmetic; the "no kind gets worse" rules stay
    (`rate_ok` for the gate, `guard["worse"]` per guard kind). Promote if both hold and p <= max_p."""
    before, after = {}, {}
    for name, g in (("gate", gate), ("guard", guard)):
        before.update({f"{name}:{k}": v for k, v in g["results"]["current"].items()})
        after.update({f"{name}:{k}": v for k, v in g["results"]["candidate"].items()})
    diff = paired(before, after)
    max_p = gate["max_p"]
    return {"n": diff["n"], "fixed": diff["fixed"], "broken": diff["broken"], "p_value": diff["p_value"],
            "max_p": max_p, "promote": rate_ok(gate) and not guard["worse"] and convincing(diff["p_value"], max_p)}


def best_candidate(gates: dict[str, dict[str, Any]]) -> str:
    """The candidate with the most gate successes; on a tie, the one gated first (the final epoch's)."""
    return max(gates, key=lambda name: (gates[name]["candidate_successes"], -list(gates).index(name)))


def recorded_results(cycles: list[dict[str, Any]], version: str, model: str, tasks: list[Task]) -> dict[str, bool]:
    """Per-task gate results of `version` ("base" for no adapter) on `model` for `tasks`, from cycle
    records (newest first; the newest result of a task wins). A result counts only if it was recorded
    for the same task, not merely the same key: same question(s), expected answer and check (records
    without fingerprints, from before they were kept, do not count)."""
    want = {t.key: fingerprint(t) for t in tasks}
    out: dict[str, bool] = {}
    for c in cycles:
        for gate in (c.get("gate") or {}, (c.get("gate") or {}).get("guard") or {}):
            if gate.get("model") != model or "results" not in gate:
                continue
            prints = gate.get("fingerprints") or {}
            for side in ("candidate", "current"):
                if gate.get(side) == version:
                    for key, ok in gate["results"].get(side, {}).items():
                        if key in want and prints.get(key) == want[key]:
                            out.setdefault(key, bool(ok))
    return out


def guard_counts(guard: dict[str, Any], unnamed: str = "all") -> dict[str, dict[str, int]]:
    """Successes per kind of guard task; a guard recorded before per-kind counts (run 23) as one kind."""
    return guard.get("groups") or {unnamed: {"n": guard["n_tasks"], "candidate_successes": guard["candidate_successes"],
                                             "current_successes": guard["current_successes"]}}


async def run_guard(runner: AgentRunner, tasks: list[Task], *, candidate: str, current: str | None, cycle_id: int,
                    known_current: dict[str, bool] | None = None, on_done=None) -> dict[str, Any]:
    """The guard: other kinds of task (`gate_guard_file`) on which the candidate must solve at least as
    many as what serves now, in every group (the tasks' `type`): a gain on storage must not pay for a
    loss on python. No margin and no p-value: the issue's rule is "never worse than the parent", and a
    gate that decides on arithmetic alone let a storage loss through (docs/benchmarks.md, run 21)."""
    guard = await run_gate(runner, tasks, candidate=candidate, current=current, cycle_id=cycle_id, margin=0.0,
                           known_current=known_current, on_done=on_done, kind="guard")
    groups: dict[str, dict[str, int]] = {}
    for t in {t.key: t for t in tasks}.values():
        g = groups.setdefault(t.group or "default", {"n": 0, "candidate_successes": 0, "current_successes": 0})
        g["n"] += 1
        g["candidate_successes"] += guard["results"]["candidate"][t.key]
        g["current_successes"] += guard["results"]["current"][t.key]
    guard["groups"] = dict(sorted(groups.items()))
    guard["worse"] = [name for name, g in guard["groups"].items() if g["candidate_successes"] < g["current_successes"]]
    guard["promote"] = not guard["worse"]
    return guard
