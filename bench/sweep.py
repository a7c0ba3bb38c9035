"""Train candidates with different learner settings on the same logged pairs, side by side.

A `hone bench loop` run changes the data every cycle, so two runs with different settings differ in
their pairs too. This script holds the data still: it builds pairs from one HONE_HOME's log exactly as
a cycle would (same code: collect, build_pairs, the child-process trainer), once per setting, and
writes each adapter to $HONE_HOME/adapters/<name>, where `hone eval --adapter <name>` finds it.

    HONE_HOME=bench/results/loop/home-... .venv/bin/python bench/sweep.py \\
        --variant base-settings --variant per-task-1:pairs_per_task=1,max_pairs=32
    HONE_HOME=... .venv/bin/hone serve --no-learner &      # then, for each variant:
    HONE_HOME=... .venv/bin/hone eval --tasks $HONE_HOME/gate-tasks.jsonl --adapter per-task-1 --json

Settings are hone's (docs/configuration.md), starting from the environment (HONE_*), then the
variant's overrides. Results (data counts, training metrics, timings) go to --out as JSON lines.

`--cycle N` sees the log as cycle N did when it built its pairs (runs logged before the end of its
exploration), so a finished run's cycles can be retrained without cutting its database; `--parent
VERSION` warm-starts from a registered adapter, as a cycle does from what served (default: a fresh
adapter on the base model). With both, `--cycle 3 --parent hone-v1` retrains what cycle 3 trained.
`--tasks-from failed` keeps only the pairs of tasks that serving got wrong (exploration found the
success), `solved` only those it got right (exploration found the failure): which kind teaches.
`--new-since M` keeps only tasks first logged after cycle M built its pairs: with `--cycle M+1
--parent <cycle M's adapter>`, the new traffic alone, without the pairs the parent already learned.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learner.cycle import train_config  # noqa: E402
from learner.labels import SUCCESS  # noqa: E402
from learner.pairs import Groups, build_pairs, collect  # noqa: E402
from learner.registry import Registry  # noqa: E402
from learner.train_process import train_adapter_isolated  # noqa: E402
from runtime.config import Settings  # noqa: E402
from runtime.model import ensure_model  # noqa: E402
from runtime.store import TrajectoryStore  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, overrides


def cycle_pairs_time(registry: Registry, cycle_id: int) -> float:
    """When cycle N built its pairs: its start plus every phase recorded before `pairs`, in the order
    the cycle ran them (label, collect, explore and, with operator trials, trials: a fixed list of
    three left the trials' runs out of rebuilt pairs)."""
    row = registry.get_cycle(cycle_id)
    if row is None:
        raise LookupError(f"no cycle {cycle_id} in {registry.path}")
    timings = row.get("timings") or {}
    if "pairs" not in timings:
        raise LookupError(f"cycle {cycle_id} never built pairs (phases: {', '.join(timings) or 'none'})")
    before = list(itertools.takewhile(lambda phase: phase != "pairs", timings))
    return row["started_at"] + sum(timings[p] for p in before) + 0.5


def served_outcome(rows: list[dict]) -> str | None:
    """'solved' if any greedy serving run of the task succeeded, 'failed' if all failed, None if unserved."""
    labels = {r["label"] for r in rows if r["source"] == "serve"}
    return None if not labels else "solved" if SUCCESS in labels else "failed"


def keep_tasks(groups: Groups, outcome: str) -> Groups:
    if outcome == "all":
        return groups
    return Groups({k: rows for k, rows in groups.train.items() if served_outcome(rows) == outcome}, groups.validation)


def keep_new(groups: Groups, since: float) -> Groups:
    """Only tasks first logged after `since`: what a cycle could not have trained on before."""
    return Groups({k: rows for k, rows in groups.train.items() if min(r["created_at"] for r in rows) > since},
                  groups.validation)


def adapter_dir_of(registry: Registry, adapters_dir: Path, version: str) -> str:
    """This home's copy first: in a copied HONE_HOME the registry still names the original's paths."""
    row = registry.get_adapter(version)
    if row is None:
        raise LookupError(f"no adapter {version!r} in {registry.path} (hone adapters lists them)")
    here = adapters_dir / version
    return str(here) if (here / "adapter_config.json").exists() else row["path"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME[:setting=value,...]")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines (default $HONE_HOME/sweep.jsonl)")
    ap.add_argument("--cycle", type=int, default=None, help="the log as cycle N saw it when building pairs")
    ap.add_argument("--parent", default=None, help="warm-start from this registered adapter (default: none)")
    ap.add_argument("--tasks-from", choices=("all", "failed", "solved"), default="all",
                    help="pairs only from tasks that serving failed / solved (default: all)")
    ap.add_argument("--new-since", type=int, default=None, metavar="CYCLE",
                    help="pairs only from tasks first logged after cycle CYCLE built its pairs")
    args = ap.parse_args()

    base = Settings.load()
    out = args.out or base.home / "sweep.jsonl"
    if not base.db_path.exists():  # Registry would create an empty log, and every variant would train on nothing
        print(f"sweep: no trajectory log at {base.db_path} (set HONE_HOME to a home with one)", file=sys.stderr)
        return 2
    registry = Registry(base.db_path)
    try:
        before = None if args.cycle is None else cycle_pairs_time(registry, args.cycle)
        parent = None if args.parent is None else adapter_dir_of(registry, base.adapters_dir, args.parent)
        since = None if args.new_since is None else cycle_pairs_time(registry, args.new_since)
    except LookupError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    for text in args.variant:
        name, overrides = parse_variant(text)
        env = {f"HONE_{k.upper()}": v for k, v in overrides.items()}
        s = Settings.load({**os.environ, **env})
        adapter_dir = s.adapters_dir / name
        if adapter_dir.exists():
            print(f"sweep: {adapter_dir} exists, skipping {name}", file=sys.stderr)
            continue
        with registry.locked() as db:
            groups = keep_tasks(collect(db, val_fraction=s.val_fraction, before=before), args.tasks_from)
        if since is not None:
            groups = keep_new(groups, since)
        with TrajectoryStore(s.db_path) as store:
            built = build_pairs(store, groups, per_task=s.pairs_per_task, max_pairs=s.max_pairs,
                                model_dir=s.model_path, on_drift=s.pairs_on_drift,
                                balance_operations=s.pairs_balance_operations)
        model_dir = ensure_model(s)
        t0 = time.perf_counter()
        result = train_adapter_isolated(model_dir, built.pairs, train_config(s), adapter_dir, parent_adapter=parent,
                                        progress=True)
        row = {"name": name, "overrides": overrides, "cycle": args.cycle, "parent": args.parent,
               "tasks_from": args.tasks_from, "new_since": args.new_since, "pairs": len(built.pairs),
               "pair_tasks": len({p.group for p in built.pairs}), "excluded": built.excluded,
               "drift_trimmed": built.drift_trimmed, "unbalanced": built.unbalanced,
               "reverse_trial_pairs": built.reserve_added,
               "train_s": round(time.perf_counter() - t0, 1), "metrics": result.metrics, "counts": result.counts}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("name", "pairs", "pair_tasks", "train_s")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
