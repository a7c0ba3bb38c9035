import sqlite3, math
def res(db, ev):
    c = sqlite3.connect(db)
    return dict(c.execute("select task_id, success from eval_results where eval_id=?", [ev]).fetchall())
R='/tmp/r30/home-20261207-100425/hone.db'; E='/tmp/e34/hone.db'
v1 = res(R, 'ev-20261207-104126-8176'); v2 = res(R, 'ev-20261207-111520-827c')
def mcnemar(b, c):
    n = b + c
    if n == 0: return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
for name, ev in [('c2-reserve-1epoch','ev-20261207-170100-999b'), ('c2-reserve-nonll','ev-20261207-164844-d3cf'), ('c2-reserve','ev-20261207-163131-ed73'), ('c2-wide-trials-unbal','ev-20261207-151604-e4b5'), ('c2-wide','ev-20261207-143434-b60a'), ('c2-contrast','ev-20261207-134535-3415'), ('c2-trials','ev-20261207-135921-65d7')]:
    r = res(E, ev)
    for pname, p in [('hone-v1', v1), ('hone-v2', v2)]:
        fixed = sum(1 for t in r if r[t] and not p[t]); broke = sum(1 for t in r if p[t] and not r[t])
        print(f"{name} vs {pname}: {sum(r.values())} vs {sum(p.values())}, fixed {fixed} broke {broke} p={mcnemar(fixed, broke):.3f}")
