"""Cycle 2's exploration replayed on run 30's home cut to before cycle 2 (hone-v1 serving).

    HONE_HOME=<cut copy> HONE_VAL_FRACTION=0 HONE_EXPLORE_CONCURRENCY=16 [HONE_...] \\
        .venv/bin/python explore_replay.py MODE ENGINE_URL

MODE trials: the tasks without contrast, with HONE_EXPLORE_OPERATOR_TRIALS=true (c2-trials, c2-contrast)
MODE wide:   the same, free samples, HONE_EXPLORE_BUDGET=1024 so every such task is explored (c2-wide)
MODE round2: after `wide`, operator trials (HONE_EXPLORE_OPERATOR_TRIALS=true) for the numerically
             checked tasks whose every run failed (c2-wide-trials-unbal)
"""
import asyncio
import json
import sys

sys.path.insert(0, '/work/main')
from learner.explore import explore, numeric
from learner.labels import FAILURE, label_all
from learner.pairs import collect, tasks_to_explore
from learner.registry import Registry
from learner.runner import agent_runner
from runtime.config import Settings

mode, url = sys.argv[1], sys.argv[2]
s = Settings.load()
if mode in ("trials", "round2"):
    assert s.explore_operator_trials, "set HONE_EXPLORE_OPERATOR_TRIALS=true"
print('budget', s.explore_budget, 'trials', s.explore_operator_trials, flush=True)
reg = Registry(s.db_path)
print('labelled before', label_all(reg), flush=True)
with reg.locked() as d:
    groups = collect(d, val_fraction=0)
todo = tasks_to_explore(groups)
if mode == "round2":
    todo = [(t, n) for t, n in todo if numeric(t) and all(r["label"] == FAILURE for r in groups.train[t.key])]
print('tasks to explore', len(todo), flush=True)


async def main():
    async with agent_runner(s, url) as runner:
        return await explore(runner, todo, cycle_id=2)

print(json.dumps(asyncio.run(main())), flush=True)
print('labelled after', label_all(reg), flush=True)
