"""`hone eval` and `hone evals`: measure the served agent on a task file, and list what was measured.

`hone eval` talks to the server over HTTP (like `hone run`: --url / $HONE_URL, --token / $HONE_TOKEN);
results are stored in $HONE_HOME's database, next to the trajectories the server logged for them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from typing import Any

import click

from .cli_learner import _fail, _settings
from .config import Settings
from .timeutil import format_time


def _store(settings: Settings):
    from .evals import EvalStore
    from .schema import SchemaError

    settings.ensure_dirs()
    try:
        return EvalStore(settings.db_path)
    except (SchemaError, sqlite3.DatabaseError) as e:
        _fail(f"cannot open {settings.db_path}: {e}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _rate_line(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['success']}/{r['n']} = {_pct(r['rate'])}  (95% CI {_pct(lo)} to {_pct(hi)})"


def print_eval(row: dict[str, Any]) -> None:
    s = row["summary"] or {}
    click.echo(f"eval {row['id']}  [{row['state']}]  {row['tasks_file']}  adapter: {row['adapter'] or 'as served'}")
    if not s:
        click.echo(f"  {row['n_done']}/{row['n_tasks']} tasks done, {row['n_success']} solved")
        return
    click.echo(f"  success      {_rate_line(s)}")
    for group, r in (s.get("by_type") or {}).items():
        click.echo(f"    {group:<10} {_rate_line(r)}")
    validity = s.get("tool_call_validity")
    click.echo(f"  mean steps   {s['mean_steps']}")
    click.echo(f"  tool calls   {s['tool_calls']} ({s['tool_errors']} refused by the tool, {s['parse_errors']} unparsable)"
               f"; validity {_pct(validity)}")
    lat = s["latency_ms"]
    if lat["mean"] is not None:
        click.echo(f"  latency      mean {lat['mean']:.0f} ms, p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms per task")
    click.echo(f"  served by    {', '.join(f'{k}: {v}' for k, v in (row['served'] or {}).items()) or '-'}")
    if s.get("request_errors"):
        click.echo(f"  request errors: {s['request_errors']}")
    if row.get("error"):
        click.echo(f"  error: {row['error']}")


def compare_evals(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after` against `before`, on the tasks both ran (by task id)."""
    from .evals import paired

    if before["tasks_file"] != after["tasks_file"]:
        _fail(f"{before['id']} ran {before['tasks_file']} and {after['id']} ran {after['tasks_file']}: "
              "only evals of the same task file compare task by task")
    result = paired({r["task_id"]: r["success"] for r in before["results"]},
                    {r["task_id"]: r["success"] for r in after["results"]})
    if result["n"] == 0:
        _fail(f"{before['id']} and {after['id']} have no finished task in common")
    return {"before": {"id": before["id"], "adapter": before["adapter"]},
            "after": {"id": after["id"], "adapter": after["adapter"]}, "tasks_file": before["tasks_file"], **result}


def print_comparison(c: dict[str, Any]) -> None:
    n = c["n"]
    click.echo(f"{c['after']['id']} ({c['after']['adapter'] or 'as served'}) against "
               f"{c['before']['id']} ({c['before']['adapter'] or 'as served'}) on {n} common tasks of {c['tasks_file']}")
    b, a = c["before_success"], c["after_success"]
    click.echo(f"  success {b}/{n} -> {a}/{n} ({_pct(b / n)} -> {_pct(a / n)})")
    click.echo(f"  fixed {c['fixed']}, broke {c['broken']}: exact McNemar p = {c['p_value']:.3g}"
               + ("" if c["p_value"] < 0.05 else " (not significant at 0.05)"))
    for label, tasks in (("fixed", c["fixed_tasks"]), ("broke", c["broken_tasks"])):
        if tasks:
            click.echo(f"  {label}: {' '.join(tasks)}")


@click.command("eval")
@click.option("--tasks", "tasks_file", required=True, type=click.Path(dir_okay=False),
              help="JSONL task file (single- or multi-turn; see docs/evals.md)")
