"""Cycle 2's exploration replayed on run 30's home cut to before cycle 2 (hone-v1 serving).

    HONE_HOME=<cut copy> HONE_VAL_FRACTION=0 HONE_EXPLORE_CONCURRENCY=16 [HONE_...] \\
        .venv/bin/python explore_replay.py MODE ENGINE_URL

MODE trials: the tasks without contrast, with HONE_EXPLORE_OPERATOR_TRIALS=true (c2-trials, c2-contrast)
MODE wide:   the same, free samples, HONE_EXPLORE_BUDGET=1024 so every such task is explored (c2-wide)
MODE round2: after `wide`, operator trials (HONE_EXPLORE_OPERATOR_TRIALS=true) for the numerically
             checked tasks whose every run failed (c2-wide-trials-unbal)
MODE reverse: after `round2` (session 35), wrong-operation trials on the numerically checked tasks the
             model solved: for a task whose own (non-trial) successes start with `a X b` for one X,
             one trial per other operation (c2-reserve). learner.explore.trial_plan, written after,
             also leaves out a task one of whose successes has no one-operation first call.
"""
import asyncio
import json
import sys

sys.path.insert(0, '/work/main')
from learner.explore import OPERATIONS, explore, numeric, operation_tools
from learner.labels import FAILURE, SUCCESS, label_all
from learner.pairs import collect, first_operation, tasks_to_explore
from learner.registry import Registry
from learner.runner import agent_runner
from learner.tasks import task_from_trajectory
from runtime.config import Settings
from runtime.store import TrajectoryStore

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


def reverse_jobs():
    store = TrajectoryStore(s.db_path)
    planned = []
    for rows in groups.train.values():
        task = next((t for t in map(task_from_trajectory, rows) if t is not None), None)
        if task is None or not numeric(task):
            continue
        own = [store.get(r['id']) for r in rows if r['label'] == SUCCESS]
        ops = {first_operation(t) for t in own if not (t.get('metadata') or {}).get('explore_operation')} - {None}
        if len(ops) == 1:
            x = ops.pop()
            planned.extend((task, op) for op in OPERATIONS if op != x)
    print('tasks', len({t.key for t, _ in planned}), 'rollouts', len(planned), flush=True)
    narrowed = {op: operation_tools(op) for op in OPERATIONS}
    return planned, [dict(task=t, source="exploration", namespace=f"explore-c2-r3-{i}", adapter=None,
                          temperature=s.explore_temperature, extra_metadata={"cycle_id": 2, "explore_operation": op},
                          first_step_tools=narrowed[op]) for i, (t, op) in enumerate(planned)]


async def main():
    async with agent_runner(s, url) as runner:
        if mode == "reverse":
            planned, jobs = reverse_jobs()
            attempts = await runner.attempt_all(jobs)
            return {f"{op} {ok}": sum(1 for a, (_, o) in zip(attempts, planned) if o == op and a.success == ok)
                    for op in OPERATIONS for ok in (True, False)}
        # the plan as learner.explore.plan made it then: with trials on, one per operation instead of free samples
        planned = [(t, op) for t, _ in todo for op in (
            OPERATIONS if s.explore_operator_trials and numeric(t) else [None] * s.explore_attempts)]
        return await explore(runner, planned[: s.explore_budget], cycle_id=2)

print(json.dumps(asyncio.run(main())), flush=True)
print('labelled after', label_all(reg), flush=True)
