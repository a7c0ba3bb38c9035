"""How TrajectoryStore.list selects and pages: filters become SQL clauses, pages continue from cursors.

A cursor is the last id of a page, versioned and base64-encoded so that callers treat it as opaque
and an edited or foreign cursor is an error rather than a silently different page.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from . import schema

_CURSOR_PREFIX = "v1:"


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The id a cursor points after; ValueError if it is not a cursor this store produced."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    last_id = raw.removeprefix(_CURSOR_PREFIX)
    if not raw.startswith(_CURSOR_PREFIX) or not schema.TRAJECTORY_ID_RE.match(last_id):
        raise ValueError(
            f"invalid cursor {cursor!r}: pass back the next_cursor value from a previous list() call, unchanged"
        )
    return last_id


def filter_sql(
    *,
    status: str | None,
    label: str | None,
    adapter: str | None,
    caller: str | None,
    source: str | None,
    task_id: str | None,
    request_key: str | None,
    since: float | None,
    until: float | None,
) -> tuple[list[str], list[Any]]:
    if status is not None and status not in schema.STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(schema.STATUSES)}")
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("status", status), ("label", label), ("caller", caller), ("source", source),
        ("task_id", task_id), ("request_key", request_key),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if adapter == "base":  # the base model is stored as NULL
        clauses.append("adapter IS NULL")
    elif adapter is not None:
        clauses.append("adapter = ?")
        params.append(adapter)
    for op, bound, name in ((">=", since, "since"), ("<", until, "until")):
        if bound is not None:
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise ValueError(f"{name} must be unix seconds (a number), got {bound!r}")
            clauses.append(f"created_at {op} ?")
            params.append(float(bound))
    return clauses, params
