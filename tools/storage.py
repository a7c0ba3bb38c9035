"""A namespaced key-value store for the agent, kept in the project's SQLite database.

One table, ``kv(namespace, key, value, updated_at)`` with primary key ``(namespace, key)``, that
may share the database file (``hone.db``) with other writers. Hence:

* every operation opens its own connection, runs one short transaction and closes it, so a
  ``KVStore`` can be shared by any number of threads and never holds a lock between calls;
* writes start with ``BEGIN IMMEDIATE`` so the per-namespace key count checked before an insert
  is still true when the insert happens, even with concurrent writers;
* a busy timeout makes a briefly locked database wait instead of failing.

Isolation between namespaces rests on every statement binding the namespace as a parameter next
to the key (never formatting either into SQL, never using LIKE, whose ``%``/``_`` are
wildcards). A key is an opaque string: ``"../b"``, ``"b:key"`` or ``"%"`` are just keys inside
the caller's own namespace.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Database

from tools.errors import ToolError

TABLE = "kv"
BUSY_TIMEOUT_S = 5.0
_COLUMNS = {"namespace": str, "key": str, "value": str, "updated_at": str}
_ACTIONS = ("put", "get", "list", "delete")
_HINT_KEYS = 5


class KVStore:
    """Per-namespace string storage with limits; every failure the model can fix is a ToolError."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        max_key_chars: int = 256,
        max_value_bytes: int = 65_536,
        max_keys: int = 1_000,
    ) -> None:
        self.db_path = Path(db_path)
        self.max_key_chars = max_key_chars
        self.max_value_bytes = max_value_bytes
        self.max_keys = max_keys
        self._ensure_schema()

    # ---- the agent-facing entry point ----
    def call(
        self, namespace: str, action: str, key: str | None = None, value: str | None = None
    ) -> str:
        """Run one storage tool call and return the text the model sees."""
        verb = action.strip().lower() if isinstance(action, str) else ""
        if verb == "put":
            if value is None:
                raise ToolError("storage: 'put' needs a value to store")
            return self.put(namespace, self._required_key(verb, key), value)
        if verb == "get":
            stored = self.get(namespace, self._required_key(verb, key))
            return stored if stored else "(the stored value is an empty string)"
        if verb == "delete":
            return self.delete(namespace, self._required_key(verb, key))
        if verb == "list":
            prefix = key or ""
            keys = self.list(namespace, prefix)
            if not keys:
                return f"no keys starting with {prefix!r}" if prefix else "no keys stored yet"
            return f"{len(keys)} key(s): {json.dumps(keys, ensure_ascii=False)}"
        raise ToolError(f"storage: unknown action {action!r}; use one of {', '.join(_ACTIONS)}")

    # ---- operations ----
    def put(self, namespace: str, key: str, value: str) -> str:
        """Store value under key, replacing any previous value."""
        self._check_namespace(namespace)
        self._check_key(key)
        size = self._value_size(value)
        with self._transaction(write=True) as db:
            exists = self._exists(db, namespace, key)
            if not exists and self._count(db, namespace) >= self.max_keys:
                raise ToolError(
                    f"storage: limit of {self.max_keys} keys reached; delete a key first"
                )
            db.execute(
                f"INSERT INTO {TABLE} (namespace, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(namespace, key) DO UPDATE SET "
                "value = excluded.value, updated_at = excluded.updated_at",
                [namespace, key, value, _now()],
            )
        return f"{'updated' if exists else 'stored'} {key!r} ({size} bytes)"

    def get(self, namespace: str, key: str) -> str:
        """The value stored under key; ToolError naming some existing keys if there is none."""
        self._check_namespace(namespace)
        self._check_key(key)
        with self._transaction(write=False) as db:
            row = db.execute(
                f"SELECT value FROM {TABLE} WHERE namespace = ? AND key = ?", [namespace, key]
            ).fetchone()
            if row is not None:
                return str(row[0])
            raise ToolError(f"storage: no key {key!r}. {self._hint(db, namespace)}")

    def list(self, namespace: str, prefix: str = "") -> builtins.list[str]:
        """Keys in the namespace starting with prefix, sorted."""
        self._check_namespace(namespace)
        if not isinstance(prefix, str):
            raise ToolError("storage: the key prefix for 'list' must be text")
        with self._transaction(write=False) as db:
            # substr() compares the prefix literally; LIKE would treat % and _ as wildcards.
            rows = db.execute(
                f"SELECT key FROM {TABLE} WHERE namespace = ? AND substr(key, 1, ?) = ? "
                "ORDER BY key",
                [namespace, len(prefix), prefix],
            ).fetchall()
        return [str(row[0]) for row in rows]

    def delete(self, namespace: str, key: str) -> str:
        """Remove key; ToolError if it does not exist."""
        self._check_namespace(namespace)
        self._check_key(key)
        with self._transaction(write=True) as db:
            cursor = db.execute(
                f"DELETE FROM {TABLE} WHERE namespace = ? AND key = ?", [namespace, key]
            )
            if cursor.rowcount == 0:
                raise ToolError(f"storage: no key {key!r} to delete. {self._hint(db, namespace)}")
        return f"deleted {key!r}"

    # ---- a namespace's whole state: recorded with a run, restored for its re-run ----
    def snapshot(self, namespace: str, max_bytes: int) -> dict[str, str] | None:
        """Every key and its value, or None when together they exceed max_bytes (UTF-8)."""
        self._check_namespace(namespace)
        with self._transaction(write=False) as db:
            size = db.execute(
                f"SELECT coalesce(sum(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))), 0) "
                f"FROM {TABLE} WHERE namespace = ?", [namespace]
            ).fetchone()[0]
            if size > max_bytes:
                return None
            rows = db.execute(
                f"SELECT key, value FROM {TABLE} WHERE namespace = ? ORDER BY key", [namespace]
            ).fetchall()
        return {str(k): str(v) for k, v in rows}

    def restore(self, namespace: str, items: dict[str, str]) -> None:
        """Make the namespace hold exactly `items` (what a recorded run started from)."""
        self._check_namespace(namespace)
        if len(items) > self.max_keys:
            raise ToolError(f"storage: {len(items)} keys exceed the limit of {self.max_keys}")
        for key, value in items.items():
            self._check_key(key)
            self._value_size(value)
        now = _now()
        with self._transaction(write=True) as db:
            db.execute(f"DELETE FROM {TABLE} WHERE namespace = ?", [namespace])
            db.conn.executemany(
                f"INSERT INTO {TABLE} (namespace, key, value, updated_at) VALUES (?, ?, ?, ?)",
                [(namespace, k, v, now) for k, v in items.items()],
            )

    # ---- plumbing ----
    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Database]:
        # isolation_level=None: the sqlite3 driver opens no implicit transactions, so the
        # explicit BEGIN below is the only one and its scope is exactly this block.
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db = Database(conn)
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.commit()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise ToolError("storage: the database is busy; try again") from exc
            raise
        finally:
            conn.close()

    def _ensure_schema(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db = Database(conn)
            db.enable_wal()
            db[TABLE].create(  # type: ignore[union-attr]
                _COLUMNS,
                pk=("namespace", "key"),
                not_null=set(_COLUMNS),
                if_not_exists=True,
            )
            found = set(db[TABLE].columns_dict)
            pk = db[TABLE].pks
            if not set(_COLUMNS) <= found or sorted(pk) != ["key", "namespace"]:
                raise RuntimeError(
                    f"{self.db_path}: table {TABLE!r} exists with an incompatible schema "
                    f"(columns {sorted(found)}, primary key {pk})"
                )
        finally:
            conn.close()

    @staticmethod
    def _required_key(verb: str, key: str | None) -> str:
        if key is None or key == "":
            raise ToolError(f"storage: {verb!r} needs a non-empty key")
        return key

    @staticmethod
    def _check_namespace(namespace: str) -> None:
        # The namespace comes from hone, not the model, so a bad one is a programming error.
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")

    def _check_key(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise ToolError("storage: the key must be non-empty text")
        if len(key) > self.max_key_chars:
            raise ToolError(
                f"storage: key too long ({len(key)} characters, limit {self.max_key_chars})"
            )
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
            raise ToolError("storage: keys cannot contain control characters such as newlines")
        _utf8(key, "key")

    def _value_size(self, value: str) -> int:
        if not isinstance(value, str):
            raise ToolError("storage: the value must be text (serialise numbers or lists first)")
        size = len(_utf8(value, "value"))
        if size > self.max_value_bytes:
            raise ToolError(
                f"storage: value too large ({size} bytes, limit {self.max_value_bytes})"
            )
        return size

    @staticmethod
    def _exists(db: Database, namespace: str, key: str) -> bool:
        row = db.execute(
            f"SELECT 1 FROM {TABLE} WHERE namespace = ? AND key = ?", [namespace, key]
        ).fetchone()
        return row is not None

    @staticmethod
    def _count(db: Database, namespace: str) -> int:
        row = db.execute(f"SELECT count(*) FROM {TABLE} WHERE namespace = ?", [namespace])
        return int(row.fetchone()[0])

    def _hint(self, db: Database, namespace: str) -> str:
        rows = db.execute(
            f"SELECT key FROM {TABLE} WHERE namespace = ? ORDER BY updated_at DESC, key LIMIT ?",
            [namespace, _HINT_KEYS + 1],
        ).fetchall()
        if not rows:
            return "Nothing is stored yet; use action 'put' first."
        keys = [str(row[0]) for row in rows[:_HINT_KEYS]]
        more = " and more" if len(rows) > _HINT_KEYS else ""
        return f"Existing keys include {json.dumps(keys, ensure_ascii=False)}{more}; use 'list'."


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolError(f"storage: the {what} is not valid text (unpaired surrogate)") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
