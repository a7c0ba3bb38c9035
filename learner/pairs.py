"""From labelled trajectories to preference pairs, and the tasks that need exploring.

Attempts are grouped by task key (learner.tasks). In a training task with both a success and a
failure, each success is paired with each failure (chosen, rejected), newest first, at most
`per_task` pairs per task and never the same two generations twice. Gate and eval runs never
become training data; validation tasks never do either.

With `balance_operations`, a pair whose chosen and rejected runs both start with a one-operation
calculator call (`a op b`) with different operations is kept only while its direction ("+ over -")
is no more frequent than the reverse ("- over +"). A cycle trains on a few dozen pairs, and DPO
learns their net operator direction as a rule for every question: run 29's cycle 2 had `+` over `-`
5 times against twice, and its candidate wrote `+` where it had multiplied and subtracted
(docs/benchmarks.md, "What the plateau is made of"). Balanced, the same pairs gave a candidate that
kept every operation and won the gate (87 vs 69 of 200).

Balancing by dropping alone cannot keep a direction that only trials find: the `/` trial solved 9 of
13 division tasks whose free samples had all failed, and all 9 "/ over *" pairs were dropped (no
"* over /" existed); trained anyway, they taught "never multiply" (x 21 -> 1 of 26 held-out). So a
solved task's wrong-operation trials (learner/explore.py) are held in reserve: the model's own
success over a trial that failed under another operator, added only where it evens out a direction
the other pairs lean ("* over /" against "/ over *"), at most one per task.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import sqlite_utils

from runtime.store import TrajectoryStore

from .labels import FAILURE, SUCCESS
from .sequences import SequenceError, trajectory_sequence
from .tasks import Task, is_validation, task_from_trajectory, task_key
from .types import Pair, TokenSequence

T = TypeVar("T")
TRAINING_SOURCES = ("serve", "exploration")
_COLUMNS = "id, task_id, request_key, label, source, thread_id, metadata, request, storage_state, created_at"


@dataclass
class Groups:
    train: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> rows, newest first
    validation: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"train_tasks": len(self.train), "validation_tasks": len(self.validation),
                "labelled_runs": sum(len(v) for v in (*self.train.values(), *self.validation.values()))}


def collect(db: sqlite_utils.Database, *, val_fraction: float, limit: int = 20_000,
            before: float | None = None) -> Groups:
    """Labelled serving and exploration runs, newest first, grouped by task and split.

    `before` (epoch seconds) sees the log as it was then: bench/sweep.py retrains a past cycle's data."""
    when, params = ("", []) if before is None else (" AND created_at < ?", [before])
    cur = db.execute(f"SELECT {_COLUMNS} FROM trajectories WHERE label IS NOT NULL AND source IN "
                     f"({','.join('?' * len(TRAINING_SOURCES))}){when} ORDER BY id DESC LIMIT ?",
                     [*TRAINING_SOURCES, *params, limit])
    names = [d[0] for d in cur.description]
    groups = Groups()
    for values in cur.fetchall():
        row = dict(zip(names, values))
        key = task_key(row)
        side = groups.validation if is_validation(key, val_fraction) else groups.train
        side.setdefault(key, []).append(row)
    return groups


def has_contrast(rows: list[dict[str, Any]]) -> bool:
    labels = {r["label"] for r in rows}
    return SUCCESS in labels and FAILURE in labels


def tasks_to_explore(groups: Groups) -> list[tuple[Task, int]]:
    """Re-runnable training tasks without contrast, with how many runs they have, in the order the
    budget is spent: the least tried first; among those, all-failure and all-success tasks taken in
    turn. A greedily solved task almost always yields a pair (its sampled re-runs fail often), a
    failed one yields a pair only when a sample succeeds (~1 in 3 tasks with 4 samples on the
    default model): taking failures alone left the cheap pairs unexplored (bench loop runs 1-3
    built pairs from only 3-8 tasks per cycle)."""
    by_runs: dict[int, tuple[list[Task], list[Task]]] = {}
    for rows in groups.train.values():
        if has_contrast(rows):
            continue
        task = next((t for t in map(task_from_trajectory, rows) if t is not None), None)
        if task is not None:
            failed, solved = by_runs.setdefault(len(rows), ([], []))
            (failed if all(r["label"] == FAILURE for r in rows) else solved).append(task)
    return [(t, n) for n in sorted(by_runs) for t in in_turn(*by_runs[n], key=lambda t: t.key)]


