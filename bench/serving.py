"""Serving benchmark: the agent endpoint against raw vLLM on the same load, plus log cost, start time
and memory. Results go to stdout (markdown) and bench/results/serving.json.

    .venv/bin/python bench/serving.py [--tasks bench/data/mawps-sample.jsonl] [--n 64] [--concurrency 16]

Method. Phase 1 sends N word problems to `POST /v1/runs` (greedy, C at a time) and logs every
trajectory. Phase 2 replays exactly the same model calls straight to the same vLLM: for each
trajectory, its steps in order (each step's prompt = the logged messages before it, same tools,
greedy, same max_tokens), C trajectories at a time. Greedy decoding regenerates the same tokens, so
the difference between the two is what hone adds: LangGraph, the tools, logging, HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.logwriter import TrajectoryLog  # noqa: E402
from runtime.store import TrajectoryStore  # noqa: E402
from tests.integration_support import hone_server, prepared_model  # noqa: E402
from tools.specs import TOOL_SPECS  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def agent_phase(url: str, tasks: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    sem = asyncio.Semaphore(concurrency)
    out: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(task: dict) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/runs", json={"input": task["question"],
                                                              "metadata": {"task_id": task["id"]}})
                r.raise_for_status()
                out.append(r.json() | {"client_ms": (time.perf_counter() - t0) * 1000})

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in tasks))
        return time.perf_counter() - t0, out


def replay_plan(traj: dict) -> list[list[dict]]:
    """The prompt (OpenAI messages) of every generated step of a logged trajectory."""
    keep = ("role", "content", "tool_calls", "tool_call_id", "name")
    msgs = [{k: m[k] for k in keep if m.get(k) is not None} for m in traj["messages"]]
    return [msgs[:i] for i, m in enumerate(traj["messages"]) if m["role"] == "assistant" and m["generated"]]


async def raw_phase(vllm_url: str, model: str, plans: list[list[list[dict]]], concurrency: int,
                    max_tokens: int) -> tuple[float, list[float], list[tuple]]:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    outputs: list[tuple] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(plan: list[list[dict]]) -> None:
            async with sem:
                t0 = time.perf_counter()
                for prompt in plan:  # steps of one task are sequential, as in the agent loop
                    r = await client.post(vllm_url + "/v1/chat/completions", json={
                        "model": model, "messages": prompt, "tools": TOOL_SPECS, "tool_choice": "auto",
                        "temperature": 0.0, "max_tokens": max_tokens, "return_token_ids": True})
                    r.raise_for_status()
                    outputs.append(tuple(r.json()["choices"][0]["token_ids"] or ()))
                latencies.append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in plans))
        return time.perf_counter() - t0, latencies, outputs


async def log_cost(n: int = 300) -> dict:
    """Cost of logging one finished run, per model step, through the async writer (commit awaited)."""
    with tempfile.TemporaryDirectory() as d:
        log = TrajectoryLog(TrajectoryStore(Path(d) / "hone.db"))
        prompt_ids = list(range(900))
        messages = [{"role": "system", "content": "s" * 400, "generated": False}]
        messages += [{"role": "user", "content": "q" * 100, "generated": False}] * 24  # prefix + examples
        messages += [
            {"role": "assistant", "content": "", "generated": True, "prompt_token_ids": prompt_ids,
             "completion_token_ids": list(range(30)), "prompt_tokens": 900, "completion_tokens": 30,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "calculator", "arguments": "{\"expression\": \"1+2\"}"}}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "calculator", "is_error": False},
            {"role": "assistant", "content": "The answer is 3.", "generated": True,
             "prompt_token_ids": prompt_ids + list(range(40)), "completion_token_ids": list(range(8)),
             "prompt_tokens": 940, "completion_tokens": 8},
        ]
        steps = 2
        t0 = time.perf_counter()
        for _ in range(n):
            tid = await log.start(caller="bench", thread_id=None, request={"input": "q"}, metadata={},
                                  request_key="k", model="hone-base")
            await log.finish(tid, status="ok", messages=messages, final_answer="3", error=None, adapter=None,
                             latency_ms=1.0)
        per_run_ms = (time.perf_counter() - t0) * 1000 / n
        log.close()
    return {"per_run_ms": per_run_ms, "per_step_ms": per_run_ms / steps, "messages_per_run": len(messages)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=Path, default=REPO / "bench" / "data" / "mawps-sample.jsonl")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving.json")
    args = ap.parse_args()
    tasks = [json.loads(line) for line in args.tasks.read_text().splitlines() if line.strip()][: args.n]

    model_dir = prepared_model()
    with tempfile.TemporaryDirectory() as home:
        t_start = time.perf_counter()
        with hone_server(Path(home), model_dir) as server:
            start_s = time.perf_counter() - t_start
            health = httpx.get(server.url + "/healthz").json()
            vllm_url = health["engine_url"]
            # warm-up: first requests pay one-time costs in both paths
            asyncio.run(agent_phase(server.url, tasks[:4], 4))
            agent_s, results = asyncio.run(agent_phase(server.url, tasks, args.concurrency))
            store = TrajectoryStore(Path(home) / "hone.db")
            trajs = [store.get(r["trajectory_id"]) for r in results]
            plans = [replay_plan(t) for t in trajs]
            raw_s, raw_lat, raw_out = asyncio.run(raw_phase(vllm_url, "hone-base", plans, args.concurrency, 256))
            # vLLM's prefix cache now holds every prompt of phase 1, which favours the replay; a
            # second agent pass over the same tasks sees the same warm cache, so compare that too.
            agent2_s, results2 = asyncio.run(agent_phase(server.url, tasks, args.concurrency))
            agent_out = [tuple(m["completion_token_ids"] or ()) for t in trajs for m in t["messages"]
                         if m["role"] == "assistant" and m["generated"]]
            same_tokens = sorted(agent_out) == sorted(raw_out)
            proc = psutil.Process(server.proc.pid)
            hone_rss = proc.memory_info().rss
            vllm_rss = sum(c.memory_info().rss for c in proc.children(recursive=True))
    agent_lat = [r["client_ms"] for r in results]
    # Where an agent run's time goes: model calls (as hone measured them), tools, and the rest
    # (HTTP, LangGraph, logging, queueing in hone's event loop).
    model_ms = [sum(m.get("latency_ms") or 0 for m in t["messages"] if m["role"] == "assistant" and m["generated"])
                for t in trajs]
    tool_ms = [sum(m.get("latency_ms") or 0 for m in t["messages"] if m["role"] == "tool") for t in trajs]
    rest_ms = [r["client_ms"] - m - tl for r, m, tl in zip(results, model_ms, tool_ms)]
    tools_used = sorted({m["name"] for t in trajs for m in t["messages"] if m["role"] == "tool"
                         and not str(m.get("tool_call_id", "")).startswith("example_")})
    steps = sum(len(p) for p in plans)
    logc = asyncio.run(log_cost())
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU", "tasks": len(tasks), "steps": steps,
        "concurrency": args.concurrency,
        "agent": {"seconds": agent_s, "tasks_per_s": len(tasks) / agent_s, "p50_ms": pct(agent_lat, 0.5),
                  "p99_ms": pct(agent_lat, 0.99)},
        "raw_vllm": {"seconds": raw_s, "tasks_per_s": len(tasks) / raw_s, "p50_ms": pct(raw_lat, 0.5),
                     "p99_ms": pct(raw_lat, 0.99)},
        "agent_warm_cache": {"seconds": agent2_s, "tasks_per_s": len(tasks) / agent2_s,
                             "p50_ms": pct([r["client_ms"] for r in results2], 0.5),
                             "p99_ms": pct([r["client_ms"] for r in results2], 0.99)},
        "same_tokens_generated": same_tokens,
        "throughput_ratio": raw_s / agent_s,
        "p50_overhead_pct": 100 * (pct(agent_lat, 0.5) / pct(raw_lat, 0.5) - 1),
        "p99_overhead_pct": 100 * (pct(agent_lat, 0.99) / pct(raw_lat, 0.99) - 1),
        "agent_breakdown_ms": {
            "model_p50": pct(model_ms, 0.5), "model_p99": pct(model_ms, 0.99),
            "tools_p50": pct(tool_ms, 0.5), "tools_p99": pct(tool_ms, 0.99),
            "hone_rest_p50": pct(rest_ms, 0.5), "hone_rest_p99": pct(rest_ms, 0.99), "tools_used": tools_used},
        "log_cost": logc, "server_start_s": start_s,
        "rss_mb": {"hone": hone_rss / 2**20, "vllm": vllm_rss / 2**20},
        "statuses": {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    a, r = report["agent"], report["raw_vllm"]
    print(f"| path | tasks/s | p50 ms | p99 ms |\n|---|---|---|---|\n"
          f"| hone /v1/runs | {a['tasks_per_s']:.2f} | {a['p50_ms']:.0f} | {a['p99_ms']:.0f} |\n"
          f"| raw vLLM replay | {r['tasks_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    w = report["agent_warm_cache"]
    print(f"| hone /v1/runs, warm prefix cache | {w['tasks_per_s']:.2f} | {w['p50_ms']:.0f} | {w['p99_ms']:.0f} |\n")
    report["warm_throughput_ratio"] = raw_s / agent2_s
    report["warm_p50_overhead_pct"] = 100 * (w["p50_ms"] / r["p50_ms"] - 1)
    report["warm_p99_overhead_pct"] = 100 * (w["p99_ms"] / r["p99_ms"] - 1)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"warm cache vs replay: throughput ratio {report['warm_throughput_ratio']:.3f}; p50 overhead "
          f"{report['warm_p50_overhead_pct']:+.1f}%; p99 overhead {report['warm_p99_overhead_pct']:+.1f}%")
    print(f"throughput ratio {report['throughput_ratio']:.3f}; p50 overhead {report['p50_overhead_pct']:+.1f}%; "
          f"p99 overhead {report['p99_overhead_pct']:+.1f}%; same tokens: {same_tokens}")
    b = report["agent_breakdown_ms"]
    print(f"agent run time, p50/p99 ms: model calls {b['model_p50']:.0f}/{b['model_p99']:.0f}, tools "
          f"{b['tools_p50']:.0f}/{b['tools_p99']:.0f}, everything else {b['hone_rest_p50']:.0f}/{b['hone_rest_p99']:.0f} "
          f"(tools used: {', '.join(b['tools_used'])}); statuses {report['statuses']}")
    print(f"log cost {logc['per_step_ms']:.3f} ms/step ({logc['per_run_ms']:.3f} ms/run); "
          f"server start {start_s:.0f}s; RSS hone {report['rss_mb']['hone']:.0f} MB, vLLM {report['rss_mb']['vllm']:.0f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
