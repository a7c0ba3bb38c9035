"""Round 2 after the wide free exploration on /tmp/e34: operator trials for the numerically checked
tasks whose every run so far failed (trial-and-error after the free samples found nothing)."""
import asyncio, sys, json
sys.path.insert(0, '/work/main')
from learner.pairs import collect, tasks_to_explore
from learner.explore import explore, numeric
from learner.labels import label_all, FAILURE
from learner.registry import Registry
from learner.runner import agent_runner
from runtime.config import Settings
s = Settings.load()
assert s.explore_operator_trials, "set HONE_EXPLORE_OPERATOR_TRIALS=true"
reg = Registry(s.db_path)
print('labelled before', label_all(reg), flush=True)
with reg.locked() as d:
    groups = collect(d, val_fraction=0)
todo = [(t, n) for t, n in tasks_to_explore(groups)
        if numeric(t) and all(r["label"] == FAILURE for r in groups.train[t.key])]
print('all-failure numeric tasks', len(todo), 'of', len(tasks_to_explore(groups)), flush=True)
async def main():
    async with agent_runner(s, sys.argv[1]) as runner:
        return await explore(runner, todo, cycle_id=2)
print(json.dumps(asyncio.run(main())), flush=True)
print('labelled after', label_all(reg), flush=True)
