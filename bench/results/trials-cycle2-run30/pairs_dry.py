"""Pair counts and operator directions for /tmp/e34 under each pairing variant (no training)."""
import collections, sys
sys.path.insert(0, '/work/main')
from learner.pairs import build_pairs, collect, first_operation
from learner.registry import Registry
from runtime.config import Settings
from runtime.store import TrajectoryStore
s = Settings.load()
reg = Registry(s.db_path); store = TrajectoryStore(s.db_path)
with reg.locked() as d:
    groups = collect(d, val_fraction=0)
for name, kw in [("plain", dict(balance_operations=False)), ("balanced", dict(balance_operations=True))]:
    built = build_pairs(store, groups, per_task=s.pairs_per_task, max_pairs=int(__import__("os").environ.get("DRY_MAX", s.max_pairs)), model_dir=s.model_path, **kw)
    dirs = collections.Counter()
    trial = 0
    for p in built.pairs:
        c, r = (store.get(q.trajectory_id) for q in (p.chosen, p.rejected))
        trial += bool((c.get("metadata") or {}).get("explore_operation"))
        dirs[f"{first_operation(c)} over {first_operation(r)}"] += 1
    print(name, "pairs", len(built.pairs), "tasks", len({p.group for p in built.pairs}), "trial-chosen", trial,
          "unbalanced", built.unbalanced, dict(dirs.most_common()), flush=True)
