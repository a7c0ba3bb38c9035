"""How many logged runs retokenize their own output, and what that does to a cycle's pairs.

A run drifts when a step's prompt does not extend the previous step's prompt + completion token for
token (learner/sequences.py). This script reads one HONE_HOME's log and reports, per source and label,
how many runs chain exactly, how many `pairs_on_drift = trim` keeps with a retokenized tail left
untrained, and how many are excluded either way. With `--cycle N` it reads the log as cycle N saw it when it built
its pairs (bench/sweep.py's rule), and also builds those pairs both ways, counted by task kind:
which tasks lose their pairs.

    .venv/bin/python bench/drift.py --home /tmp/r27/home-... --cycle 1 [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner.pairs import build_pairs, collect  # noqa: E402
from learner.registry import Registry  # noqa: E402
from learner.sequences import SequenceError, trajectory_sequence  # noqa: E402
from runtime.schema import connect  # noqa: E402
from runtime.store import TrajectoryStore  # noqa: E402
from sweep import cycle_pairs_time  # noqa: E402

SOURCES = ("serve", "exploration")  # what pairs are built from; everything else is grouped as "other"


def task_kind(group: str) -> str:
    """'file:storage-train-003' -> 'storage'; 'file:asdiv-a-12' -> 'asdiv'."""
    return group.split(":", 1)[-1].split("-", 1)[0]


def run_counts(store: TrajectoryStore, rows: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    """Per (source, label): runs that chain ('ok'), that trim ('trimmed'), or are excluded (by kind)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    untrained: list[int] = []
    for tid, source, label in rows:
        traj = store.get(tid)
        if traj is None:
            continue
        try:
            seq = trajectory_sequence(traj)
            outcome = "trimmed" if seq.untrained else "ok"
            if seq.untrained:
                untrained.append(seq.untrained)
        except SequenceError as e:
            outcome = e.kind
        counts[f"{source if source in SOURCES else 'other'}/{label or 'unlabelled'}"][outcome] += 1
    return {"runs": {k: dict(v) for k, v in sorted(counts.items())},
            "untrained_tokens": {"runs": len(untrained), "median": statistics.median(untrained) if untrained else 0,
                                 "max": max(untrained, default=0)}}


def logged_runs(db_path: Path, before: float | None) -> list[tuple[str, str, str | None]]:
    """(id, source, label) of every run, or of those logged before `before` (as a cycle saw the log)."""
    db = connect(db_path)
    try:
        sql = "SELECT id, source, label FROM trajectories" + ("" if before is None else " WHERE created_at <= ?")
        return [(r["id"], r["source"], r["label"]) for r in db.query(sql, [] if before is None else [before])]
    finally:
        db.close()


def pair_counts(registry: Registry, store: TrajectoryStore, cycle: int, *, per_task: int, max_pairs: int
                ) -> dict[str, Any]:
    before = cycle_pairs_time(registry, cycle)
    with registry.locked() as db:
        groups = collect(db, val_fraction=0.0, before=before)
    out = {}
    for mode in ("exclude", "trim"):
        built = build_pairs(store, groups, per_task=per_task, max_pairs=max_pairs, on_drift=mode)
        out[mode] = {"pairs": len(built.pairs),
                     "by_kind": dict(collections.Counter(task_kind(p.group) for p in built.pairs)),
                     "excluded": built.excluded, "drift_trimmed": built.drift_trimmed}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, required=True, help="a HONE_HOME with a trajectory log")
    ap.add_argument("--cycle", type=int, help="also build this cycle's pairs both ways")
    ap.add_argument("--per-task", type=int, default=1)
    ap.add_argument("--max-pairs", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    db_path = args.home / "hone.db"
    if not db_path.is_file():
        print(f"drift: no trajectory log at {db_path}", file=sys.stderr)
        return 2
    registry = Registry(db_path)
    try:
        before = None if args.cycle is None else cycle_pairs_time(registry, args.cycle)
        with TrajectoryStore(db_path) as store:
            report: dict[str, Any] = run_counts(store, logged_runs(db_path, before))
            if args.cycle is not None:
                report["pairs"] = pair_counts(registry, store, args.cycle, per_task=args.per_task,
                                              max_pairs=args.max_pairs)
    except LookupError as e:
        print(f"drift: {e}", file=sys.stderr)
        return 2
    finally:
        registry.close()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for key, c in report["runs"].items():
        total = sum(c.values())
        print(f"{key:28} {total:5} runs: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in sorted(c.items())))
    u = report["untrained_tokens"]
    print(f"trimmed runs: {u['runs']}, untrained tokens per run: median {u['median']}, max {u['max']}")
    for mode, p in report.get("pairs", {}).items():
        print(f"cycle {args.cycle} pairs, {mode}: {p['pairs']} {p['by_kind']}; excluded {p['excluded']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
