"""Time filters as users type them: unix seconds or ISO-8601 (shared by the HTTP API and the CLI)."""

from __future__ import annotations

from datetime import datetime


def parse_time(value: str | None, name: str) -> float | None:
    """Unix seconds from '1732460000' or '2026-11-24' / '2026-11-24T17:00:00'; ValueError names `name`."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"{name}: expected unix seconds or an ISO-8601 time, got {value!r}") from None


def format_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"
