"""DPO training benchmark: hone's trainer against TRL's DPOTrainer, same pairs, same machine, one run.

    .venv/bin/pip install -e ".[bench]"          # TRL, pinned in constraints/cpu.txt
    .venv/bin/python bench/dpo.py [--pairs 4] [--length 512] [--epochs 2] [--threads 2] [--precisions bf16,fp32]

Every configuration trains in its own subprocess (so each peak RSS is its own) on the same N
preference pairs: a chat-formatted prompt plus a chosen and a rejected completion, each sequence
exactly --length tokens of the embedded SmolLM2-135M. Same LoRA (r 16, alpha 32, all linear
projections), beta 0.1, lr 5e-5, 4 pairs per optimizer step. hone runs each of these pairs in a forward
of its own (its default for pairs that share no real prompt: learner/train.py forward_groups); TRL runs them as 4 forwards of one pair with gradient accumulation (`trl`)
and, in bf16, as one batch of 4 (`trl-b4`). TRL runs with its defaults otherwise (reference log-probs recomputed every step, full-vocabulary
logits). Throughput = pairs x epochs / wall time of reference + training (model load excluded).
Results: stdout (markdown) and bench/results/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BETA, LR, ACCUMULATE = 0.1, 5e-5, 4


def make_pairs(model_dir: Path, n: int, length: int) -> list[dict]:
    """Text pairs whose prompt + completion tokenize to exactly `length` tokens (as token ids too)."""
    from runtime.rendering import load_tokenizer

    tok = load_tokenizer(model_dir)
    questions = [json.loads(line)["question"] for line in (REPO / "bench/data/mawps-sample.jsonl").open()]
    filler = " ".join(questions)
    prompt_len = length - length // 4
    out = []
    for i in range(n):
        head = f"<|im_start|>user\nTask {i}: "
        body = tok.decode(tok(filler[i * 50:] + filler)["input_ids"][: prompt_len - 8])
        prompt = head + body + "<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"][:prompt_len]
        prompt = tok.decode(p_ids)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        pair = {"prompt": prompt, "prompt_ids": p_ids}
        for side, seed in (("chosen", "The answer is computed step by step. "), ("rejected", "I think the total is ")):
            c_ids = tok((seed + filler[i * 97:])[:4000], add_special_tokens=False)["input_ids"][: length - len(p_ids) - 1]
            text = tok.decode(c_ids)
            c_ids = tok(text, add_special_tokens=False)["input_ids"][: length - len(p_ids) - 1]
            pair[side] = tok.decode(c_ids) + tok.eos_token  # TRL appends EOS; so do we, as a token
            pair[side + "_ids"] = c_ids + [tok.eos_token_id]
        out.append(pair)
    return out


def worker_hone(model_dir: Path, pairs: list[dict], epochs: int, threads: int, bf16: bool, checkpointing: bool = False) -> dict:
    from learner.train import TrainConfig, peak_rss_mb, train_adapter
    from learner.types import Pair, TokenSequence

    def seq(p: dict, side: str) -> TokenSequence:
        return TokenSequence(tuple(p["prompt_ids"] + p[side + "_ids"]),
                             tuple([0] * len(p["prompt_ids"]) + [1] * len(p[side + "_ids"])))

    data = [Pair(seq(p, "chosen"), seq(p, "rejected")) for p in pairs]
    cfg = TrainConfig(beta=BETA, lr=LR, epochs=epochs, batch_size=ACCUMULATE, max_length=10_000,
                      lora_rank=LORA["r"], lora_alpha=LORA["lora_alpha"], target_modules=tuple(LORA["target_modules"]),
                      threads=threads, bf16_autocast=bf16, gradient_checkpointing=checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        r = train_adapter(model_dir, data, cfg, Path(tmp) / "a", progress=False)
    seconds = r.timings["reference_s"] + r.timings["train_s"]
    return {"seconds": seconds, "pairs_per_s": len(pairs) * epochs / seconds, "peak_rss_mb": peak_rss_mb(),
            "final_loss": r.metrics["loss_last_epoch"], "tokens_per_pair": len(data[0].chosen.ids) + len(data[0].rejected.ids)}


def worker_trl(model_dir: Path, pairs: list[dict], epochs: int, threads: int, bf16: bool, batch: int = 1) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from learner.train import peak_rss_mb
    from runtime.rendering import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, gradient_accumulation_steps=ACCUMULATE // batch,
                         num_train_epochs=epochs, learning_rate=LR, beta=BETA, max_length=10_000,
                         bf16=bf16, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                         lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    lengths = [len(r) for r in trainer.train_dataset["prompt_ids"]]
    return {"seconds": seconds, "pairs_per_s": len(pairs) * epochs / seconds, "peak_rss_mb": peak_rss_mb(),
            "final_loss": out.training_loss, "prompt_tokens_seen_by_trl": lengths}


def run_worker(args: argparse.Namespace, impl: str, bf16: bool, pairs_file: Path, checkpointing: bool = False,
               batch: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--bf16", str(int(bf16)), "--pairs-file", str(pairs_file),
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--checkpointing", str(int(checkpointing)),
           "--batch", str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=512, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="bf16,fp32",
                    help="autocast modes to compare, comma-separated; on a CPU without native bf16 (no AVX512-BF16/AMX) "
                         "bf16 is emulated and hone trains in fp32 (dpo_autocast auto), so pass fp32 there")
    ap.add_argument("--out", default=str(REPO / "bench/results/dpo.json"))
    ap.add_argument("--worker", choices=["hone", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--bf16", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"bf16", "fp32"}:
        ap.error(f"--precisions: expected bf16 and/or fp32, got {args.precisions!r}")

    from tests.integration_support import prepared_model

    model_dir = prepared_model()
    if args.worker:
        pairs = json.loads(Path(args.pairs_file).read_text())
        if args.worker == "hone":
            out = worker_hone(model_dir, pairs, args.epochs, args.threads, bool(args.bf16), bool(args.checkpointing))
        else:
            out = worker_trl(model_dir, pairs, args.epochs, args.threads, bool(args.bf16), args.batch)
        print(json.dumps(out))
        return

    pairs = make_pairs(model_dir, args.pairs, args.length)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(pairs))
        for bf16 in [p == "bf16" for p in precisions]:
            for impl in ("hone", "trl"):
                print(f"running {impl} bf16={bf16} ...", file=sys.stderr)
                rows.append({"impl": impl, "bf16": bf16, **run_worker(args, impl, bf16, pairs_file)})
            if bf16:  # TRL batching the step's pairs too, as hone does
                print("running trl-b4 bf16=True ...", file=sys.stderr)
                rows.append({"impl": "trl-b4", "bf16": True, **run_worker(args, "trl", True, pairs_file, batch=ACCUMULATE)})
        if "fp32" in precisions:  # without native bf16 a CPU trains in fp32: checkpointing is the memory option there
            print("running hone bf16=False gradient checkpointing ...", file=sys.stderr)
            rows.append({"impl": "hone+ckpt", "bf16": False, **run_worker(args, "hone", False, pairs_file, True)})
    ratios = {}
    for bf16, other in ((True, "trl"), (True, "trl-b4"), (False, "trl")):
        found = [next((r for r in rows if r["impl"] == i and r["bf16"] == bf16), None) for i in ("hone", other)]
        if None in found:
            continue
        ours, trl = found
        if "error" not in ours and "error" not in trl:
            ratios[("bf16" if bf16 else "fp32") + ("" if other == "trl" else "_vs_" + other)] = {"speedup": round(ours["pairs_per_s"] / trl["pairs_per_s"], 2),
                                                  "rss_ratio": round(ours["peak_rss_mb"] / trl["peak_rss_mb"], 2)}
    from runtime.hardware import cpu_has_native_bf16, usable_cores

    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{usable_cores()} usable cores, native bf16: {cpu_has_native_bf16()}", "pairs": args.pairs, "length": args.length,
              "epochs": args.epochs, "threads": args.threads, "rows": rows, "ratios": ratios}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| trainer | autocast | pairs/s | s (ref + train) | peak RSS MB | final loss |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {'bf16' if r['bf16'] else 'fp32'} | error: {r['error']} | | | |")
        else:
            print(f"| {r['impl']} | {'bf16' if r['bf16'] else 'fp32'} | {r['pairs_per_s']:.3f} | {r['seconds']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} |")
    print("\nratios (hone / TRL):", json.dumps(ratios))


if __name__ == "__main__":
    main()
