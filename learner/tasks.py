"""Tasks: something the agent can be asked again and checked. They come from logged traffic (a
stateless run whose metadata carries `expected_answer`) or from a JSONL task file (docs/evals.md):

    {"id", "question", "answer", "check"?, "type"?}                                   single-turn
    {"id", "turns": [{"content", "new_thread"?}, ...], "answer", "check"?, "type"?}    multi-turn

A logged run that found data in its storage namespace (`trajectories.storage_state`) carries it
as the task's `storage`: re-runs start from a namespace holding exactly that.

A multi-turn task's turns share one storage namespace; a turn with `new_thread: true` starts a new
conversation (no history), so what it needs from earlier turns must come from storage. The answer
is checked against the final reply of the last turn.

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
class Turn:
    content: str
    new_thread: bool = False


@dataclass(frozen=True)
class Task:
    key: str
    messages: tuple[dict[str, Any], ...]  # OpenAI-format input, as the user sent it (empty if multi-turn)
    expected: Any
    check: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    turns: tuple[Turn, ...] = ()  # multi-turn tasks: the user's turns, in order
    group: str | None = field(default=None, compare=False)  # for breakdowns: the file's "type" or "source"
    # What the storage namespace held when the logged run started; a re-run starts from it.
    storage: dict[str, str] | None = field(default=None, compare=False, hash=False)

    @property
    def id(self) -> str:
        return self.key.removeprefix("file:")

    def run_metadata(self, **extra: Any) -> dict[str, Any]:
        """Metadata for a re-run: same task id and expected answer, so it groups and labels alike."""
        meta = {**self.metadata, "task_id": self.key, "expected_answer": self.expected}
        if self.check:
            meta["check"] = self.check
        return {**meta, **extra}


def fingerprint(task: Task) -> str:
    """What the agent is asked and how the reply is checked, hashed. A gate result recorded under a
    task's key is reused only while this is unchanged: a task file edited under the same ids holds
    new tasks."""
    body = [list(task.messages), [[t.content, t.new_thread] for t in task.turns], task.expected, task.check]
    if task.storage:  # only then: fingerprints recorded before storage states existed stay valid
        body.append(task.storage)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_key(row: dict[str, Any]) -> str:
    return str(row["task_id"]) if row.get("task_id") else f"req:{row['request_key']}"


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the first 32 bits of sha256(key) below `fraction` of the range."""
    h = int(hashlib.sha256(f"hone-split:{key}".encode()).hexdigest()[:8], 16)
    return h < fraction * 2**32


def task_from_trajectory(row: dict[str, Any]) -> Task | None:
    """The task a logged run answered, if it can be asked again and checked; else None.

    Thread turns are not re-runnable on their own (their history is not in the request), nor are
    runs without an expected answer, nor runs whose storage state was too large to record. A run
    that started with data in its namespace (a recall turn) is re-run from that data."""
    if row.get("thread_id"):
        return None
    metadata = row.get("metadata") or {}
    request = row.get("request") or {}
    state = row.get("storage_state") or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    if isinstance(request, str):
        request = json.loads(request)
    if isinstance(state, str):
        state = json.loads(state)
    if "omitted" in state:
        return None
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
    # what the logged run was (its cycle, its operator trial) is not part of the task: a free re-run of
    # a task last seen in a trial must not be marked as one
    keep = {k: v for k, v in metadata.items()
            if k not in ("task_id", "expected_answer", "check", "cycle_id", "explore_operation", "gate_side")}
    return Task(task_key(row), tuple(messages), expected, check, keep, storage=state.get("kv") or None)


def _checkable(expected: Any, check: str) -> bool:
    """Whether replies can be checked against `expected` (else check_answer raises CheckError,
    which would abort a whole gate or exploration batch rather than fail one attempt)."""
    try:
        check_answer("", expected, check)
    except CheckError:
        return False
    return True


def load_task_file(path: str | Path) -> list[Task]:
    """Tasks from a JSONL file (single- or multi-turn, see the module docstring); TaskFileError names
    the file and line of the first unusable one."""
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
        try:
            task = parse_task(obj)
        except TaskFileError as e:
            raise TaskFileError(f"{where}: {e}") from None
        if task.key in seen:
            raise TaskFileError(f"{where}: duplicate id {obj['id']!r}")
        seen.add(task.key)
        tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{path}: no tasks in the file")
    return tasks


def parse_task(obj: Any) -> Task:
    if not isinstance(obj, dict):
        raise TaskFileError("expected a JSON object")
    shape = ("question", "turns")
    if all(k in obj for k in shape):
        raise TaskFileError("give either question or turns, not both")
    body = "turns" if "turns" in obj else "question"
    missing = [k for k in ("id", body, "answer") if k not in obj]
    if missing:
        raise TaskFileError(f"missing {', '.join(missing)}")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool) or str(obj["id"]).strip() == "":
        raise TaskFileError("id must be a non-empty string or an integer")
    check = obj.get("check") or default_check(obj["answer"])
    if check not in CHECKS:
        raise TaskFileError(f"check must be one of {', '.join(CHECKS)}")
    if not _checkable(obj["answer"], check):
        raise TaskFileError(f"answer {obj['answer']!r} cannot be checked with {check!r}")
    group = obj.get("type", obj.get("source"))
    if group is not None and not isinstance(group, str):
        raise TaskFileError("type must be a string")
    key = f"file:{obj['id']}"
    if body == "question":
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise TaskFileError("question must be a non-empty string")
        return Task(key, ({"role": "user", "content": obj["question"]},), obj["answer"], check, group=group)
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise TaskFileError("turns must be a non-empty list")
    parsed = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not t["content"].strip():
            raise TaskFileError(f"turns[{i}] must be an object with non-empty content")
        if not isinstance(t.get("new_thread", False), bool):
            raise TaskFileError(f"turns[{i}].new_thread must be true or false")
        unknown = set(t) - {"content", "new_thread"}
        if unknown:
            raise TaskFileError(f"turns[{i}] has unknown field(s) {', '.join(sorted(unknown))}")
        parsed.append(Turn(t["content"], t.get("new_thread", False)))
    return Task(key, (), obj["answer"], check, turns=tuple(parsed), group=group)
