"""Versioned schema migrations of the trajectory database, frozen once released.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1`` (applied by ``schema.migrate``).
Released migrations spell out their column types literally instead of importing constants, because
changing one would make fresh databases differ from migrated ones. Every table and column is
documented in docs/trajectory-schema.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]



def _m001_initial(db: sqlite_utils.Database) -> None:
    db.table("trajectories").create(
        {
            "id": str,
            "created_at": float,
            "finished_at": float,
            "status": str,
            "caller": str,
            "thread_id": str,
            "request_key": str,
            "task_id": str,
            "source": str,
            "request": str,
            "metadata": str,
            "final_answer": str,
            "error": str,
            "model": str,
            "adapter": str,
            "n_steps": int,
            "n_tool_calls": int,
            "n_tool_errors": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_ms": float,
            "writer": str,
            "label": str,
            "label_source": str,
            "label_score": float,
        },
        pk="id",
        not_null={"created_at", "status", "source", "model", "writer"},
        defaults={"source": "serve"},
    )
    # Listing is "filter, newest first" and ids sort by creation time, so the filter columns are
    # indexed together with id: `WHERE status = ? ORDER BY id DESC LIMIT n` then reads n index
    # entries instead of sorting every match. created_at is only ever a range, so it stands alone.
    db.table("trajectories").create_index(["created_at"], index_name="idx_trajectories_created_at")
    for col in ("status", "request_key", "task_id", "adapter", "label"):
        db.table("trajectories").create_index([col, "id"], index_name=f"idx_trajectories_{col}")

    db.table("messages").create(
        {
            "trajectory_id": str,
            "idx": int,
            "role": str,
            "content": str,
            "tool_calls": str,
            "tool_call_id": str,
            "name": str,
            "is_error": int,
            "model": str,
            "adapter": str,
            "started_at": float,
            "latency_ms": float,
            "prompt_tokens": int,
            "completion_tokens": int,
            "prompt_token_ids": str,
            "completion_token_ids": str,
            "finish_reason": str,
            "generated": int,
        },
        pk=("trajectory_id", "idx"),
        not_null={"trajectory_id", "idx", "role", "is_error", "generated"},
        defaults={"is_error": 0, "generated": 0},
        foreign_keys=[("trajectory_id", "trajectories", "id")],
    )

    db.table("feedback").create(
        {"id": int, "trajectory_id": str, "score": float, "comment": str, "caller": str, "created_at": float},
        pk="id",
        not_null={"trajectory_id", "score", "created_at"},
        foreign_keys=[("trajectory_id", "trajectories", "id")],
    )
    db.table("feedback").create_index(["trajectory_id"], index_name="idx_feedback_trajectory_id")

    # Raw SQL for the CHECK that keeps this a single-row table (sqlite-utils' create() has no CHECK).
    db.execute(
        """
        CREATE TABLE active_adapter (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            name TEXT,
            path TEXT,
            updated_at REAL NOT NULL
        )
        """
    )
    db.execute("INSERT INTO active_adapter (id, name, path, updated_at) VALUES (1, NULL, NULL, ?)", [time.time()])


def _m002_learner(db: sqlite_utils.Database) -> None:
    """The learner's records: when a label was set, adapters, cycles, and the one-cycle lease."""
    db.table("trajectories").add_column("labeled_at", float)

    db.table("adapters").create(
        {
            "version": str,  # also the name vLLM serves it under
            "path": str,
            "parent": str,  # the adapter it was warm-started from (None: fresh from the base model)
            "previous": str,  # what was active when it was promoted: the rollback target
            "cycle_id": int,
            "created_at": float,
            "status": str,  # candidate | promoted | rejected | retired
            "reason": str,
            "train": str,  # JSON: data counts, metrics, timings
            "gate": str,  # JSON: candidate and current success rates, n, margin
            "verify": str,  # JSON: vLLM vs local probe log-probs
            "promoted_at": float,
            "retired_at": float,
        },
        pk="version",
        not_null={"path", "created_at", "status"},
    )
    db.table("adapters").create_index(["status", "created_at"], index_name="idx_adapters_status")

    db.table("cycles").create(
        {
            "id": int,
            "created_at": float,
            "trigger": str,  # manual | count | interval
            "requested_by": str,
            "state": str,  # requested | running | promoted | rejected | skipped | failed
            "phase": str,  # the phase running now, or the last one reached
            "started_at": float,
            "finished_at": float,
            "holder": str,  # writer identity of the process running it (crash detection)
            "progress": str,  # JSON: live numbers of the running phase (step, loss, ...)
            "timings": str,  # JSON: seconds per phase
            "counts": str,  # JSON: labels, groups, pairs, explored, drift_excluded, ...
            "gate": str,  # JSON: the gate's numbers
            "candidate": str,  # adapter version trained in this cycle
            "error": str,
        },
        pk="id",
        not_null={"created_at", "trigger", "state"},
    )
    db.table("cycles").create_index(["state", "id"], index_name="idx_cycles_state")

    db.execute(
        """
        CREATE TABLE learner_lease (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            holder TEXT,
            cycle_id INTEGER,
            acquired_at REAL,
            heartbeat_at REAL
        )
        """
    )
    db.execute("INSERT INTO learner_lease (id) VALUES (1)")


def _m003_evals(db: sqlite_utils.Database) -> None:
    """`hone eval` runs: one row per eval, one per task attempted (written as each task finishes)."""
    db.table("evals").create(
        {
            "id": str,
            "created_at": float,
            "finished_at": float,
            "state": str,  # running | done | interrupted | failed
            "tasks_file": str,
            "server": str,  # the URL the runs went to
            "adapter": str,  # what was asked for: a version, 'base', or NULL (whatever serves)
            "served": str,  # JSON: {adapter or 'base': runs served by it}
            "n_tasks": int,  # tasks selected (after --limit)
            "n_done": int,
            "n_success": int,
            "success_rate": float,
            "ci_low": float,  # 95% Wilson interval of the success rate
            "ci_high": float,
            "summary": str,  # JSON: breakdown by type, steps, tool-call validity, latency
            "options": str,  # JSON: limit, concurrency, temperature, max_steps
            "error": str,
        },
        pk="id",
        not_null={"created_at", "state", "tasks_file"},
    )
    db.table("evals").create_index(["created_at"], index_name="idx_evals_created")
    db.table("eval_results").create(
        {
            "eval_id": str,
            "task_id": str,
            "task_type": str,
            "success": int,
            "status": str,  # the last turn's run status, or 'error' when a request failed
            "answer": str,
            "expected": str,  # JSON
            "check_kind": str,
            "steps": int,  # model calls over all turns
            "tool_calls": int,
            "tool_errors": int,
            "latency_ms": float,  # all turns
            "adapter": str,  # what served the last turn
            "trajectory_ids": str,  # JSON list, one per turn
            "error": str,
            "finished_at": float,
        },
        pk=("eval_id", "task_id"),
        not_null={"eval_id", "task_id", "success", "finished_at"},
        foreign_keys=[("eval_id", "evals", "id")],
    )


def _m004_storage_state(db: sqlite_utils.Database) -> None:
    """What the run's storage namespace held when it started, so the learner can re-run it from there."""
    db.table("trajectories").add_column("storage_state", str)  # JSON: {"kv": {...}} or {"omitted": why}


MIGRATIONS: tuple[Migration, ...] = (_m001_initial, _m002_learner, _m003_evals, _m004_storage_state)
SCHEMA_VERSION = len(MIGRATIONS)
