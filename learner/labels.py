"""Labels: was a logged run a success or a failure, and who says so.

Three sources, strongest first:
1. feedback  — the user's verdict through the API (the latest one counts); score >= 0.5 is success.
2. heuristic — the run ended in tool_error, parse_error, step_limit or engine_error: a failure.
3. verifier  — the run's metadata carries `expected_answer` (and optionally `check`): the final
               reply is checked with learner.checks, the same code `hone eval` uses.
A run none of them can judge (status ok, no expected answer, no feedback) stays unlabelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from .checks import CheckError, check_answer

FAILURE_STATUSES: tuple[str, ...] = ("tool_error", "parse_error", "step_limit", "engine_error")
SUCCESS, FAILURE = "success", "failure"


@dataclass(frozen=True)
class Label:
    label: str  # success | failure
    source: str  # feedback | heuristic | verifier
    score: float


def label_for(traj: dict[str, Any], feedback: list[dict[str, Any]]) -> Label | None:
    """The label of one trajectory (a dict with status, metadata, final_answer) given its feedback."""
    if feedback:
        latest = max(feedback, key=lambda f: f["id"])  # ids grow in commit order
        score = float(latest["score"])
        return Label(SUCCESS if score >= 0.5 else FAILURE, "feedback", score)
    status = traj["status"]
    if status in FAILURE_STATUSES:
        return Label(FAILURE, "heuristic", 0.0)
    if status != "ok":
        return None  # running or interrupted: nothing the model can be blamed or praised for
    metadata = traj.get("metadata") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    if metadata.get("expected_answer") is None:
        return None
    try:
        ok = check_answer(traj.get("final_answer") or "", metadata["expected_answer"], metadata.get("check"))
    except CheckError:
        return None  # an unusable expected answer is the caller's mistake, not evidence
    return Label(SUCCESS if ok else FAILURE, "verifier", 1.0 if ok else 0.0)


# Finished runs never examined, and runs whose latest feedback is not what their label says. Compared
# by value, not by time: a feedback row committed just after a labelling pass is still picked up.
_PENDING = """
    SELECT id, status, metadata, final_answer FROM trajectories t
    WHERE status != 'running'
      AND (labeled_at IS NULL
           OR EXISTS (SELECT 1 FROM feedback f
                      WHERE f.id = (SELECT MAX(id) FROM feedback WHERE trajectory_id = t.id)
                        AND (t.label_source IS NOT 'feedback' OR t.label_score IS NOT f.score)))
    LIMIT ?
"""


def apply_labels(db: sqlite_utils.Database, *, batch: int = 500) -> dict[str, int]:
    """Label every pending trajectory; returns counts by outcome ("success", "failure", "unlabelled").

    Each batch is one write transaction on `db` (a hone connection in autocommit mode)."""
    counts = {SUCCESS: 0, FAILURE: 0, "unlabelled": 0}
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = [dict(zip(("id", "status", "metadata", "final_answer"), r))
                    for r in db.execute(_PENDING, [batch]).fetchall()]
            now = time.time()
            for row in rows:
                fb = [{"score": r[0], "id": r[1]} for r in db.execute(
                    "SELECT score, id FROM feedback WHERE trajectory_id = ?", [row["id"]]).fetchall()]
                label = label_for(row, fb)
                counts[label.label if label else "unlabelled"] += 1
                db.execute(
                    "UPDATE trajectories SET label = ?, label_source = ?, label_score = ?, labeled_at = ? WHERE id = ?",
                    [label and label.label, label and label.source, label and label.score, now, row["id"]],
                )
            db.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            raise
        if len(rows) < batch:
            return counts


def label_totals(db: sqlite_utils.Database) -> dict[str, dict[str, int]]:
    """How many finished runs carry each label, by where the label came from: {"success": {"feedback": 3}}."""
    totals: dict[str, dict[str, int]] = {SUCCESS: {}, FAILURE: {}}
    for label, source, n in db.execute("SELECT label, label_source, COUNT(*) FROM trajectories "
                                       "WHERE label IS NOT NULL GROUP BY label, label_source").fetchall():
        totals.setdefault(label, {})[source] = n
    return totals


def label_all(registry) -> dict[str, int]:
    """apply_labels on a Registry's connection, holding its lock."""
    with registry.locked() as db:
        return apply_labels(db)
