"""Which operation each arithmetic word problem needs, and what the agent did instead.

Most held-out word problems (ASDiv-A) are one operation on two numbers of the question: 158 of the
200 in bench/data/asdiv-a-heldout-200.jsonl. For those, this script reports how many each adapter
solved per needed operation (+ - * /) and, for the failures, what its first calculator call did:

    used X      the right two numbers, another operation
    swapped     the right operation, operands in the other order (e.g. 5 - 12 for 12 - 5)
    numbers     other numbers (at least one not the pair the answer needs)
    longer      not a single `a op b` expression
    no call     no calculator call (another tool, or none)

It reads `hone eval` results from a HONE_HOME (their trajectories hold the calls), bench/ceiling.py
output (greedy per task: rates only), or the pairs a cycle built (`--pairs-cycle N`: chosen's first
operation over rejected's, as the DPO step sees them).

    .venv/bin/python bench/operations.py --home /tmp/r29/home-... --eval ev-... --eval ev-... [--json]
    .venv/bin/python bench/operations.py --tasks bench/data/asdiv-a-heldout-200.jsonl \\
        --ceiling bench/results/ceiling-asdiv-base.json --ceiling bench/results/ceiling-asdiv-run14-v3.json
    HONE_VAL_FRACTION=0 .venv/bin/python bench/operations.py --home /tmp/r29/home-... --pairs-cycle 2

Pairs are rebuilt with the learner settings in the environment (HONE_*), as bench/sweep.py does:
`hone bench loop` runs with HONE_VAL_FRACTION=0, so pass that for a loop run's home.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner.pairs import ONE_OPERATION, first_operation  # noqa: E402

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "/": lambda a, b: a / b if b else float("nan")}
MULTI = "other"  # not one operation on two of the question's numbers (several steps, or a number in words)
NOT_LOGGED = ...  # a result without its trajectory (bench/ceiling.py's): counted, failures not classified
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text or "")]


def _equal(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))  # the numeric check's tolerance (learner/checks.py)


def needed(question: str, answer: Any) -> tuple[str, float, float] | None:
    """(operation, a, b) with `a op b` == answer for two numbers of the question, else None. Where
    several fit (2 + 2 and 2 * 2), the first in + - * / order."""
    try:
        expected = float(answer)
    except (TypeError, ValueError):
        return None
    found = [(op, a, b) for op, f in OPERATIONS.items() for a, b in itertools.permutations(numbers(question), 2)
             if _equal(f(a, b), expected)]
    return found[0] if found else None


def what_it_did(need: tuple[str, float, float], expression: str | None) -> str:
    """How a failed attempt's first calculator expression differs from the one the answer needs."""
    if expression is None:
        return "no call"
    m = ONE_OPERATION.fullmatch(expression)
    if not m:
        return "longer"
    op, a, b = need
    x, used, y = float(m[1].replace(",", "")), m[2], float(m[3].replace(",", ""))
    if {x, y} != {a, b}:
        return "numbers"
    if used != op:
        return f"used {used}"
    return "swapped"


