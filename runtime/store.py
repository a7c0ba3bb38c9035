"""TrajectoryStore: the synchronous API over the trajectory database (see docs/trajectory-schema.md).

Threading: the store holds three connections, each guarded by its own lock, so one instance can be
shared by a writer thread, request handlers and the CLI:

* a write connection: every write is one ``BEGIN IMMEDIATE`` transaction (taking the write lock up
  front means SQLite's busy timeout applies; a deferred transaction that reads first and then
  writes can fail at once with "database is locked" when another process committed in between);
* a read connection for get/list/count (WAL: readers never wait for the writer);
* an adapter connection used only by ``get_active_adapter``, which runs on every request and must
  not queue behind a slow ``list``.

``export`` opens a connection of its own for as long as the caller iterates.
"""

from __future__ import annotations

import builtins  # `list` is a method name here; annotations after it need the builtin
import json
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from . import schema
from .schema import decode_message, decode_trajectory, encode_json, message_rows, summarize
from .store_query import decode_cursor, encode_cursor, filter_sql

FINAL_STATUSES = tuple(s for s in schema.STATUSES if s != "running")
MAX_LIMIT = 10_000  # a page is held in memory; the CLI allows up to this many rows


class NotFound(LookupError):
    """No trajectory with the given id."""


class StoreClosed(RuntimeError):
    """The store was closed; open a new TrajectoryStore."""


