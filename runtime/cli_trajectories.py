"""`hone trajectories list|show|export|feedback`: read the log straight from SQLite (no server needed)."""

from __future__ import annotations

import json
import sqlite3
import sys
from typing import Any

import click

from .config import ConfigError, Settings
from .timeutil import format_time, parse_time


def _store():
    from .schema import SchemaError
    from .store import TrajectoryStore

    try:
        settings = Settings.load()
    except ConfigError as e:
        raise click.UsageError(f"configuration: {e}") from None
    if not settings.db_path.exists():
        click.echo(f"hone: no trajectory log at {settings.db_path} yet (serve the agent first, or set HONE_HOME)",
                   err=True)
        sys.exit(1)
    try:
        return TrajectoryStore(settings.db_path)
    except (SchemaError, sqlite3.DatabaseError) as e:
        click.echo(f"hone: cannot read {settings.db_path}: {e}", err=True)
        sys.exit(1)


def _time(value: str | None, name: str) -> float | None:
    try:
        return parse_time(value, name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=name) from None


def _filters(f):
    for opt in reversed([
        click.option("--status", help="ok, tool_error, parse_error, step_limit, engine_error, interrupted, running"),
        click.option("--label", help="success or failure (set by the learner / feedback)"),
        click.option("--adapter", help="adapter version, or 'base'"),
        click.option("--caller", help="caller name"),
        click.option("--source", help="serve, exploration or eval"),
        click.option("--task-id", help="task id from the run's metadata"),
        click.option("--since", help="unix seconds or ISO-8601 time"),
        click.option("--until", help="unix seconds or ISO-8601 time"),
    ]):
        f = opt(f)
    return f


def _filter_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kw)
    kw["since"] = _time(kw.get("since"), "--since")
    kw["until"] = _time(kw.get("until"), "--until")
    return kw