@click.option("--adapter", help="serve the runs with this adapter version, or 'base' (needs the admin token); "
              "default: whatever serves")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N tasks")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True, help="tasks in flight")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1, 50), help="model calls per turn (default: the server's)")
@click.option("--url", help="server URL (default $HONE_URL or http://HOST:PORT from the settings)")
@click.option("--token", help="bearer token (default $HONE_TOKEN)")
@click.option("--json", "as_json", is_flag=True, help="print the stored eval (summary and per-task results) as JSON")
def eval_cmd(tasks_file: str, adapter: str | None, limit: int | None, concurrency: int, temperature: float,
             max_steps: int | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Run every task in TASKS through the served agent's HTTP API and report the success rate
    (with a 95% confidence interval), a breakdown by task type, mean steps, tool-call validity and
    latency. The eval is stored; `hone evals` lists them.

    Exit code 0 when the eval ran, 1 when it could not (bad task file, server unreachable)."""
    from learner.tasks import TaskFileError, load_task_file

    from .cli import _auth_headers, _server_url
    from .evals import EvalAborted, EvalOptions, run_eval

    try:
        tasks = load_task_file(tasks_file)
    except TaskFileError as e:
        _fail(str(e))
    settings = _settings()
    store = _store(settings)
    server = _server_url(url)
    options = EvalOptions(adapter=adapter, limit=limit, concurrency=concurrency, temperature=temperature,
                          max_steps=max_steps)
    n = min(len(tasks), limit or len(tasks))
    solved = [0]
    with click.progressbar(length=n, label=f"eval {n} tasks", file=sys.stderr, show_pos=True,
                           item_show_func=lambda _: f"solved {solved[0]}") as bar:
        def on_result(r) -> None:
            solved[0] += r.success
            bar.update(1)

        try:
            row = asyncio.run(run_eval(store, tasks, server=server, headers=_auth_headers(token), tasks_file=tasks_file,
                                       options=options, on_result=on_result))
        except EvalAborted as e:
            _fail(f"eval stopped: {e} (results so far are kept: `hone evals`)")
        except KeyboardInterrupt:
            _fail("interrupted; results so far are kept (`hone evals`)", 130)
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(row, indent=2, default=str))
    else:
        print_eval(row)


@click.command("evals")
@click.argument("eval_id", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--failed", "only_failed", is_flag=True, help="with EVAL_ID: list only the tasks it got wrong")
@click.option("--compare", "other_id", metavar="OTHER_ID",
              help="with EVAL_ID: compare OTHER_ID against it task by task (fixed, broken, McNemar p)")
@click.option("--json", "as_json", is_flag=True)
def evals_cmd(eval_id: str | None, limit: int, only_failed: bool, other_id: str | None, as_json: bool) -> None:
    """List stored evals, newest first; with EVAL_ID, show one with its per-task results."""
    settings = _settings()
    if not settings.db_path.exists():
        _fail(f"no database at {settings.db_path} yet (run `hone eval` first, or set HONE_HOME)")
    if other_id and not eval_id:
        _fail("--compare needs an EVAL_ID to compare against: `hone evals EVAL_ID --compare OTHER_ID`")
    store = _store(settings)
    try:
        if other_id:
            rows = {i: store.get(i) for i in (eval_id, other_id)}
            for i, row in rows.items():
                if row is None:
                    _fail(f"no eval {i!r} (see `hone evals`)")
            comparison = compare_evals(rows[eval_id], rows[other_id])
            if as_json:
                click.echo(json.dumps(comparison, indent=2))
            else:
                print_comparison(comparison)
            return
        if eval_id:
            row = store.get(eval_id)
            if row is None:
                _fail(f"no eval {eval_id!r} (see `hone evals`)")
            if only_failed:
                row["results"] = [r for r in row["results"] if not r["success"]]
            if as_json:
                click.echo(json.dumps(row, indent=2, default=str))
                return
            print_eval(row)
            for r in row["results"]:
                mark = "ok  " if r["success"] else "FAIL"
                answer = (r["error"] or r["answer"] or "").replace("\n", " ")[:80]
                click.echo(f"  {mark} {r['task_id']:<16} {r['status']:<11} expected {json.dumps(r['expected'])[:20]:<20}"
                           f" got: {answer}")
            return
        rows = store.list(limit)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no evals yet: `hone eval --tasks FILE`")
        return
    click.echo(f"{'id':<25} {'created':<20} {'state':<11} {'tasks':>7} {'success':>8} {'95% CI':>15}  {'adapter':<10} file")
    for r in rows:
        ci = "-" if r["ci_low"] is None else f"{_pct(r['ci_low'])}-{_pct(r['ci_high'])}"
        click.echo(f"{r['id']:<25} {format_time(r['created_at']):<20} {r['state']:<11} "
                   f"{r['n_done']:>3}/{r['n_tasks']:<3} {_pct(r['success_rate']):>8} {ci:>15}  "
                   f"{r['adapter'] or '-':<10} {r['tasks_file']}")
