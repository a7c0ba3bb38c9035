"""The trajectory database schema: connection settings, column formats and versioned migrations.

The schema version lives in ``PRAGMA user_version`` (an integer in the database header, written in
the same transaction as the migration itself, so a crash can never leave a half-applied version).
``MIGRATIONS[i]`` (runtime/migrations.py) takes a database from version ``i`` to ``i + 1``; ``migrate`` applies whatever is
pending. Every table and column is documented in docs/trajectory-schema.md, which also explains how
to add a migration.

Released migrations are frozen: they spell out their column types literally instead of importing
constants, because changing one would make fresh databases differ from migrated ones.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from .migrations import MIGRATIONS, SCHEMA_VERSION, Migration

# Values of trajectories.status. Checked in Python, not with a SQL CHECK constraint: SQLite cannot
# alter a CHECK, so adding a status later would need a full table rebuild.
STATUSES: tuple[str, ...] = (
    "running", "ok", "tool_error", "parse_error", "step_limit", "engine_error", "interrupted",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# How long a connection waits for another process's write lock before failing with "database is
# locked". Writes are single short transactions (milliseconds), so this only matters under heavy
# contention, e.g. the server and the learner writing at once; 30 s is far beyond any legitimate wait.
BUSY_TIMEOUT_S = 30.0


class SchemaError(RuntimeError):
    """The database cannot be used by this version of hone (e.g. it was written by a newer one)."""




def connect(path: str | Path) -> sqlite_utils.Database:
    """Open ``path`` configured the way every hone connection must be; does not migrate.

    The connection may be used from any thread (``check_same_thread=False``) but not from two at
    once: callers serialise access with a lock. It runs in autocommit mode (``isolation_level=None``)
    so that no statement silently opens a transaction; writers open theirs explicitly with
    ``BEGIN IMMEDIATE`` (see ``write_transaction``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    # Plugins could change connection behaviour behind our back; this database is ours alone.
    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # WAL: readers (HTTP handlers, CLI, learner) never block the writer and vice versa. The mode is
    # stored in the file, so this is a no-op after the first connection.
    db.enable_wal()
    # FULL (not NORMAL) syncs the WAL on every commit: a trajectory acknowledged to a client must
    # survive a power loss, not just a process crash. Costs one fsync per commit.
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database, *, migrations: Sequence[Migration] | None = None) -> int:
    """Bring ``db`` to the latest schema version and return that version. Idempotent.

    Safe to call from several processes at once (server, learner and CLI all call it on open):
    the version is re-read under the write lock, so each migration runs exactly once.
    ``migrations`` defaults to ``MIGRATIONS``; tests pass a longer list to simulate an upgrade.
    """
    steps = MIGRATIONS if migrations is None else migrations
    target = len(steps)
    version = schema_version(db)
    if version > target:
        raise SchemaError(
            f"database schema version {version} is newer than this hone supports ({target}); upgrade hone"
        )
    if version == target:
        return version  # the common case: no write lock taken
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # another process may have migrated while we waited
        if version > target:
            raise SchemaError(
                f"database schema version {version} is newer than this hone supports ({target}); upgrade hone"
            )
        for i in range(version, target):
            steps[i](db)
            # PRAGMA does not accept bound parameters; i is an int we computed.
            db.execute(f"PRAGMA user_version = {i + 1}")
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    return target


# ---------------------------------------------------------------- column formats
# How Python values map to columns. Shared by the store (writes) and anything reading rows directly.


class _IdGenerator:
    """Ids ``t_`` + 12 hex digits of unix milliseconds + 10 hex digits of randomness.

    They sort by creation time, so "newest first" is ``ORDER BY id DESC`` and a page cursor is just
    the last id seen. Within one process ids are strictly increasing even inside one millisecond
    (or if the clock steps back): the random part is incremented, as in monotonic ULIDs. 39 random
    bits leave 2^39 increments of headroom before the 40-bit field could overflow.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now: float) -> str:
        ms = int(now * 1000)
        with self._lock:
            if ms <= self._last_ms:
                ms, rand = self._last_ms, self._last_rand + 1
            else:
                rand = secrets.randbits(39)
            self._last_ms, self._last_rand = ms, rand
        return f"t_{ms:012x}{rand:010x}"


_ids = _IdGenerator()
TRAJECTORY_ID_RE = re.compile(r"^t_[0-9a-f]{22}$")


def new_trajectory_id(now: float) -> str:
    return _ids.new(now)


# ---------------------------------------------------------------- writer identity (crash recovery)
# A writer is "<boot id>:<pid>:<process start time in clock ticks since boot>" (Linux /proc).
# The start time tells a live writer from an unrelated process that got the same pid later; the
# boot id tells rows of a previous boot, whose writers are all dead (WAL databases cannot be shared
# between machines, so another boot id is never a live process elsewhere). Without /proc we fall
# back to "?" and a bare pid check.


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _boot_id() -> str:
    return ((_read("/proc/sys/kernel/random/boot_id") or "?").strip().replace("-", "") or "?")[:12]


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start ticks) of a live pid, or None if there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def current_writer() -> str:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{_boot_id()}:{pid}:{stat[1] if stat else '?'}"


def writer_alive(writer: str) -> bool:
    """Whether the process that wrote ``writer`` may still be running. Unparseable values (a
    future format) count as alive: recovery must never interrupt a live writer's rows."""
    parts = writer.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) <= 0:
        return True
    boot, pid, start = parts[0], int(parts[1]), parts[2]
    if start == "?":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        return True
    if boot != _boot_id():
        return False
    stat = _proc_stat(pid)
    # Z/X: killed but not yet reaped by its parent; it will never write again.
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == start


