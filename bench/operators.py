"""Which arithmetic the agent asked the calculator for, per eval: the operators in the first tool
call of each run (e.g. "+", "-", "+-"), counted from the trajectory log. A DPO candidate that
learned a context-free preference shows up here as one operator taking over.

    HONE_HOME=... .venv/bin/python bench/operators.py ev-20261203-082503-7704 [EVAL_ID ...]
"""

from __future__ import annotations

import collections
import json
import re
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.config import Settings  # noqa: E402


def operators(db: sqlite3.Connection, eval_id: str) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    runs = db.execute("SELECT id FROM trajectories WHERE source = 'eval' AND json_extract(metadata, '$.eval_id') = ?",
                      [eval_id]).fetchall()
    for (trajectory_id,) in runs:
        first = db.execute("SELECT tool_calls FROM messages WHERE trajectory_id = ? AND generated = 1 AND "
                           "tool_calls IS NOT NULL ORDER BY idx LIMIT 1", [trajectory_id]).fetchone()
        if first is None:
            counts["no tool call"] += 1
            continue
        fn = json.loads(first[0])[0]["function"]
        if fn["name"] != "calculator":
            counts[fn["name"]] += 1
            continue
        try:
            expression = str(json.loads(fn["arguments"]).get("expression", ""))
        except (ValueError, AttributeError):
            expression = ""
        counts["".join(sorted(set(re.findall(r"[-+*/]", expression)))) or "no operator"] += 1
    return dict(counts.most_common())


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    db = sqlite3.connect(Settings.load().db_path)
    for eval_id in argv:
        print(eval_id, json.dumps(operators(db, eval_id)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
