"""Tasks: something the agent can be asked again and checked. They come from logged traffic (a
stateless run whose metadata carries `expected_answer`) or from a JSONL file of held-out tasks.

A task's key groups attempts at the same task: its `task_id` when the caller gave one, else the
normalized request (`request_key`: the user turns, lower-cased, whitespace collapsed, hashed). The
train/validation split is a pure function of the key, so it never changes between cycles and a
validation task can never leak into a training pair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import CHECKS, CheckError, check_answer, default_check


class TaskFileError(ValueError):
    """A task file line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Task:
    key: str
    messages: tuple[dict[str, Any], ...]  # OpenAI-format input, as the user sent it
    expected: Any
    check: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def run_metadata(self, **extra: Any) -> dict[str, Any]:
        """Metadata for a re-run: same task id and expected answer, so it groups and labels alike."""
        meta = {**self.metadata, "task_id": self.key, "expected_answer": self.expected}
        if self.check:
            meta["check"] = self.check
        return {**meta, **extra}


def task_key(row: dict[str, Any]) -> str:
    return str(row["task_id"]) if row.get("task_id") else f"req:{row['request_key']}"


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the first 32 bits of sha256(key) below `fraction` of the range."""
    h = int(hashlib.sha256(f"hone-split:{key}".encode()).hexdigest()[:8], 16)
    return h < fraction * 2**32


def task_from_trajectory(row: dict[str, Any]) -> Task | None:
    """The task a logged run answered, if it can be asked again and checked; else None.

    Thread turns are not re-runnable on their own (their history and storage state are not in the
    request), nor are runs without an expected answer."""
    if row.get("thread_id"):
        return None
    metadata = row.get("metadata") or {}
    request = row.get("request") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    if isinstance(request, str):
        request = json.loads(request)
    expected = metadata.get("expected_answer")
    if expected is None:
        return None
    if isinstance(request.get("input"), str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": request["input"]}]
    elif isinstance(request.get("messages"), list) and request["messages"]:
        messages = request["messages"]
    else:
        return None
    check = metadata.get("check")
    check = check if check in CHECKS else default_check(expected) if check is None else None
    if check is None or not _checkable(expected, check):
        return None
    keep = {k: v for k, v in metadata.items() if k not in ("task_id", "expected_answer", "check")}
    return Task(task_key(row), tuple(messages), expected, check, keep)


def _checkable(expected: Any, check: str) -> bool:
    """Whether replies can be checked against `expected` (else check_answer raises CheckError,
    which would abort a whole gate or exploration batch rather than fail one attempt)."""
    try:
        check_answer("", expected, check)
    except CheckError:
        return False
    return True


def load_task_file(path: str | Path) -> list[Task]:
    """Single-turn tasks, one JSON object per line: {"id", "question", "answer"} (+ optional "check")."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"{path}: cannot read: {e}") from None
    tasks, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TaskFileError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise TaskFileError(f"{where}: expected a JSON object")
        missing = [k for k in ("id", "question", "answer") if k not in obj]
        if missing:
            raise TaskFileError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise TaskFileError(f"{where}: question must be a non-empty string")
        check = obj.get("check") or default_check(obj["answer"])
        if check not in CHECKS:
            raise TaskFileError(f"{where}: check must be one of {', '.join(CHECKS)}")
        if not _checkable(obj["answer"], check):
            raise TaskFileError(f"{where}: answer {obj['answer']!r} cannot be checked with {check!r}")
        key = f"file:{obj['id']}"
        if key in seen:
            raise TaskFileError(f"{where}: duplicate id {obj['id']!r}")
        seen.add(key)
        tasks.append(Task(key, ({"role": "user", "content": obj["question"]},), obj["answer"], check))
    return tasks
