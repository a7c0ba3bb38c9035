"""The learner's records in the trajectory database: cycles, adapters, and the one-cycle lease.

Promotion and rollback change the adapters table and the serving pointer (`active_adapter`) in one
transaction, so the registry and what serves never disagree, even across a crash.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from runtime import schema

CYCLE_STATES: tuple[str, ...] = ("requested", "running", "promoted", "rejected", "skipped", "failed")
ADAPTER_STATUSES: tuple[str, ...] = ("candidate", "promoted", "rejected", "retired")
_CYCLE_JSON = ("progress", "timings", "counts", "gate")
_ADAPTER_JSON = ("train", "gate", "verify")
# A lease whose holder is alive but silent this long is taken over: a hung learner must not block
# learning forever. Heartbeats come every few seconds from a thread independent of training.
LEASE_TTL_S = 600.0


class RegistryError(RuntimeError):
    """A learner operation that cannot be done (nothing to roll back, unknown version, ...)."""


def _decode(row: dict[str, Any] | None, columns: tuple[str, ...]) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for c in columns:
        if out.get(c) is not None:
            out[c] = json.loads(out[c])
    return out


def _encode(fields: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    return {k: (schema.encode_json(v, k) if k in columns and v is not None else v) for k, v in fields.items()}


class Registry:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = schema.connect(self.path)
        schema.migrate(self.db)
        self.holder = schema.current_writer()
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite_utils.Database]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def locked(self) -> Iterator[sqlite_utils.Database]:
        """The connection, for code that runs its own queries or transactions (labels, pairs)."""
        with self._lock:
            yield self.db

    def count_labelled_since(self, since: float) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM trajectories WHERE source = 'serve' AND label IS NOT NULL "
                                   "AND finished_at > ?", [since]).fetchone()[0]

    def _one(self, sql: str, params: list[Any]) -> dict[str, Any] | None:
        with self._lock:
            cur = self.db.execute(sql, params)
            row = cur.fetchone()
            return dict(zip([d[0] for d in cur.description], row)) if row else None

    def _all(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    # ------------------------------------------------------------------ cycles

    def request_cycle(self, requested_by: str) -> dict[str, Any]:
        """Queue a manual cycle for the learner process; an already queued request is returned as is."""
        with self.write() as db:
            row = db.execute("SELECT id FROM cycles WHERE state = 'requested' ORDER BY id LIMIT 1").fetchone()
            cycle_id = row[0] if row else db.table("cycles").insert(
                {"created_at": time.time(), "trigger": "manual", "requested_by": requested_by,
                 "state": "requested"}).last_pk
        return self.get_cycle(cycle_id)  # type: ignore[return-value]

    def pending_request(self) -> dict[str, Any] | None:
        return _decode(self._one("SELECT * FROM cycles WHERE state = 'requested' ORDER BY id LIMIT 1", []),
                       _CYCLE_JSON)

    def start_cycle(self, trigger: str, requested_by: str | None = None, *, cycle_id: int | None = None) -> int:
        """Mark a cycle running under this process (a queued request, or a new row)."""
        now = time.time()
        fields = {"state": "running", "phase": "label", "started_at": now, "holder": self.holder}
        with self.write() as db:
            if cycle_id is not None:
                db.table("cycles").update(cycle_id, fields)
                return cycle_id
            return db.table("cycles").insert({"created_at": now, "trigger": trigger, "requested_by": requested_by,
                                              **fields}).last_pk

    def update_cycle(self, cycle_id: int, **fields: Any) -> None:
        with self.write() as db:
            db.table("cycles").update(cycle_id, _encode(fields, _CYCLE_JSON))

    def finish_cycle(self, cycle_id: int, state: str, **fields: Any) -> None:
        if state not in CYCLE_STATES[2:]:
            raise ValueError(f"a cycle finishes as one of {CYCLE_STATES[2:]}, not {state!r}")
        self.update_cycle(cycle_id, state=state, finished_at=time.time(), **fields)

    def get_cycle(self, cycle_id: int) -> dict[str, Any] | None:
        return _decode(self._one("SELECT * FROM cycles WHERE id = ?", [cycle_id]), _CYCLE_JSON)

    def list_cycles(self, limit: int = 20, state: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        rows = self._all(f"SELECT * FROM cycles {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        return [_decode(r, _CYCLE_JSON) for r in rows]  # type: ignore[misc]

    def last_started_cycle(self) -> dict[str, Any] | None:
        return _decode(self._one("SELECT * FROM cycles WHERE started_at IS NOT NULL ORDER BY started_at DESC LIMIT 1",
                                 []), _CYCLE_JSON)

    def fail_orphaned_cycles(self) -> int:
        """Cycles left `running` by a process that died are marked failed; returns how many."""
        running = self._all("SELECT id, holder, phase FROM cycles WHERE state = 'running'", [])
        dead = [c for c in running if not c["holder"] or not schema.writer_alive(c["holder"])]
        for c in dead:
            self.finish_cycle(c["id"], "failed", error=f"the learner process ({c['holder']}) died during phase "
                                                      f"{c['phase']!r}")
        return len(dead)

    # ------------------------------------------------------------------ the lease: one cycle at a time

    def acquire_lease(self, cycle_id: int | None = None) -> dict[str, Any] | None:
        """Take the lease; returns None on success, else the current holder's row."""
        now = time.time()
        with self.write() as db:
            row = dict(zip(("holder", "cycle_id", "heartbeat_at"), db.execute(
                "SELECT holder, cycle_id, heartbeat_at FROM learner_lease WHERE id = 1").fetchone()))
            held = (row["holder"] and row["holder"] != self.holder and schema.writer_alive(row["holder"])
                    and now - (row["heartbeat_at"] or 0) < LEASE_TTL_S)
            if held:
                return row
            db.execute("UPDATE learner_lease SET holder = ?, cycle_id = ?, acquired_at = ?, heartbeat_at = ? WHERE id = 1",
                       [self.holder, cycle_id, now, now])
        return None

    def set_lease_cycle(self, cycle_id: int) -> None:
        with self.write() as db:
            db.execute("UPDATE learner_lease SET cycle_id = ? WHERE id = 1 AND holder = ?", [cycle_id, self.holder])

    def heartbeat(self) -> None:
        with self.write() as db:
            db.execute("UPDATE learner_lease SET heartbeat_at = ? WHERE id = 1 AND holder = ?",
                       [time.time(), self.holder])

    def release_lease(self) -> None:
        with self.write() as db:
            db.execute("UPDATE learner_lease SET holder = NULL, cycle_id = NULL WHERE id = 1 AND holder = ?",
                       [self.holder])

    # ------------------------------------------------------------------ adapters

    def new_version(self, adapters_dir: Path | None = None) -> str:
        """hone-v<K+1> for the highest K so far; a cycle's epoch snapshots (hone-vK-e1) share its K.

        Folders in `adapters_dir` count too: a training killed after saving an epoch's snapshot
        leaves a folder with no row, and versions are never overwritten, so reusing its K would
        fail every later cycle."""
        versions = [r["version"] for r in self._all("SELECT version FROM adapters", [])]
        if adapters_dir is not None and Path(adapters_dir).is_dir():
            versions += [p.name for p in Path(adapters_dir).iterdir()]
        numbers = [int(m.group(1)) for v in versions if (m := re.match(r"hone-v(\d+)", v))]
        return f"hone-v{max(numbers, default=0) + 1}"

    def add_adapter(self, version: str, path: Path, *, parent: str | None, cycle_id: int | None,
                    train: dict[str, Any]) -> None:
        with self.write() as db:
            db.table("adapters").insert(_encode({
                "version": version, "path": str(path), "parent": parent, "cycle_id": cycle_id,
                "created_at": time.time(), "status": "candidate", "train": train}, _ADAPTER_JSON))

    def update_adapter(self, version: str, **fields: Any) -> None:
        with self.write() as db:
            db.table("adapters").update(version, _encode(fields, _ADAPTER_JSON))

    def get_adapter(self, version: str) -> dict[str, Any] | None:
        return _decode(self._one("SELECT * FROM adapters WHERE version = ?", [version]), _ADAPTER_JSON)

    def list_adapters(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM adapters ORDER BY created_at DESC LIMIT ?", [limit])
        return [_decode(r, _ADAPTER_JSON) for r in rows]  # type: ignore[misc]

    def active(self) -> tuple[str | None, str | None]:
        row = self._one("SELECT name, path FROM active_adapter WHERE id = 1", [])
        return (row["name"], row["path"]) if row else (None, None)

    def promote(self, version: str, *, verify: dict[str, Any] | None = None) -> str | None:
        """Make `version` the served adapter; returns what it replaced (None: the base model)."""
        now = time.time()
        with self.write() as db:
            row = db.execute("SELECT path, status FROM adapters WHERE version = ?", [version]).fetchone()
            if row is None:
                raise RegistryError(f"no adapter {version!r}")
            previous = db.execute("SELECT name FROM active_adapter WHERE id = 1").fetchone()[0]
            if previous == version:
                raise RegistryError(f"{version} is already the active adapter")
            if previous:
                db.execute("UPDATE adapters SET status = 'retired', retired_at = ? WHERE version = ?", [now, previous])
            db.execute("UPDATE adapters SET status = 'promoted', previous = ?, promoted_at = ?, verify = ?, "
                       "reason = NULL WHERE version = ?",
                       [previous, now, None if verify is None else schema.encode_json(verify, "verify"), version])
            db.execute("UPDATE active_adapter SET name = ?, path = ?, updated_at = ? WHERE id = 1",
                       [version, row[0], now])
        return previous

    def rollback_target(self) -> tuple[str, str | None, str | None]:
        """(active version, version to restore or None for base, its path) — without changing anything."""
        active, _ = self.active()
        if active is None:
            raise RegistryError("nothing to roll back: the base model is serving")
        row = self.get_adapter(active)
        if row is None:
            raise RegistryError(f"the active adapter {active!r} is not in the registry; set it explicitly")
        target = row["previous"]
        target_row = self.get_adapter(target) if target else None
        if target and target_row is None:
            raise RegistryError(f"rollback target {target!r} is not in the registry")
        return active, target, target_row["path"] if target_row else None

    def rollback(self, *, by: str) -> tuple[str, str | None]:
        """Serve the adapter that was active before the current one; returns (from, to)."""
        active, target, path = self.rollback_target()
        now = time.time()
        with self.write() as db:
            current = db.execute("SELECT name FROM active_adapter WHERE id = 1").fetchone()[0]
            if current != active:
                raise RegistryError(f"the active adapter changed to {current!r} meanwhile; try again")
            db.execute("UPDATE adapters SET status = 'retired', retired_at = ?, reason = ? WHERE version = ?",
                       [now, f"rolled back by {by}", active])
            if target:
                db.execute("UPDATE adapters SET status = 'promoted', retired_at = NULL WHERE version = ?", [target])
            db.execute("UPDATE active_adapter SET name = ?, path = ?, updated_at = ? WHERE id = 1", [target, path, now])
        return active, target