def in_turn(first: list[T], second: list[T], *, key: Callable[[T], str]) -> list[T]:
    """Both lists in hash order of `key`, taken one from each in turn. Hash order, not key order:
    when a budget runs out, no kind of task (ids sharing a prefix, such as storage-*) is always the
    one left out."""
    a, b = (sorted(xs, key=lambda x: hashlib.sha256(key(x).encode()).hexdigest()) for xs in (first, second))
    return [x for i in range(max(len(a), len(b))) for x in a[i:i + 1] + b[i:i + 1]]


def validation_tasks(groups: Groups) -> list[Task]:
    tasks = [next((t for t in map(task_from_trajectory, rows) if t is not None), None)
             for rows in groups.validation.values()]
    return sorted((t for t in tasks if t is not None), key=lambda t: hashlib.sha256(t.key.encode()).hexdigest())


def _generated(seq: TokenSequence) -> str:
    return hashlib.sha256(json.dumps([i for i, m in zip(seq.ids, seq.mask) if m]).encode()).hexdigest()


@dataclass
class PairSet:
    pairs: list[Pair]
    excluded: dict[str, int]  # why trajectories were left out: drift, no_steps, render
    drift_trimmed: int = 0  # trajectories kept with a retokenized step's tail untrained (learner/sequences.py)
    unbalanced: int = 0  # pairs left out by balance_operations: their operator direction outnumbered its reverse
    reserve_added: int = 0  # wrong-operation trial pairs added to even out a direction (in `pairs`)


ONE_OPERATION = re.compile(r"\s*(\d[\d,]*(?:\.\d+)?)\s*([-+*/])\s*(\d[\d,]*(?:\.\d+)?)\s*")  # a op b


def first_operation(traj: dict[str, Any]) -> str | None:
    """The operator of the run's first model call when that call is the calculator on `a op b`."""
    step = next((m for m in traj.get("messages", []) if m["role"] == "assistant" and m.get("generated")), None)
    calls = (step or {}).get("tool_calls") or []
    if not calls:
        return None
    fn = calls[0].get("function", calls[0])
    if fn.get("name") != "calculator":
        return None
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        return None
    m = ONE_OPERATION.fullmatch(str((args or {}).get("expression", "")))
    return m[2] if m else None


def _direction(p: Pair, operation: dict[str, str | None]) -> tuple[str | None, str | None]:
    return operation.get(p.chosen.trajectory_id or ""), operation.get(p.rejected.trajectory_id or "")


def balance(pairs: list[Pair], operation: dict[str, str | None]) -> list[Pair]:
    """Keep 'a over b' pairs (a != b, both one-operation calculator calls), in the given order, only
    up to the number of 'b over a' pairs; every other pair is kept."""
    direction = functools.partial(_direction, operation=operation)
    available: collections.Counter[tuple[str | None, str | None]] = collections.Counter(map(direction, pairs))
    kept: collections.Counter[tuple[str | None, str | None]] = collections.Counter()
    out = []
    for p in pairs:
        a, b = direction(p)
        if _crosses(a, b):
            if kept[(a, b)] >= available[(b, a)]:
                continue
            kept[(a, b)] += 1
        out.append(p)
    return out


