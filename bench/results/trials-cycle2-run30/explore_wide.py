"""Cycle 2's exploration again, with every task without contrast explored (HONE_EXPLORE_BUDGET), on run 30's home cut to before cycle 2."""
import asyncio, sys, json
sys.path.insert(0, '/work/main')
from learner.pairs import collect, tasks_to_explore
from learner.explore import explore
from learner.labels import label_all
from learner.registry import Registry
from learner.runner import agent_runner
from runtime.config import Settings
s = Settings.load()
print("budget", s.explore_budget, "trials", s.explore_operator_trials, flush=True)
reg = Registry(s.db_path)
print('labelled before', label_all(reg), flush=True)
with reg.locked() as d:
    groups = collect(d, val_fraction=0)
todo = tasks_to_explore(groups)
print('tasks to explore', len(todo), flush=True)
async def main():
    async with agent_runner(s, sys.argv[1]) as runner:
        return await explore(runner, todo, cycle_id=2)
print(json.dumps(asyncio.run(main())), flush=True)
print('labelled after', label_all(reg), flush=True)