def _clip(text: str | None, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


@click.group()
def trajectories() -> None:
    """Inspect the trajectory log ($HONE_HOME/hone.db)."""


@trajectories.command("list")
@_filters
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--cursor", help="continue from the cursor printed by the previous page")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def list_cmd(limit: int, cursor: str | None, as_json: bool, **filters: Any) -> None:
    """Newest runs first, as a table."""
    store = _store()
    try:
        rows, next_cursor = store.list(limit=limit, cursor=cursor, **_filter_kwargs(filters))
    except ValueError as e:
        click.echo(f"hone: {e}", err=True)
        sys.exit(2)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
    else:
        header = f"{'id':<28} {'created':<19} {'status':<12} {'label':<8} {'adapter':<10} {'steps':>5}  question -> answer"
        click.echo(header)
        for r in rows:
            question = _question(r)
            click.echo(f"{r['id']:<28} {format_time(r['created_at']):<19} {r['status']:<12} {(r.get('label') or '-'):<8} "
                       f"{(r.get('adapter') or 'base'):<10} {r.get('n_steps') or 0:>5}  "
                       f"{_clip(question, 50)} -> {_clip(r.get('final_answer'), 30)}")
    if next_cursor:
        click.echo(f"next page: --cursor {next_cursor}", err=True)


def _question(row: dict[str, Any]) -> str:
    try:
        req = json.loads(row["request"]) if isinstance(row.get("request"), str) else row.get("request") or {}
    except json.JSONDecodeError:
        return ""
    if req.get("input"):
        return str(req["input"])
    users = [m.get("content") for m in req.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


@trajectories.command("show")
@click.argument("trajectory_id")
@click.option("--json", "as_json", is_flag=True, help="the full record as JSON")
@click.option("--prompt", is_flag=True, help="also show the system prompt and worked examples")
def show_cmd(trajectory_id: str, as_json: bool, prompt: bool) -> None:
    """One run: each message, tool call and result, with the model/adapter behind each step."""
    t = _store().get(trajectory_id)
    if t is None:
        click.echo(f"hone: no trajectory {trajectory_id!r}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(t, indent=2, default=str))
        return
    click.echo(f"trajectory {t['id']}  status={t['status']}  caller={t['caller']}  thread={t.get('thread_id') or '-'}")
    click.echo(f"created {format_time(t['created_at'])}  latency {t.get('latency_ms') or 0:.0f} ms  "
               f"steps {t.get('n_steps')}  tool calls {t.get('n_tool_calls')} ({t.get('n_tool_errors')} failed)  "
               f"tokens {t.get('prompt_tokens')}+{t.get('completion_tokens')}")
    if t.get("metadata"):
        click.echo(f"metadata {json.dumps(t['metadata'])}")
    state = t.get("storage_state") or {}
    if state.get("kv"):
        click.echo(f"storage at start: {len(state['kv'])} key(s): {', '.join(sorted(state['kv']))}")
    elif state.get("omitted"):
        click.echo(f"storage at start: not recorded ({state['omitted']})")
    if t.get("label"):
        click.echo(f"label {t['label']} ({t.get('label_source')})")
    if t.get("error"):
        click.echo(f"error {t['error']}")
    click.echo("")
    messages = t.get("messages") or []
    if not prompt:
        hidden = _prefix_length(messages)
        if hidden:
            click.echo(f"  ({hidden} prompt messages hidden: system prompt and worked examples; --prompt shows them)")
        messages = messages[hidden:]
    for m in messages:
        _print_message(m)
    for fb in t.get("feedback") or []:
        click.echo(f"feedback score={fb['score']} by {fb['caller']}: {fb.get('comment') or ''}")


def _prefix_length(messages: list[dict[str, Any]]) -> int:
    """The system prompt and worked examples come first and are never generated in this run."""
    n = 1 if messages and messages[0]["role"] == "system" else 0
    while n and _is_example_block(messages, n):
        n += 4
    return n


def _is_example_block(messages: list[dict[str, Any]], i: int) -> bool:
    block = messages[i:i + 4]
    return (len(block) == 4 and block[0]["role"] == "user" and block[1]["role"] == "assistant"
            and any(str(tc.get("id", "")).startswith("example_") for tc in block[1].get("tool_calls") or []))


def _print_message(m: dict[str, Any]) -> None:
    role = m["role"]
    if role == "assistant":
        who = f"assistant [{m.get('adapter') or m.get('model') or 'base'}"
        if m.get("latency_ms") is not None:
            who += f", {m['latency_ms']:.0f} ms, {m.get('completion_tokens')} tok"
        who += "]" if m.get("generated") else ", from history]"
        if m.get("content"):
            click.echo(f"{who}: {m['content']}")
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", {})
            click.echo(f"{who} calls {fn.get('name')}({fn.get('arguments')})")
    elif role == "tool":
        mark = "ERROR " if m.get("is_error") else ""
        extra = f" [{m['latency_ms']:.1f} ms]" if m.get("latency_ms") is not None else ""
        click.echo(f"tool {m.get('name')}{extra}: {mark}{m.get('content')}")
    else:
        click.echo(f"{role}: {m.get('content')}")


@trajectories.command("export")
@_filters
@click.option("-o", "--output", type=click.File("w"), default="-", help="file to write (default stdout)")
def export_cmd(output, **filters: Any) -> None:
    """Full trajectories (messages, token ids, feedback) as JSONL."""
    n = 0
    try:
        for t in _store().export(**_filter_kwargs(filters)):
            output.write(json.dumps(t, default=str) + "\n")
            n += 1
    except ValueError as e:
        click.echo(f"hone: {e}", err=True)
        sys.exit(2)
    click.echo(f"exported {n} trajectories", err=True)


@trajectories.command("feedback")
@click.argument("trajectory_id")
@click.argument("score")
@click.option("--comment", help="free text")
def feedback_cmd(trajectory_id: str, score: str, comment: str | None) -> None:
    """Record feedback: SCORE is success, failure, or a number in [0, 1]."""
    from .store import NotFound

    value = {"success": 1.0, "failure": 0.0}.get(score.lower())
    if value is None:
        try:
            value = float(score)
        except ValueError:
            raise click.BadParameter("expected success, failure or a number in [0, 1]", param_hint="SCORE") from None
    try:
        _store().add_feedback(trajectory_id, score=value, comment=comment, caller="cli")
    except NotFound:
        click.echo(f"hone: no trajectory {trajectory_id!r}", err=True)
        sys.exit(1)
    except ValueError as e:
        click.echo(f"hone: {e}", err=True)
        sys.exit(2)
    click.echo(f"recorded score {value:g} on {trajectory_id}")
