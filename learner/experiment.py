"""`hone bench loop`: the self-improvement experiment, end to end, on real parts.

    fresh HONE_HOME, `hone serve` (vLLM + agent + the background learner process)
    eval base: held-out pool + the other suites, through the HTTP API
    repeat K times:
        stream the next tasks of the training pool through POST /v1/runs, with expected answers
        (verifiers label them; the served answers are "the agent's success on its own traffic")
        queue a cycle (POST /v1/learner/cycles): the background learner labels, explores, pairs,
        trains, gates on the gate pool, checks the guard (storage, python) and hot-swaps, as in production
        eval the cycle's candidate on the held-out pool and suites (promoted or not)

The gate pool is the LAST `gate_tasks` of the training pool: never streamed, so never trained on,
and disjoint from the held-out pool the table reports. Settings and task pools: loop_setup.py;
results: report.py (table, plot, target).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx

from runtime.config import ConfigError, Settings
from runtime.engine import free_port, serving_dtype
from runtime.evals import EvalOptions, EvalStore, paired, run_eval, turn_metadata, turn_plan
from runtime.hardware import cpu_has_native_bf16, cpu_model, gpu_present, usable_cores

from .checks import check_answer
from .labels import FAILURE_STATUSES
from .loop_setup import (  # noqa: F401  (re-exported: the experiment's public names)
    REPO, ExperimentError, LoopConfig, config_record, load_pools, load_side_traffic, traffic_batch)
from .tasks import Task

FINAL_STATES = ("promoted", "rejected", "skipped", "failed")
# The experiment measures hone's own learner defaults (runtime/config.py), under the user's HONE_*
# variables and --set. Until 2026-12-05 it set its own (64 pairs, 256 rollouts, lr 1e-4, the NLL term,
# one pair per task); those moved the number in runs 10-15 and are the product's defaults now.
# Settings that stay the experiment's: nothing is served while a cycle runs here, so agent runs
# (exploration, gate) go 16 at a time, where vLLM's batches keep 2 cores ~1.6x busier than 8 did.
# Training gets every core for the same reason (HONE_LEARNER_THREADS below). The guard's tasks count
# as gate evidence (gate_pool_guard): run 25's arithmetic-only gate refused two storage gains.
LOOP_DEFAULTS = {"HONE_EXPLORE_CONCURRENCY": "16", "HONE_GATE_POOL_GUARD": "true"}  # since run 26


# ---------------------------------------------------------------- the server
@contextlib.contextmanager
def serve(home: Path, env_extra: dict[str, str], timeout: float, say: Callable[[str], None]) -> Iterator[str]:
    """A `hone serve` with its own HONE_HOME; yields its URL, stops it (and its vLLM) at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HONE_")}
    env.update(HONE_HOME=str(home), HONE_PORT=str(port), HONE_HOST="127.0.0.1", HONE_LOG_LEVEL="warning")
    env.update(env_extra)
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    try:
        say(f"starting hone serve (HONE_HOME={home}); log: {home / 'serve.log'}")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ExperimentError(f"hone serve exited with {proc.returncode}; see {home / 'serve.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ExperimentError(f"hone serve not healthy after {timeout:.0f}s; see {home / 'serve.log'}")
            time.sleep(2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# ---------------------------------------------------------------- traffic, cycles, evals
async def stream_traffic(url: str, tasks: Sequence[Task], concurrency: int, namespace: str = "traffic",
                         transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Serve `tasks` as ordinary traffic with expected answers, each task in a storage namespace of
    its own, turn by turn as `hone eval` sends them; how many the agent got right, by task group."""
    sem = asyncio.Semaphore(concurrency)
    solved, failed_requests = 0, 0
    adapters: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=900, transport=transport) as client:

        async def one(index: int, task: Task) -> None:
            nonlocal solved, failed_requests
            tally = groups.setdefault(task.group or "default", [0, 0])
            tally[1] += 1
            ns = f"{namespace}.{index}"
            plan = turn_plan(task, ns)
            async with sem:
                for i, (content, thread_id) in enumerate(plan):
                    body = {**content, "metadata": turn_metadata(task, i), "namespace": ns,
                            **({"thread_id": thread_id} if thread_id else {})}
                    try:
                        r = await client.post("/v1/runs", json=body)
                    except httpx.HTTPError:
                        failed_requests += 1
                        return
                    if r.status_code != 200:
                        failed_requests += 1
                        return
                    out = r.json()
                    adapters[out["adapter"] or "base"] = adapters.get(out["adapter"] or "base", 0) + 1
                    if out["status"] in FAILURE_STATUSES:
                        return  # an earlier turn failed (the save never happened): so did the task
            ok = check_answer(out["answer"], task.expected, task.check)
            solved += ok
            tally[0] += ok

        await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks)))
    n = len(tasks)
    return {"n": n, "solved": solved, "rate": solved / n if n else None, "failed_requests": failed_requests,
            "served": adapters, "groups": {g: {"solved": s, "n": k} for g, (s, k) in sorted(groups.items())}}


async def run_cycle(url: str, timeout: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Queue a cycle for the background learner and wait for it to end; its record."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.post("/v1/learner/cycles")
        if r.status_code != 202:
            raise ExperimentError(f"could not queue a cycle: {r.status_code} {r.text[:300]}")
        cycle_id = r.json()["cycle"]["id"]
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            cycle = (await client.get(f"/v1/learner/cycles/{cycle_id}")).json()
            shown = (cycle["state"], cycle.get("phase"))
            if shown != last:
                say(f"cycle {cycle_id}: {cycle['state']} {cycle.get('phase') or ''}")
                last = shown
            if cycle["state"] in FINAL_STATES:
                return cycle
            await asyncio.sleep(5)
    raise ExperimentError(f"cycle {cycle_id} did not finish within {timeout:.0f}s")


async def evaluate(store: EvalStore, url: str, adapter: str, pools: dict[str, tuple[str, list[Task]]],
                   concurrency: int) -> dict[str, Any]:
    """Each pool through `hone eval`'s code, served by `adapter`; {pool: eval summary + id}."""
    out = {}
    for name, (path, tasks) in pools.items():
        row = await run_eval(store, tasks, server=url, headers={}, tasks_file=path,
                             options=EvalOptions(adapter=adapter, concurrency=concurrency))
        out[name] = {"eval_id": row["id"], "rate": row["success_rate"], "ci95": [row["ci_low"], row["ci_high"]],
                     "n": row["n_done"], "success": row["n_success"], "mean_steps": row["summary"]["mean_steps"],
                     "tool_call_validity": row["summary"]["tool_call_validity"]}
    return out


def against_parent(store: EvalStore, evals: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """Each pool task by task against what served before (fixed, broken, McNemar p): a drop of a few
    tasks is a regression only if chance would rarely produce it."""
    out = {}
    for pool, ev in evals.items():
        if pool in parent:
            d = paired(store.successes(parent[pool]["eval_id"]), store.successes(ev["eval_id"]))
            out[pool] = {k: d[k] for k in ("n", "fixed", "broken", "p_value")}
    return out


# ---------------------------------------------------------------- the experiment
LEARNER_SETTING_PREFIXES = ("learner_", "val_", "pairs_", "max_pairs", "min_pairs", "explore_", "dpo_", "lora_",
                            "train_", "gate_", "swap_", "keep_")
# The experiment's server is its own: on loopback, without tokens (its requests carry none). A user's
# exported HONE_ADMIN_TOKEN or HONE_HOST for a production server must not leak into it or its results.
NOT_INHERITED = ("HONE_HOME", "HONE_PORT", "HONE_HOST", "HONE_ADMIN_TOKEN", "HONE_API_TOKENS")


def server_settings(env: dict[str, str], home: Path) -> Settings:
    """The settings the experiment's server will run with; a bad one is an ExperimentError."""
    try:
        s = Settings.load({**env, "HONE_HOME": str(home)})
    except ConfigError as e:
        raise ExperimentError(f"bad setting: {e}") from None
    if s.auth_enabled:
        raise ExperimentError("the experiment's server takes no tokens (it listens on loopback only): "
                              "remove admin_token / api_tokens from --set or HONE_CONFIG")
    return s


def learner_settings(env: dict[str, str], home: Path, settings: Settings | None = None) -> dict[str, str]:
    """The learner settings the experiment's server will run with, defaults included: the defaults
    change between versions, so a result records what it measured, not only what it overrode."""
    s = settings or server_settings(env, home)
    return {f.name: str(getattr(s, f.name)) for f in fields(s) if f.name.startswith(LEARNER_SETTING_PREFIXES)}


def host_record(vllm_dtype: str, repo: Path = REPO) -> dict[str, Any]:
    """What the numbers depend on besides the settings. The base model's held-out rate differs by host
    type (29.0% in float32 on AVX2-only CPUs, 24.5-27.5% in bf16 on AVX512-BF16 ones), so a run
    compares with runs on its own kind of host, and its record says which kind that was."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"cpu": cpu_model(), "cores": usable_cores(), "native_bf16": cpu_has_native_bf16(), "gpu": gpu_present(),
            "serving_dtype": serving_dtype(vllm_dtype), "commit": git("rev-parse", "--short", "HEAD"),
            "modified": None if status is None else bool(status)}


def run_experiment(cfg: LoopConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    from .report import serving_rows, write_report

    train, gate, pools = load_pools(cfg)
    side = [(load_side_traffic(cfg, cfg.storage_traffic, cfg.storage_per_cycle), cfg.storage_per_cycle),
            (load_side_traffic(cfg, cfg.python_traffic, cfg.python_per_cycle), cfg.python_per_cycle)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    home = cfg.out.resolve() / f"home-{stamp}"
    gate_file = home / "gate-tasks.jsonl"
    guard_file = home / "guard-tasks.jsonl"
    env = {
        **LOOP_DEFAULTS, "HONE_LEARNER_THREADS": str(usable_cores()),
        "HONE_LEARNER_ENABLED": "true", "HONE_LEARNER_MIN_NEW_LABELS": "0", "HONE_LEARNER_INTERVAL_S": "0",
        "HONE_VAL_FRACTION": "0", "HONE_GATE_TASKS_FILE": str(gate_file), "HONE_GATE_TASKS": str(len(gate)),
        "HONE_GATE_GUARD_FILE": str(guard_file) if cfg.guards else "",
        **({"HONE_MODEL": cfg.model} if cfg.model else {}),
        **{k: v for k, v in os.environ.items() if k.startswith("HONE_") and k not in NOT_INHERITED},
        **cfg.server_env,
    }
    settings = server_settings(env, home)  # before anything starts: a bad --set fails here, not in the server
    learner = learner_settings(env, home, settings)
    home.mkdir(parents=True, exist_ok=True)
    gate_file.write_text("".join(json.dumps({"id": t.id, "question": t.messages[0]["content"], "answer": t.expected,
                                             "check": t.check}) + "\n" for t in gate))
    if cfg.guards:
        guard_file.write_text("".join(Path(p).read_text(encoding="utf-8").rstrip("\n") + "\n" for p in cfg.guards))
    result: dict[str, Any] = {"config": {**config_record(cfg), "server_env": env,
                                         "learner_settings": learner},
                              "host": host_record(settings.vllm_dtype),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "home": str(home), "rows": []}
    t_start = time.monotonic()
    with serve(home, env, cfg.start_timeout_s, say) as url:
        store = EvalStore(home / "hone.db")
        try:
            say(f"eval base on {', '.join(f'{k} ({len(v[1])})' for k, v in pools.items())}")
            t0 = time.monotonic()
            base = asyncio.run(evaluate(store, url, "base", pools, cfg.concurrency))
            result["rows"].append({"label": "base", "adapter": None, "status": "base", "evals": base,
                                   "eval_s": round(time.monotonic() - t0, 1)})
            say("base: " + ", ".join(f"{k} {v['rate']:.1%}" for k, v in base.items()))
            for k in range(cfg.cycles):
                if done_promoting(result["rows"], cfg.promotions):
                    say(f"{cfg.promotions} promotion(s) reached after {k} cycle(s); stopping")
                    break
                batch = traffic_batch(k, [(train, cfg.per_cycle), *side])
                t0 = time.monotonic()
                traffic = asyncio.run(stream_traffic(url, batch, cfg.concurrency, namespace=f"traffic.c{k + 1}"))
                traffic_s = time.monotonic() - t0
                say(f"cycle {k + 1}: traffic {traffic['solved']}/{traffic['n']} solved ("
                    + ", ".join(f"{g} {v['solved']}/{v['n']}" for g, v in traffic["groups"].items())
                    + "); running the learner")
                cycle = asyncio.run(run_cycle(url, cfg.cycle_timeout_s, say))
                row = {"label": f"cycle {k + 1}", "cycle_id": cycle["id"], "adapter": cycle.get("candidate"),
                       "status": cycle["state"], "traffic": traffic, "traffic_s": round(traffic_s, 1),
                       "gate": cycle.get("gate"), "timings": cycle.get("timings"), "counts": cycle.get("counts"),
                       "error": cycle.get("error")}
                # A candidate rejected before its gate (vLLM could not load it) has nothing to evaluate.
                if cycle.get("candidate") and cycle.get("gate") and cycle["state"] in ("promoted", "rejected"):
                    t0 = time.monotonic()
                    row["evals"] = asyncio.run(evaluate(store, url, cycle["candidate"], pools, cfg.concurrency))
                    row["eval_s"] = round(time.monotonic() - t0, 1)
                    parent = serving_rows(result)[-1]  # what served before this candidate
                    row["vs_parent"] = against_parent(store, row["evals"], parent["evals"])
                    say(f"cycle {k + 1} {cycle['state']} {cycle['candidate']}: "
                        + ", ".join(f"{n} {v['rate']:.1%}" for n, v in row["evals"].items()))
                else:
                    say(f"cycle {k + 1} {cycle['state']}: {cycle.get('error') or ''}")
                result["rows"].append(row)
                _save(cfg.out, result)
        finally:
            store.close()
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(cfg.out, result)
    write_report(result, cfg.out)
    return result


def done_promoting(rows: Sequence[dict[str, Any]], promotions: int | None) -> bool:
    return promotions is not None and sum(r["status"] == "promoted" for r in rows) >= promotions


def _save(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".loop.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out / "loop.json")
