"""Per needed operation: cycle-2 exploration outcomes on asdiv tasks, trials (/tmp/e34) vs free (run 30)."""
import sys, json, collections
sys.path.insert(0,'/work/main'); sys.path.insert(0,'/work/main/bench')
import sqlite_utils
from operations import needed, first_calculation, what_it_did
from runtime.store import TrajectoryStore
for home in ['/tmp/e34', '/tmp/r30/home-20261207-100425']:
    db = sqlite_utils.Database(home+'/hone.db'); st = TrajectoryStore(home+'/hone.db')
    res = collections.defaultdict(lambda: collections.Counter())
    tasks = collections.defaultdict(set)
    for r in db.query("select id, task_id, label, request, metadata from trajectories where source='exploration' and json_extract(metadata,'$.cycle_id')=2 and task_id like 'file:asdiv%'"):
        meta = json.loads(r['metadata']); q = json.loads(r['request'])
        text = q.get('input') if isinstance(q.get('input'), str) else json.dumps(q)
        n = needed(text, meta.get('expected_answer'))
        op = n[0] if n else 'other'
        tasks[op].add(r['task_id'])
        res[op][(meta.get('explore_operation') or 'free', r['label'][0])] += 1
    print(home)
    for op in ['+','-','*','/','other']:
        print(' needs', op, 'tasks', len(tasks[op]), dict(sorted(res[op].items())))
