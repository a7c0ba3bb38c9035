"""A seeded random sample of a task file, leaving out tasks that occur in other files (same id or the
same normalized question): evaluation pools larger than the shipped samples, disjoint from what was
trained or gated on.

    .venv/bin/python bench/sample_pool.py ../shared/data/asdiv-a.jsonl --n 200 \\
        --exclude bench/data/mawps.jsonl > /tmp/asdiv-200.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path


def _norm(question: str) -> str:
    return re.sub(r"\W+", " ", question.lower()).strip()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", type=Path, action="append", default=[], help="task file to stay disjoint from")
    ap.add_argument("--skip-first", type=int, default=0, help="leave out the first N tasks of source")
    ap.add_argument("--skip-last", type=int, default=0, help="leave out the last N tasks of source")
    args = ap.parse_args()

    tasks = _read(args.source)
    tasks = tasks[args.skip_first: len(tasks) - args.skip_last]
    ids, questions = set(), set()
    for path in args.exclude:
        for t in _read(path):
            ids.add(t.get("id"))
            questions.add(_norm(t.get("question", "")))
    pool = [t for t in tasks if t.get("id") not in ids and _norm(t.get("question", "")) not in questions]
    if len(pool) < args.n:
        print(f"sample_pool: only {len(pool)} tasks left after exclusions, asked for {args.n}", file=sys.stderr)
        return 2
    for t in random.Random(args.seed).sample(pool, args.n):
        print(json.dumps(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