def first_calculation(messages: list[dict[str, Any]]) -> tuple[str | None, str | None]:
    """(the question, the first calculator expression) of a logged run: the question is the user turn
    right before the model's first generated message (earlier ones are the prompt's examples)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("generated")), None)
    if first is None:
        return None, None
    question = next((m["content"] for m in reversed(messages[:first]) if m["role"] == "user"), None)
    for m in messages[first:]:
        for call in (m.get("tool_calls") or []) if m.get("generated") else []:
            fn = call.get("function", call)
            if fn.get("name") == "calculator":
                args = fn.get("arguments")
                args = json.loads(args) if isinstance(args, str) else args or {}
                return question, str(args.get("expression", ""))
    return question, None


def tally(rows: list[tuple[str, Any, bool, str | None]]) -> dict[str, Any]:
    """rows: (question, expected answer, solved, first calculator expression: None if there was no
    call, NOT_LOGGED if the run is not at hand)."""
    out: dict[str, Any] = {}
    for question, answer, solved, expression in rows:
        need = needed(question, answer)
        op = need[0] if need else MULTI
        slot = out.setdefault(op, {"n": 0, "solved": 0, "failures": collections.Counter()})
        slot["n"] += 1
        if solved:
            slot["solved"] += 1
        elif need is not None and expression is not NOT_LOGGED:
            slot["failures"][what_it_did(need, expression)] += 1
    return {op: {**v, "failures": dict(v["failures"].most_common())}
            for op, v in sorted(out.items(), key=lambda kv: list(OPERATIONS).index(kv[0]) if kv[0] in OPERATIONS else 9)}


def from_eval(home: Path, eval_id: str) -> tuple[str, dict[str, Any]]:
    from runtime.evals import EvalStore
    from runtime.store import TrajectoryStore

    evals = EvalStore(home / "hone.db")
    try:
        ev = evals.get(eval_id)
    finally:
        evals.close()
    if ev is None:
        raise LookupError(f"no eval {eval_id!r} in {home / 'hone.db'} (hone evals lists them)")
    rows = []
    unread = 0  # results whose run is missing or never reached the model (an engine error): no question to read
    with TrajectoryStore(home / "hone.db") as store:
        for r in ev["results"]:
            traj = store.get(r["trajectory_ids"][-1]) if r["trajectory_ids"] else None
            question, expression = first_calculation(traj["messages"]) if traj else (None, None)
            if question is None:
                unread += 1
            else:
                rows.append((question, r["expected"], r["success"], expression))
    name = f"{ev['adapter'] or 'served'} ({eval_id}, {Path(ev['tasks_file']).name})"
    return name + (f" [{unread} results without a readable run left out]" if unread else ""), tally(rows)


def from_ceiling(tasks_file: Path, ceiling_file: Path) -> tuple[str, dict[str, Any]]:
    tasks = {t["id"]: t for t in map(json.loads, tasks_file.read_text().splitlines()) if "question" in t}
    report = json.loads(ceiling_file.read_text())
    try:
        per_task = report["pools"]["heldout"]["per_task"]
    except (KeyError, TypeError):
        raise ValueError(f"{ceiling_file} is not a bench/ceiling.py report with a heldout pool") from None
    rows = [(tasks[k]["question"], tasks[k]["answer"], bool(v["greedy"]), NOT_LOGGED) for k, v in per_task.items() if k in tasks]
    return f"{report.get('adapter', '?')} greedy ({ceiling_file.name})", tally(rows)


def pair_directions(home: Path, cycle: int) -> dict[str, int]:
    """Chosen's first operation over rejected's, for the calculator-on-both-sides pairs cycle N built."""
    from learner.pairs import build_pairs, collect
    from learner.registry import Registry
    from runtime.config import Settings
    from runtime.store import TrajectoryStore
    from sweep import cycle_pairs_time

    settings = Settings.load({**os.environ, "HONE_HOME": str(home)})
    registry = Registry(home / "hone.db")
    try:
        before = cycle_pairs_time(registry, cycle)
        with registry.locked() as db:
            groups = collect(db, val_fraction=settings.val_fraction, before=before)
    finally:
        registry.close()

    def operation(traj: dict[str, Any] | None) -> str:
        """The balancing rule's view (learner.pairs.first_operation), else what the first call was."""
        if traj is None:
            return "no call"
        if op := first_operation(traj):
            return op
        calls = [c.get("function", c) for m in traj["messages"] if m.get("generated") for c in m.get("tool_calls") or []]
        return "no call" if not calls else "longer" if calls[0].get("name") == "calculator" else str(calls[0].get("name"))

    counts: collections.Counter[str] = collections.Counter()
    with TrajectoryStore(home / "hone.db") as store:
        built = build_pairs(store, groups, per_task=settings.pairs_per_task, max_pairs=settings.max_pairs,
                            model_dir=settings.model_path, on_drift=settings.pairs_on_drift,
                            balance_operations=settings.pairs_balance_operations)
        for p in built.pairs:
            chosen, rejected = (operation(store.get(s.trajectory_id)) for s in (p.chosen, p.rejected))
            counts[f"{chosen} over {rejected}"] += 1
    return dict(counts.most_common())


def print_table(name: str, report: dict[str, Any]) -> None:
    print(f"\n{name}")
    print("| needs | tasks | solved | failures: what the first call did |\n|---|---|---|---|")
    for op, v in report.items():
        fails = ", ".join(f"{k} {n}" for k, n in v["failures"].items()) or "-"
        print(f"| {op} | {v['n']} | {v['solved']} ({100 * v['solved'] / v['n']:.0f}%) | {fails} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, help="a HONE_HOME (for --eval and --pairs-cycle)")
    ap.add_argument("--eval", action="append", default=[], help="an eval id in --home's log (repeatable)")
    ap.add_argument("--tasks", type=Path, help="the task file the --ceiling reports ran on")
    ap.add_argument("--ceiling", type=Path, action="append", default=[], help="bench/ceiling.py output (repeatable)")
    ap.add_argument("--pairs-cycle", type=int, action="append", default=[], help="the pairs cycle N built (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if (args.eval or args.pairs_cycle) and not (args.home and (args.home / "hone.db").exists()):
        print(f"operations: no trajectory log at {args.home}/hone.db (--home must be a HONE_HOME)", file=sys.stderr)
        return 2
    if args.ceiling and not (args.tasks and args.tasks.exists()):
        print("operations: --ceiling needs --tasks, the task file it ran on", file=sys.stderr)
        return 2
    if not (args.eval or args.ceiling or args.pairs_cycle):
        print("operations: nothing to read (give --eval, --ceiling or --pairs-cycle)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    try:
        for eval_id in args.eval:
            name, report = from_eval(args.home, eval_id)
            out[name] = report
        for path in args.ceiling:
            name, report = from_ceiling(args.tasks, path)
            out[name] = report
        for cycle in args.pairs_cycle:
            out[f"cycle {cycle} pairs"] = pair_directions(args.home, cycle)
    except (LookupError, OSError, KeyError, ValueError) as e:
        print(f"operations: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, report in out.items():
        if name.endswith(" pairs"):
            print(f"\n{name} (chosen's first operation over rejected's): "
                  + ", ".join(f"{k} {n}" for k, n in report.items()))
        else:
            print_table(name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
