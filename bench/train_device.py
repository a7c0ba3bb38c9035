"""The learner's trainer (learner/train.py) on a CPU and on a GPU: same pairs, same code, one run.

    python bench/train_device.py --out DIR [--sizes 135m,360m,1.7b] [--pairs 16] [--cpu-pairs 8] [--epochs 2]

1. Equivalence: a SmolLM2-135M-shaped model trained in fp32 (no autocast) on cpu and on cuda from
   the same weights and pairs: per-step losses and the saved LoRA factors must agree.
2. Throughput: each size on cuda (bf16 autocast, the default there) and the 135M size on cpu:
   pairs/s, training and reference time, peak GPU memory. Each cuda size runs with each --methods:
   `batch` runs an optimizer step's pairs in one forward (the trainer's default, forward_tokens
   4096), `pair` one pair per forward (forward_tokens 1, the trainer before 2026-12-04).

The models have SmolLM2's shapes (135M, 360M, 1.7B configs) and random weights: the model hubs are
not reachable from the GPU machines this runs on, and the 135M weights (270 MB) exceed what travels
there. Speed and memory do not depend on weight values. The pairs have the shape of the loop's
real pairs: one ~1,150-token prompt (system prompt and worked examples) common to every pair, a
50-250-token question per pair, then per row ~100-170 tokens of which the model generated all but
a 40-token tool result in the middle.
Results: stdout (markdown) and DIR/train_device.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from learner.train import TrainConfig  # noqa: E402

SHAPES = {  # SmolLM2 configs (HuggingFaceTB/SmolLM2-{135M,360M,1.7B}-Instruct config.json)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, rope_theta=100000.0),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, rope_theta=100000.0),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, rope_theta=130000.0),
}
VOCAB, PROMPT = 49152, 1150


def make_model(size: str, out: Path, device: str) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, **SHAPES[size])
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.7B parameters on a CPU takes longer than training them on a GPU
        model = LlamaForCausalLM(config)
    path = out / f"smollm2-{size}-random"
    model.to(torch.bfloat16).save_pretrained(str(path))  # bf16 on disk, like the served model; trained in fp32
    return path


def make_pairs(n: int, seed: int = 0):
    from learner.types import Pair, TokenSequence

    rng = random.Random(seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(PROMPT)]
    pairs = []
    for i in range(n):
        prefix = prompt + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(50, 250))]

        def row(first: int, second: int) -> TokenSequence:
            ids = prefix + [rng.randrange(3, VOCAB) for _ in range(first + 40 + second)]
            mask = [0] * len(prefix) + [1] * first + [0] * 40 + [1] * second
            return TokenSequence(tuple(ids), tuple(mask))

        pairs.append(Pair(row(rng.randrange(40, 80), rng.randrange(20, 50)),
                          row(rng.randrange(40, 80), rng.randrange(20, 50)), group=f"t{i}"))
    return pairs


METHODS = {"batch": TrainConfig.forward_tokens, "pair": 1}  # forward_tokens: 1 leaves every pair a forward of its own


def train(model_dir: Path, pairs, device: str, epochs: int, autocast: bool | None, out: Path, threads: int = 0,
          method: str = "batch") -> dict:
    import torch

    from learner.train import train_adapter

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(epochs=epochs, device=device, bf16_autocast=autocast, threads=threads,
                      forward_tokens=METHODS[method])
    dest = out / f"adapter-{model_dir.name}-{device}-{'auto' if autocast is None else autocast}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    result = train_adapter(model_dir, pairs, cfg, dest, progress=False, probe_prompt=list(range(5, 40)))
    meta = json.loads((dest / "hone-adapter.json").read_text())
    return {"path": str(dest), "wall_s": round(time.perf_counter() - t0, 2), "timings": result.timings,
            "metrics": result.metrics, "losses": [round(h["loss"], 6) for h in meta["history"]],
            "probe_tokens": meta["probe"]["tokens"]}


def lora_factors(adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="135m,360m,1.7b")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cpu-pairs", type=int, default=8, help="pairs for the cpu throughput row (it is slow)")
    ap.add_argument("--equivalence-pairs", type=int, default=8)
    ap.add_argument("--methods", default="batch,pair", help="cuda forward layouts to time: batch, pair (see above)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        print(f"train_device: unknown --methods {','.join(unknown)}; choose from {','.join(METHODS)}", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        print("train_device: torch sees no GPU; this benchmark compares cpu and cuda", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hone-train-device-"))
    report: dict = {"machine": {"gpu": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count(),
                                "platform": platform.platform(), "torch": torch.__version__},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    import peft
    import transformers

    report["machine"].update(transformers=transformers.__version__, peft=peft.__version__)

    # 1. equivalence, fp32 on both devices
    small = make_model("135m", work, "cuda")
    eq_pairs = make_pairs(args.equivalence_pairs, seed=1)
    cpu = train(small, eq_pairs, "cpu", 2, False, work, threads=os.cpu_count() or 0)
    gpu = train(small, eq_pairs, "cuda", 2, False, work)
    a, b = lora_factors(cpu["path"]), lora_factors(gpu["path"])
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    loss_diff = max(abs(x - y) for x, y in zip(cpu["losses"], gpu["losses"], strict=True))
    report["equivalence"] = {"pairs": len(eq_pairs), "epochs": 2, "losses_cpu": cpu["losses"],
                             "losses_cuda": gpu["losses"], "max_loss_diff": loss_diff,
                             "max_abs_lora_diff": max_abs, "max_abs_lora_weight": scale,
                             "probe_tokens_equal": cpu["probe_tokens"] == gpu["probe_tokens"]}
    print(f"equivalence (135M shape, fp32, {len(eq_pairs)} pairs): max |loss cpu - cuda| {loss_diff:.2e}, "
          f"max |LoRA cpu - cuda| {max_abs:.2e} (largest factor {scale:.2e}), "
          f"probe tokens equal: {report['equivalence']['probe_tokens_equal']}", flush=True)

    # 2. throughput
    pairs = make_pairs(args.pairs, seed=2)
    rows = []
    runs = [("135m", "cpu", "batch")] + [(s, "cuda", m) for s in args.sizes.split(",") for m in methods]
    models = {"135m": small}
    for size, device, method in runs:
        model_dir = models.get(size) or models.setdefault(size, make_model(size, work, "cuda"))
        todo = pairs[: args.cpu_pairs] if device == "cpu" else pairs
        r = train(model_dir, todo, device, args.epochs, None, work,
                  threads=(os.cpu_count() or 0) if device == "cpu" else 0, method=method)
        row = {"size": size, "device": device, "method": method, "pairs": len(todo), "epochs": args.epochs,
               "bf16_autocast": r["metrics"]["bf16_autocast"], "pairs_per_s": r["metrics"]["pairs_per_s"],
               "reference_s": r["timings"]["reference_s"], "train_s": r["timings"]["train_s"],
               "load_s": r["timings"]["load_s"], "peak_gpu_mb": r["metrics"].get("peak_gpu_mb"),
               "peak_rss_mb": r["metrics"]["peak_rss_mb"], "loss_first": r["metrics"]["loss_first"],
               "loss_last_epoch": r["metrics"]["loss_last_epoch"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "train_device.json").write_text(json.dumps({**report, "throughput": rows}, indent=1))
    report["throughput"] = rows

    print("\n| model shape | device | forward | autocast | pairs/s | reference s | train s | peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| SmolLM2-{r['size']} | {r['device']} | {r['method']} | {'bf16' if r['bf16_autocast'] else 'fp32'} "
              f"| {r['pairs_per_s']} | {r['reference_s']} | {r['train_s']} | {r['peak_gpu_mb'] or '-'} |")
    for size in args.sizes.split(","):
        by = {r["method"]: r for r in rows if r["size"] == size and r["device"] == "cuda"}
        if "batch" in by and "pair" in by:
            print(f"SmolLM2-{size} cuda: batch / pair = {by['batch']['pairs_per_s'] / by['pair']['pairs_per_s']:.2f}x pairs/s")
    (args.out / "train_device.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
