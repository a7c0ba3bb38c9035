"""Runs to retain: what serves now did with a tool that none of the cycle's pairs uses.

DPO moves the policy everywhere, not only on the pairs' tasks. Run 32's hone-v2, trained on
calculator and storage pairs, wrote calculator-style one-liners in its python calls (`2**158`,
`gcd(528, 396, 324)`, `bin(974121502) # 974121502`; 3 of its 43 python calls printed, against
14 of the base's 25) and lost the python suite's one solved task. Nothing in its pairs spoke for
or against python: no pair used it. A cycle with no evidence about a tool should leave that tool
alone.

With `dpo_retain_weight > 0` the trainer adds the NLL of these runs' generated tokens, under the
policy, to the loss (learner/train.py): the serving model's own behaviour on the tools the pairs
leave out is kept likely, the way a KL penalty on a retain set keeps a fine-tune close to its
start. Only runs served by the adapter that serves now (the policy's warm start) are retained, so
the anchor is the parent's behaviour, not an older adapter's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runtime.store import TrajectoryStore

from .pairs import Groups
from .sequences import SequenceError, trajectory_sequence
from .types import Pair, TokenSequence


@dataclass
class RetainSet:
    runs: list[TokenSequence]
    tools: dict[str, int] = field(default_factory=dict)  # tool -> runs retained that called it
    excluded: dict[str, int] = field(default_factory=dict)  # drift, render, ...


def tools_called(traj: dict[str, Any]) -> frozenset[str]:
    """The tools the model called in this run (its own generated steps only, not the worked examples)."""
    names = set()
    for m in traj.get("messages", []):
        if m.get("role") != "assistant" or not m.get("generated"):
            continue
        calls = m.get("tool_calls") or []
        if isinstance(calls, str):
            try:
                calls = json.loads(calls)
            except ValueError:
                continue
        for call in calls:
            name = (call.get("function") or call).get("name") if isinstance(call, dict) else None
            if isinstance(name, str):
                names.add(name)
    return frozenset(names)


def pair_tools(store: TrajectoryStore, pairs: Iterable[Pair]) -> frozenset[str]:
    """Every tool called in a chosen or a rejected run of these pairs."""
    ids = {s.trajectory_id for p in pairs for s in (p.chosen, p.rejected) if s.trajectory_id}
    return frozenset().union(*(tools_called(t) for i in sorted(ids) if (t := store.get(i)) is not None))


def retain_runs(store: TrajectoryStore, groups: Groups, pairs: list[Pair], *, serving: str | None, limit: int,
                model_dir: Any = None, on_drift: str = "trim") -> RetainSet:
    """Up to `limit` served training runs, newest first and one per task, that called only tools no
    pair calls, served by `serving` (an adapter name; None = the base model)."""
    trained = pair_tools(store, pairs)
    out = RetainSet([])
    if limit <= 0:
        return out
    excluded: dict[str, int] = {}
    newest_first = sorted(((rows[0]["id"], rows) for rows in groups.train.values()), reverse=True)
    for _, rows in newest_first:
        for row in rows:  # newest first: the task's latest served run by what serves now
            if row["source"] != "serve":
                continue
            traj = store.get(row["id"])
            if traj is None or traj.get("adapter") != serving:
                continue
            tools = tools_called(traj)
            if not tools or tools & trained:
                break  # this task's latest run speaks for a trained tool (or for none): not retained
            try:
                seq = trajectory_sequence(traj, model_dir=model_dir, on_drift=on_drift)
            except SequenceError as e:
                excluded[e.kind] = excluded.get(e.kind, 0) + 1
                break
            out.runs.append(seq)
            for name in tools:
                out.tools[name] = out.tools.get(name, 0) + 1
            break
        if len(out.runs) >= limit:
            break
    out.excluded = excluded
    return out