class TrajectoryStore:
    """Trajectories, their messages and feedback in one SQLite file. Migrates the file on open."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.writer = schema.current_writer()
        self._write_db = schema.connect(self.path)
        try:
            self.schema_version = schema.migrate(self._write_db)
        except BaseException:
            self._write_db.close()
            raise
        self._read_db = schema.connect(self.path)
        self._adapter_db = schema.connect(self.path)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._adapter_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close all connections. Idempotent; an ``export`` still being iterated keeps its own."""
        for lock, db in (
            (self._write_lock, self._write_db), (self._read_lock, self._read_db),
            (self._adapter_lock, self._adapter_db),
        ):
            with lock:
                self._closed = True
                db.close()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"TrajectoryStore({str(self.path)!r}) is closed")

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction: committed on normal exit, rolled back on any exception."""
        with self._write_lock:
            self._check_open()
            db = self._write_db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.conn.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite_utils.Database]:
        with self._read_lock:
            self._check_open()
            yield self._read_db

    # ------------------------------------------------------------------ writes

    def start(
        self,
        *,
        caller: str | None,
        thread_id: str | None,
        request: Mapping[str, Any] | str,
        metadata: Mapping[str, Any] | None,
        request_key: str | None,
        task_id: str | None = None,
        source: str = "serve",
        model: str,
        storage_state: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a new 'running' trajectory and return its id.

        ``request`` is the request body, as a mapping or as the raw JSON text received.
        ``task_id`` defaults to ``metadata["task_id"]``.
        """
        if isinstance(request, str):
            try:
                json.loads(request)
            except ValueError as e:
                raise ValueError(f"request is not valid JSON: {e}") from None
            request_text = request
        elif isinstance(request, Mapping):
            request_text = encode_json(dict(request), "request")
        else:
            raise ValueError(f"request must be a mapping or JSON text, got {type(request).__name__}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a JSON object (mapping) or None, got {type(metadata).__name__}")
        if task_id is None and metadata is not None and metadata.get("task_id") is not None:
            task_id = str(metadata["task_id"])
        if not source:
            raise ValueError("source must be a non-empty string such as 'serve'")
        if not model:
            raise ValueError("model must be the base model name")
        now = time.time()
        traj_id = schema.new_trajectory_id(now)
        row = {
            "id": traj_id, "created_at": now, "status": "running", "caller": caller, "thread_id": thread_id,
            "request_key": request_key, "task_id": task_id, "source": source, "request": request_text,
            "metadata": None if metadata is None else encode_json(dict(metadata), "metadata"),
            "model": model, "writer": self.writer,
            "storage_state": None if storage_state is None else encode_json(dict(storage_state), "storage_state"),
        }
        with self._write() as db:
            db.table("trajectories").insert(row)
        return traj_id

    def finish(
        self,
        traj_id: str,
        *,
        status: str,
        messages: Sequence[Mapping[str, Any]],
        final_answer: str | None = None,
        error: str | None = None,
        adapter: str | None = None,
        latency_ms: float | None = None,
    ) -> None:
        """Write all messages and the summary of a running trajectory in one transaction.

        Counts and token sums are computed from ``messages`` (see ``summarize``). Raises NotFound
        for an unknown id and ValueError for an unknown status, an invalid message, or a
        trajectory that is no longer running (finished twice, or recovered as interrupted).
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"unknown final status {status!r}; expected one of {', '.join(FINAL_STATUSES)}")
        rows = message_rows(traj_id, messages)  # validate and encode before taking the write lock
        summary = summarize(rows)
        values = {
            "status": status, "finished_at": time.time(), "final_answer": final_answer, "error": error,
            "adapter": adapter, "latency_ms": latency_ms, **summary,
        }
        assignments = ", ".join(f"{k} = :{k}" for k in values)
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE trajectories SET {assignments} WHERE id = :_id AND status = 'running'",
                {**values, "_id": traj_id},
            )
            if cursor.rowcount == 0:
                found = db.execute("SELECT status FROM trajectories WHERE id = ?", [traj_id]).fetchone()
                if found is None:
                    raise NotFound(f"no trajectory with id {traj_id!r}")
                raise ValueError(f"trajectory {traj_id} is not running (status {found[0]!r}); it cannot be finished again")
            if rows:
                db.table("messages").insert_all(rows)

    def recover_interrupted(self) -> int:
        """Mark 'running' trajectories whose writer process is gone as 'interrupted'; return how many.

        A writer is gone if its pid is not alive, or is alive with another start time (the pid was
        reused, e.g. this very process after a restart in a container). Rows of live writers, such
        as a learner running next to the server, are left alone.
        """
        with self._read() as db:
            running = db.execute("SELECT id, writer FROM trajectories WHERE status = 'running'").fetchall()
        verdict: dict[str, bool] = {}
        dead: list[tuple[str, str]] = []
        for traj_id, writer in running:
            if writer not in verdict:
                verdict[writer] = writer == self.writer or schema.writer_alive(writer)
            if not verdict[writer]:
                dead.append((traj_id, writer))
        if not dead:
            return 0
        now = time.time()
        count = 0
        with self._write() as db:
            for traj_id, writer in dead:
                # status = 'running' again: the row may have changed since we looked.
                count += db.execute(
                    "UPDATE trajectories SET status = 'interrupted', finished_at = ?, "
                    "error = COALESCE(error, ?) WHERE id = ? AND status = 'running'",
                    [now, f"writer {writer} exited before finishing this trajectory", traj_id],
                ).rowcount
        return count

    def add_feedback(self, traj_id: str, *, score: float, comment: str | None, caller: str) -> dict[str, Any]:
        """Attach a score in [0, 1] to a trajectory; returns the stored feedback row."""
        if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be a number between 0 and 1, got {score!r}")
        if comment is not None and not isinstance(comment, str):
            raise ValueError(f"comment must be a string or None, got {type(comment).__name__}")
        row: dict[str, Any] = {
            "trajectory_id": traj_id, "score": float(score), "comment": comment, "caller": caller,
            "created_at": time.time(),
        }
        with self._write() as db:
            if db.execute("SELECT 1 FROM trajectories WHERE id = ?", [traj_id]).fetchone() is None:
                raise NotFound(f"no trajectory with id {traj_id!r}")
            row["id"] = db.table("feedback").insert(row).last_pk
        return row

    def set_active_adapter(self, name: str | None, path: str | Path | None) -> None:
        """Point serving at adapter ``name`` loaded from ``path``; ``(None, None)`` means the base model."""
        if (name is None) != (path is None):
            raise ValueError("name and path must both be set (an adapter) or both be None (the base model)")
        if name is not None and not name.strip():
            raise ValueError("adapter name must not be empty")
        with self._write() as db:
            db.execute(
                "UPDATE active_adapter SET name = ?, path = ?, updated_at = ? WHERE id = 1",
                [name, None if path is None else str(path), time.time()],
            )

    # ------------------------------------------------------------------ reads

    def get_active_adapter(self) -> tuple[str | None, str | None]:
        """(name, path) of the adapter to serve; (None, None) for the base model.

        Read on every request, so deliberately uncached (a swap made by another process applies to
        the very next request) and kept to one primary-key lookup on a one-row table over its own
        connection: about 5 µs on the development machine, Python's sqlite3 overhead included.
        """
        with self._adapter_lock:
            self._check_open()
            row = self._adapter_db.conn.execute("SELECT name, path FROM active_adapter WHERE id = 1").fetchone()
        return (row[0], row[1]) if row is not None else (None, None)

    def get(self, traj_id: str) -> dict[str, Any] | None:
        """A full trajectory with its "messages" and "feedback" lists, or None if unknown."""
        with self._read() as db:
            return _load_full(db, traj_id)

    def list(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        adapter: str | None = None,
        caller: str | None = None,
        source: str | None = None,
        task_id: str | None = None,
        request_key: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        """One page of trajectory rows (no messages), newest first, and the cursor of the next page
        (None on the last page). ``adapter="base"`` selects trajectories served by the base model;
        ``since``/``until`` bound ``created_at`` (unix seconds, ``since <= created_at < until``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit!r}")
        clauses, params = filter_sql(
            status=status, label=label, adapter=adapter, caller=caller, source=source, task_id=task_id,
            request_key=request_key, since=since, until=until,
        )
        if cursor is not None:
            clauses.append("id < ?")
            params.append(decode_cursor(cursor))
        with self._read() as db:
            rows = list(
                db.table("trajectories").rows_where(" AND ".join(clauses) or None, params, order_by="id DESC", limit=limit + 1)
            )
        page = [decode_trajectory(r) for r in rows[:limit]]
        next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
        return page, next_cursor

    def count(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        adapter: str | None = None,
        caller: str | None = None,
        source: str | None = None,
        task_id: str | None = None,
        request_key: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> int:
        """How many trajectories match the filters (same meaning as in ``list``)."""
        clauses, params = filter_sql(
            status=status, label=label, adapter=adapter, caller=caller, source=source, task_id=task_id,
            request_key=request_key, since=since, until=until,
        )
        with self._read() as db:
            return db.table("trajectories").count_where(" AND ".join(clauses) or "1", params)

    def export(
        self,
        *,
        status: str | None = None,
        label: str | None = None,
        adapter: str | None = None,
        caller: str | None = None,
        source: str | None = None,
        task_id: str | None = None,
        request_key: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream full trajectories (as ``get`` returns them) matching the filters, newest first.

        Rows are fetched as the caller iterates, over a private connection inside one read
        transaction, so the export is a consistent snapshot and does not hold up other reads.
        While it is open the WAL cannot be checkpointed past it, so don't leave one half-consumed.
        """
        self._check_open()
        clauses, params = filter_sql(
            status=status, label=label, adapter=adapter, caller=caller, source=source, task_id=task_id,
            request_key=request_key, since=since, until=until,
        )
        return self._export(" AND ".join(clauses) or None, params)

    def _export(self, where: str | None, params: builtins.list[Any]) -> Iterator[dict[str, Any]]:
        db = schema.connect(self.path)
        try:
            db.execute("BEGIN")
            for row in db.table("trajectories").rows_where(where, params, order_by="id DESC"):
                yield _with_children(db, decode_trajectory(row))
        finally:
            db.close()  # also ends the read transaction


def _load_full(db: sqlite_utils.Database, traj_id: str) -> dict[str, Any] | None:
    rows = list(db.table("trajectories").rows_where("id = ?", [traj_id]))
    return _with_children(db, decode_trajectory(rows[0])) if rows else None


def _with_children(db: sqlite_utils.Database, traj: dict[str, Any]) -> dict[str, Any]:
    traj["messages"] = [
        decode_message(r) for r in db.table("messages").rows_where("trajectory_id = ?", [traj["id"]], order_by="idx")
    ]
    traj["feedback"] = list(db.table("feedback").rows_where("trajectory_id = ?", [traj["id"]], order_by="id"))
    return traj