# Keys a message dict passed to TrajectoryStore.finish may have; anything else is a ValueError rather
# than silently dropped, because a misspelt key (say "completion_token_id") would lose training data.
MESSAGE_KEYS: frozenset[str] = frozenset({
    "role", "content", "tool_calls", "tool_call_id", "name", "is_error", "model", "adapter", "started_at",
    "latency_ms", "prompt_tokens", "completion_tokens", "prompt_token_ids", "completion_token_ids",
    "finish_reason", "generated",
})
_JSON_COLUMNS = ("tool_calls", "prompt_token_ids", "completion_token_ids")


def encode_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def _token_ids(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{what} must be a list of ints or None")
    return encode_json(list(value), what)


def message_rows(traj_id: str, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``messages`` (OpenAI-style dicts plus the logging keys in MESSAGE_KEYS) and return
    rows for the messages table, ``idx`` being the position in the list."""
    rows = []
    for idx, msg in enumerate(messages):
        where = f"messages[{idx}]"
        if not isinstance(msg, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(msg).__name__}")
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: {', '.join(sorted(MESSAGE_KEYS))}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where}: content must be a string or None (flatten content parts first)")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, (list, tuple)):
            raise ValueError(f"{where}: tool_calls must be a list in OpenAI format or None")
        generated = bool(msg.get("generated", False))
        if generated and role != "assistant":
            raise ValueError(f"{where}: only assistant messages can be generated, not {role!r}")
        row = {k: msg.get(k) for k in MESSAGE_KEYS}
        row.update(
            trajectory_id=traj_id, idx=idx, generated=int(generated), is_error=int(bool(msg.get("is_error", False))),
            # An empty list and None mean the same (no calls); store one form so queries stay simple.
            tool_calls=encode_json(list(tool_calls), f"{where}.tool_calls") if tool_calls else None,
            prompt_token_ids=_token_ids(msg.get("prompt_token_ids"), f"{where}.prompt_token_ids"),
            completion_token_ids=_token_ids(msg.get("completion_token_ids"), f"{where}.completion_token_ids"),
        )
        rows.append(row)
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The trajectories summary columns computed from its message rows.

    Only this run counts: n_steps, n_tool_calls and token sums cover generated assistant messages;
    n_tool_errors covers failed tool messages after the first generated one (tool results sent in
    the request history are not this run's errors). Token sums are NULL when no step reported them.
    """
    steps = [r for r in rows if r["generated"]]
    first = steps[0]["idx"] if steps else len(rows)

    def token_sum(column: str) -> int | None:
        known = [r[column] for r in steps if r[column] is not None]
        return sum(known) if known else None

    return {
        "n_steps": len(steps),
        "n_tool_calls": sum(len(json.loads(r["tool_calls"])) for r in steps if r["tool_calls"]),
        "n_tool_errors": sum(1 for r in rows if r["idx"] > first and r["role"] == "tool" and r["is_error"]),
        "prompt_tokens": token_sum("prompt_tokens"),
        "completion_tokens": token_sum("completion_tokens"),
    }


def decode_trajectory(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for column in ("request", "metadata", "storage_state"):
        if out.get(column) is not None:
            out[column] = json.loads(out[column])
    return out


def decode_message(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "trajectory_id"}
    for column in _JSON_COLUMNS:
        if out.get(column) is not None:
            out[column] = json.loads(out[column])
    out["is_error"] = bool(out["is_error"])
    out["generated"] = bool(out["generated"])
    return out

