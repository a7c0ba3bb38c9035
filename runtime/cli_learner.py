"""`hone learner`, `hone train`, `hone cycles`, `hone adapters`: the learning half from the shell.

They work on $HONE_HOME directly (SQLite + the vLLM that `hone serve` started, found through
$HONE_HOME/run/engine.json, or --vllm-url), so they need no server token and mirror the Python API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
import sys
import time
from typing import Any

import click

from .config import ConfigError, Settings
from .timeutil import format_time


def _settings() -> Settings:
    try:
        return Settings.load()
    except ConfigError as e:
        raise click.UsageError(f"configuration: {e}") from None


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"hone: {message}", err=True)
    sys.exit(code)


def _registry(settings: Settings):
    from learner.registry import Registry

    from .schema import SchemaError

    if not settings.db_path.exists():
        _fail(f"no trajectory log at {settings.db_path} yet (serve the agent first, or set HONE_HOME)")
    try:
        return Registry(settings.db_path)
    except (SchemaError, sqlite3.DatabaseError) as e:
        _fail(f"cannot read {settings.db_path}: {e}")


def _engine_url(settings: Settings, explicit: str | None) -> str:
    from learner.runner import EngineNotFound, find_engine_url

    try:
        return find_engine_url(settings, explicit)
    except EngineNotFound as e:
        _fail(str(e))
        raise  # unreachable


@click.command("learner")
@click.option("--vllm-url", help="the vLLM to use (default: the one `hone serve` started for this HONE_HOME)")
def learner_cmd(vllm_url: str | None) -> None:
    """Run the background learner alone: label runs, and start a cycle when one is due.

    `hone serve` starts it by default (learner_enabled); run it yourself when serving with
    HONE_LEARNER_ENABLED=false or on another schedule. Stop with Ctrl-C or SIGTERM: a cycle cut off
    this way is recorded as failed, and its training process is stopped with it."""
    from learner.worker import learner_loop

    settings = _settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = _engine_url(settings, vllm_url)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        await learner_loop(settings, url)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        click.echo("hone: learner stopped", err=True)


@click.command("train")
@click.option("--vllm-url", help="the vLLM to use (default: the one `hone serve` started for this HONE_HOME)")
@click.option("--json", "as_json", is_flag=True, help="print the finished cycle as JSON")
def train_cmd(vllm_url: str | None, as_json: bool) -> None:
    """Run one learner cycle now, in this process, showing its progress: label, explore, pair,
    train (LoRA-DPO), gate on held-out tasks, and hot-swap if it wins. Waits if a cycle is running.

    Exit code 0 when the cycle ran (promoted, rejected or skipped), 1 when it failed."""
    from learner.runner import agent_runner
    from learner.worker import LeaseHeld, run_cycle

    settings = _settings()
    settings.ensure_dirs()
    registry = _registry(settings)
    url = _engine_url(settings, vllm_url)
    say = lambda m: click.echo(f"hone: {m}", err=True)  # noqa: E731

    async def main() -> dict[str, Any]:
        async with agent_runner(settings, url, ready_timeout=60) as runner:
            waiting = False
            while True:
                try:
                    return await run_cycle(settings, registry, runner, trigger="manual", requested_by="cli",
                                           say=say, progress=True)
                except LeaseHeld as e:
                    if not waiting:
                        say(f"{e}; waiting for it to finish")
                        waiting = True
                    await asyncio.sleep(2)

    try:
        cycle = asyncio.run(main())
    except KeyboardInterrupt:
        _fail("interrupted; the cycle is recorded as failed", 130)
    except Exception as e:
        _fail(f"{type(e).__name__}: {e}")
    if as_json:
        click.echo(json.dumps(cycle, indent=2, default=str))
    else:
        _print_cycle(cycle)
    sys.exit(1 if cycle["state"] == "failed" else 0)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _gate_line(gate: dict[str, Any] | None) -> str:
    if not gate:
        return "-"
    return (f"{gate['candidate']} {_pct(gate['candidate_rate'])} vs {gate['current']} {_pct(gate['current_rate'])}"
            f" (n={gate['n_tasks']}, margin {gate['margin']}"
            + (f"; fixed {gate['fixed']}, broke {gate['broken']}, McNemar p {gate['p_value']:.2g})" if "fixed" in gate
               else ")"))


def _print_cycle(c: dict[str, Any]) -> None:
    click.echo(f"cycle {c['id']}  {c['state']}  trigger={c['trigger']}  started {format_time(c['started_at'])}")
    if c.get("error"):
        click.echo(f"  reason:  {c['error']}")
    click.echo(f"  phase:   {c['phase']}" + (f"  progress {json.dumps(c['progress'])}" if c.get("progress") else ""))
    if c.get("candidate"):
        click.echo(f"  adapter: {c['candidate']}")
    click.echo(f"  gate:    {_gate_line(c.get('gate'))}")
    guard = (c.get("gate") or {}).get("guard")
    if guard:
        from learner.gate import guard_counts

        parts = ", ".join(f"{name} {g['candidate_successes']}/{g['n']} vs {g['current_successes']}/{g['n']}"
                          for name, g in guard_counts(guard).items())
        click.echo(f"  guard:   {guard['candidate']} vs {guard['current']}: {parts} (fixed {guard['fixed']}, "
                   f"broke {guard['broken']}; fewer in any kind is rejected)")
    if c.get("timings"):
        click.echo("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in c["timings"].items()))
    if c.get("counts"):
        counts = {k: v for k, v in c["counts"].items() if k != "swap"}
        click.echo(f"  counts:  {json.dumps(counts)}")
        if "swap" in c["counts"]:
            click.echo(f"  swap:    {json.dumps(c['counts']['swap'])}")


@click.command("cycles")
@click.argument("cycle_id", type=int, required=False)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def cycles_cmd(cycle_id: int | None, limit: int, as_json: bool) -> None:
    """List learner cycles (newest first), or show one: state, phase timings, counts, gate numbers."""
    registry = _registry(_settings())
    if cycle_id is not None:
        c = registry.get_cycle(cycle_id)
        if c is None:
            _fail(f"no cycle {cycle_id}")
        click.echo(json.dumps(c, indent=2, default=str)) if as_json else _print_cycle(c)
        return
    rows = registry.list_cycles(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no cycles yet (`hone train` runs one)", err=True)
        return
    click.echo(f"{'id':>4}  {'state':9} {'trigger':8} {'started':19} {'secs':>6} {'pairs':>5} {'explored':>8}  gate")
    for c in rows:
        secs = (c["finished_at"] or time.time()) - c["started_at"] if c["started_at"] else None
        counts = c.get("counts") or {}
        click.echo(f"{c['id']:>4}  {c['state']:9} {c['trigger']:8} {format_time(c['started_at']) if c['started_at'] else '-':19} "
                   f"{'-' if secs is None else f'{secs:.0f}':>6} {counts.get('pairs', '-'):>5} "
                   f"{_explored(counts):>8}  {_gate_line(c.get('gate'))}")


def _explored(counts: dict) -> str:
    """Free exploration rollouts, plus operator trials where that round ran ("256+230")."""
    if "explore_rollouts" not in counts:
        return "-"
    trials = counts.get("trial_rollouts")
    return f"{counts['explore_rollouts']}+{trials}" if trials else str(counts["explore_rollouts"])


@click.group("adapters")
def adapters_cmd() -> None:
    """List trained adapters, or roll back to the previous one."""


@adapters_cmd.command("list")
@click.option("--json", "as_json", is_flag=True)
def adapters_list(as_json: bool) -> None:
    """Adapters newest first, with status (candidate, promoted, rejected, retired) and gate numbers."""
    registry = _registry(_settings())
    rows = registry.list_adapters()
    active, _ = registry.active()
    if as_json:
        click.echo(json.dumps({"active": active, "adapters": rows}, indent=2, default=str))
        return
    click.echo(f"active: {active or 'base model'}")
    for a in rows:
        mark = "*" if a["version"] == active else " "
        click.echo(f"{mark} {a['version']:10} {a['status']:9} parent={a['parent'] or 'base':10} "
                   f"created {format_time(a['created_at'])}  gate: {_gate_line(a.get('gate'))}"
                   + (f"  ({a['reason']})" if a.get("reason") else ""))


@adapters_cmd.command("rollback")
@click.option("--vllm-url", help="the vLLM to load it into (default: the one `hone serve` started)")
def adapters_rollback(vllm_url: str | None) -> None:
    """Serve the previously active adapter (or the base model) again, in one call.

    With a server running, the target is loaded into vLLM and verified before the switch; without
    one, only the pointer changes and the next `hone serve` loads it."""
    from learner.registry import RegistryError
    from learner.runner import EngineNotFound, find_engine_url
    from learner.swap import SwapError, rollback

    from .engine import ExternalEngine

    settings = _settings()
    registry = _registry(settings)
    try:
        url = find_engine_url(settings, vllm_url)
    except EngineNotFound:
        url = None

    async def main() -> dict[str, Any]:
        engine = ExternalEngine(url) if url else None
        try:
            return await rollback(engine, registry, by="cli", tolerance=settings.swap_tolerance)
        finally:
            if engine is not None:
                await engine.stop()

    try:
        result = asyncio.run(main())
    except (RegistryError, SwapError) as e:
        _fail(str(e))
    except Exception as e:
        _fail(f"rollback failed: {type(e).__name__}: {e}")
    click.echo(f"rolled back: now serving {result['to'] or 'the base model'} (was {result['from']})"
               + ("" if url else "; no running server found, it loads at the next `hone serve`"))