def build_pairs(store: TrajectoryStore, groups: Groups, *, per_task: int, max_pairs: int,
                model_dir: Any = None, on_drift: str = "trim", balance_operations: bool = False) -> PairSet:
    pairs: list[Pair] = []
    reserve: list[list[Pair]] = []  # per task: own success over a failed trial of another operator
    excluded: dict[str, int] = defaultdict(int)
    trimmed = 0
    operation: dict[str, str | None] = {}  # trajectory id -> its first calculator operation
    trials: set[str] = set()
    for key, rows in groups.train.items():
        if not has_contrast(rows):
            continue
        seqs: dict[str, list[TokenSequence]] = {SUCCESS: [], FAILURE: []}
        seen: set[str] = set()
        for row in rows:  # newest first
            traj = store.get(row["id"])
            if traj is None:
                continue
            try:
                seq = trajectory_sequence(traj, model_dir=model_dir, on_drift=on_drift)
            except SequenceError as e:
                excluded[e.kind] += 1
                continue
            trimmed += seq.untrained > 0
            operation[row["id"]] = first_operation(traj)
            digest = _generated(seq)
            if digest in seen:  # the same generation twice adds no information
                excluded["duplicate"] += 1
                continue
            seen.add(digest)
            seqs[row["label"]].append(seq)
            if (traj.get("metadata") or {}).get("explore_operation"):
                trials.add(row["id"])
        # The model's own runs before operator trials (learner/explore.py): a trial that succeeded is
        # worth most against what the model did unprompted, not against another forced operation.
        good, bad = (sorted(seqs[label], key=lambda q: q.trajectory_id in trials) for label in (SUCCESS, FAILURE))
        # Newest pairs first, spread over both sides rather than one success against every failure.
        order = sorted(itertools.product(range(len(good)), range(len(bad))), key=sum)[:per_task]
        pairs.extend(Pair(good[i], bad[j], key) for i, j in order)
        used = {(good[i].trajectory_id, bad[j].trajectory_id) for i, j in order}
        reserve.append([Pair(g, b, key) for g in good if g.trajectory_id not in trials
                        for b in bad if b.trajectory_id in trials and (g.trajectory_id, b.trajectory_id) not in used
                        and _crosses(operation[g.trajectory_id], operation[b.trajectory_id])])
    newest_first = lambda p: max(p.chosen.trajectory_id or "", p.rejected.trajectory_id or "")  # noqa: E731
    pairs.sort(key=newest_first, reverse=True)
    if not balance_operations:
        return PairSet(pairs[:max_pairs], dict(excluded), trimmed)
    added = even_out(pairs, reserve, operation)
    pairs = sorted(pairs + added, key=newest_first, reverse=True)
    reserve_ids = frozenset(id(p) for p in added)
    balanced = balance(pairs, operation)
    # balanced again after the cut, so that `max_pairs` cannot leave a direction without its reverse
    kept = balance(balanced[:max_pairs], operation)
    unbalanced = len(pairs) - len(balanced) + min(len(balanced), max_pairs) - len(kept)
    return PairSet(kept, dict(excluded), trimmed, unbalanced=unbalanced,
                   reserve_added=sum(id(p) in reserve_ids for p in kept))


def _crosses(a: str | None, b: str | None) -> bool:
    """Both runs start with one-operation calculator calls, under different operators."""
    return a is not None and b is not None and a != b


def even_out(pairs: list[Pair], reserve: list[list[Pair]], operation: dict[str, str | None]) -> list[Pair]:
    """From each task's reserve, at most one pair whose direction ('* over /') the pairs so far have
    fewer of than its reverse ('/ over *'): the one most behind, tasks in the order given."""
    direction = functools.partial(_direction, operation=operation)
    count = collections.Counter(map(direction, pairs))
    added = []
    for candidates in reserve:
        behind = [(count[(b, a)] - count[(a, b)], p) for p in candidates for a, b in [direction(p)]]
        behind = [(gap, p) for gap, p in behind if gap > 0]
        if behind:
            _, p = max(behind, key=lambda x: x[0])  # first of the most behind: candidates come newest first
            count[direction(p)] += 1
            added.append(p)
    return added
