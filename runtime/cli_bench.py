"""`hone bench loop`: the self-improvement experiment (learner/experiment.py) from the shell."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group("bench")
def bench_cmd() -> None:
    """Experiments that measure hone end to end."""


@bench_cmd.command("loop")
@click.option("--cycles", type=click.IntRange(1, 100), default=3, show_default=True, help="learner cycles to run (at most)")
@click.option("--promotions", type=click.IntRange(1, 100),
              help="stop once this many candidates were promoted; --cycles 4 --promotions 3 gives a run with one "
                   "rejection its third promotion (the target counts the first 3)")
@click.option("--train-tasks", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="training pool, streamed as traffic (default bench/data/asdiv-a-train.jsonl: 957 ASDiv-A items; "
                   "bench/data/mawps.jsonl for MAWPS)")
@click.option("--per-cycle", type=click.IntRange(1), default=64, show_default=True,
              help="training-pool tasks served before each cycle")
@click.option("--storage-traffic", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="storage tasks streamed beside the training pool (default bench/data/storage-train.jsonl)")
@click.option("--storage-per-cycle", type=click.IntRange(0), default=24, show_default=True,
              help="storage tasks streamed before each cycle (0: none, as runs 1-22)")
@click.option("--python-traffic", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="python tasks streamed beside the training pool (default bench/data/python-train.jsonl)")
@click.option("--python-per-cycle", type=click.IntRange(0), default=0, show_default=True,
              help="python tasks streamed before each cycle (run 24: 16; on SmolLM2-135M no exploration "
                   "rollout solved one, so off unless the model solves some python, or to give "
                   "--set HONE_DPO_RETAIN_WEIGHT=1 python runs to retain)")
@click.option("--gate-tasks", type=click.IntRange(1), default=200, show_default=True,
              help="taken from the end of the training pool for the gate; never served as traffic")
@click.option("--heldout", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="held-out pool, disjoint from training (default bench/data/asdiv-a-heldout-200.jsonl; "
                   "runs 1-11 reported bench/data/asdiv-a-heldout-40.jsonl)")
@click.option("--heldout-limit", type=click.IntRange(1), default=200, show_default=True)
@click.option("--suite", "suites", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="other suites evaluated each cycle (default tasks/storage.jsonl and tasks/python.jsonl)")
@click.option("--suite-limit", type=click.IntRange(1), default=45, show_default=True,
              help="tasks evaluated per suite (45: all of storage and python)")
@click.option("--guard", "guards", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="the learner's guard tasks, repeatable (HONE_GATE_GUARD_FILE; default "
                   "bench/data/storage-guard.jsonl and bench/data/python-guard.jsonl)")
@click.option("--no-guard", is_flag=True, help="promote on the gate alone, as runs 1-21 did")
@click.option("--concurrency", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--model", help="prepared model directory to serve (HONE_MODEL); default: the embedded SmolLM2")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="results folder (default bench/results/loop)")
@click.option("--set", "settings", multiple=True, metavar="HONE_X=V",
              help="a server/learner setting for this experiment, e.g. --set HONE_DPO_EPOCHS=3")
def loop_cmd(cycles: int, promotions: int | None, train_tasks: Path | None, per_cycle: int,
             storage_traffic: Path | None, storage_per_cycle: int, python_traffic: Path | None,
             python_per_cycle: int, gate_tasks: int, heldout: Path | None,
             heldout_limit: int, suites: tuple[Path, ...], suite_limit: int, guards: tuple[Path, ...], no_guard: bool,
             concurrency: int, model: str | None, out: Path | None, settings: tuple[str, ...]) -> None:
    """Serve a fresh agent, stream training tasks through it, let the background learner run
    CYCLES cycles, and after each evaluate the new candidate on a held-out pool and other suites.

    Writes loop.json, loop.md (the table) and loop.png (success against cycle) to --out, and
    keeps the experiment's HONE_HOME there (inspect it with HONE_HOME=... hone cycles / hone evals).
    Three cycles took 52.5-65 minutes on a 2-core CPU with AVX512-BF16 with storage traffic and the
    guard (runs 23, 25), 64 on a 2-core AVX2-only CPU without them (run 18); --set HONE_MAX_PAIRS=32
    trains less, --heldout-limit 100 evaluates less.
    On a GPU raise --per-cycle, --heldout-limit, --suite-limit and --concurrency, and pass --model
    for a bigger model."""
    import httpx

    from learner.experiment import ExperimentError, LoopConfig, run_experiment
    from learner.tasks import TaskFileError

    if promotions is not None and promotions > cycles:
        raise click.BadParameter(f"{promotions} promotions need at least as many --cycles (got {cycles})",
                                 param_hint="--promotions")
    cfg = LoopConfig(cycles=cycles, promotions=promotions, per_cycle=per_cycle, storage_per_cycle=storage_per_cycle,
                     python_per_cycle=python_per_cycle,
                     gate_tasks=gate_tasks, heldout_limit=heldout_limit, suite_limit=suite_limit,
                     concurrency=concurrency, model=model)
    if storage_traffic:
        cfg.storage_traffic = storage_traffic
    if python_traffic:
        cfg.python_traffic = python_traffic
    if train_tasks:
        cfg.train_tasks = train_tasks
    if heldout:
        cfg.heldout = heldout
    if suites:
        cfg.suites = tuple(suites)
    if guards and no_guard:
        raise click.BadParameter("--guard and --no-guard exclude each other", param_hint="--guard")
    if guards or no_guard:
        cfg.guards = tuple(guards)
    if out:
        cfg.out = out
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("HONE_"):
            raise click.BadParameter(f"expected HONE_NAME=VALUE, got {item!r}", param_hint="--set")
        cfg.server_env[key] = value
    for p in (cfg.train_tasks, cfg.heldout, *cfg.suites):
        if not Path(p).is_file():
            click.echo(f"hone: {p} does not exist (pass --train-tasks / --heldout / --suite)", err=True)
            sys.exit(1)
    say = lambda m: click.echo(f"hone: {m}", err=True)  # noqa: E731
    try:
        result = run_experiment(cfg, say)
    except (ExperimentError, TaskFileError) as e:
        click.echo(f"hone: {e}", err=True)
        sys.exit(1)
    except httpx.HTTPError as e:  # the experiment's server died or stopped answering mid-run
        click.echo(f"hone: lost the experiment's server ({type(e).__name__}: {e}); partial results in "
                   f"{cfg.out / 'loop.json'}, server log under {cfg.out}/home-*/serve.log", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"hone: interrupted; partial results in {cfg.out / 'loop.json'}", err=True)
        sys.exit(130)
    click.echo((cfg.out / "loop.md").read_text())
    v = result.get("verdicts") or {}
    sys.exit(0 if v else 1)
