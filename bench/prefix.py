"""Shared-prefix DPO forward against two whole rows, on the pairs a cycle would train on.

A chosen and a rejected trajectory of one task share their start (system prompt, worked examples,
question). learner.dpo.pair_logps runs that prefix once; this script measures what it saves on real
logged pairs: forward + backward of one pair, the trainer's model (fp32 weights, LoRA on all linear
projections, bf16 autocast where the CPU has it), alternating the two methods pair by pair so both
see the same machine state. It also reports how far their log-probs differ (bf16 rounding only:
in fp32 they agree to 1e-5, tests/test_dpo.py).

    HONE_HOME=bench/results/loop/home-... HONE_PAIRS_PER_TASK=1 .venv/bin/python bench/prefix.py [--pairs 8] [--repeats 2]

Pairs are built from $HONE_HOME's log exactly as a cycle builds them (collect, build_pairs, the
settings in the environment). Results: stdout (markdown) and --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from learner.cycle import train_config  # noqa: E402
from learner.dpo import padded_rows, pair_logps, sequence_logps, shared_prefix_length  # noqa: E402
from learner.pairs import build_pairs, collect  # noqa: E402
from learner.registry import Registry  # noqa: E402
from learner.train import _load_policy, _use_bf16  # noqa: E402
from runtime.config import Settings  # noqa: E402
from runtime.model import ensure_model  # noqa: E402
from runtime.store import TrajectoryStore  # noqa: E402


def step(model, pair, method: str, bf16: bool) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if method == "shared":
            logps, _ = pair_logps(model, pair.chosen.ids, pair.chosen.mask, pair.rejected.ids, pair.rejected.mask)
        else:
            logps, _ = sequence_logps(model, *padded_rows((pair.chosen.ids, pair.chosen.mask),
                                                         (pair.rejected.ids, pair.rejected.mask)))
    (logps[0].float() - logps[1].float()).backward()
    return time.perf_counter() - t0, logps.detach().float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per pair and method")
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefix.json"))
    args = ap.parse_args()

    s = Settings.load()
    if not s.db_path.exists():
        print(f"prefix: no log at {s.db_path}; set HONE_HOME to a home with labelled runs", file=sys.stderr)
        return 2
    with Registry(s.db_path).locked() as db:
        groups = collect(db, val_fraction=s.val_fraction)
    with TrajectoryStore(s.db_path) as store:
        pairs = build_pairs(store, groups, per_task=s.pairs_per_task, max_pairs=s.max_pairs,
                            model_dir=s.model_path).pairs[: args.pairs]
    if not pairs:
        print("prefix: the log gives no preference pairs", file=sys.stderr)
        return 2
    cfg = train_config(s)
    torch.set_num_threads(cfg.threads)
    bf16 = _use_bf16(cfg)
    model = _load_policy(ensure_model(s), cfg, None)
    model.train()

    step(model, pairs[0], "whole", bf16)  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {"whole": [], "shared": []}
    diffs: list[float] = []
    for pair in pairs:
        for _ in range(args.repeats):
            t_whole, lp_whole = step(model, pair, "whole", bf16)
            t_shared, lp_shared = step(model, pair, "shared", bf16)
            times["whole"].append(t_whole)
            times["shared"].append(t_shared)
        diffs.append(float((lp_whole - lp_shared).abs().max()))

    lengths = [(len(p.chosen.ids), len(p.rejected.ids), shared_prefix_length(p.chosen.ids, p.rejected.ids)) for p in pairs]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {cfg.threads}",
        "home": str(s.home), "pairs": len(pairs), "repeats": args.repeats, "bf16_autocast": bf16,
        "tokens_per_pair_mean": statistics.mean(a + b for a, b, _ in lengths),
        "shared_prefix_mean": statistics.mean(p for _, _, p in lengths),
        "s_per_pair": {k: round(statistics.mean(v), 3) for k, v in times.items()},
        "speedup": round(statistics.mean(times["whole"]) / statistics.mean(times["shared"]), 3),
        "max_abs_logp_diff": round(max(diffs), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| method | s per pair (forward + backward) |\n|---|---|\n"
          f"| two whole rows | {result['s_per_pair']['whole']} |\n| shared prefix once | {result['s_per_pair']['shared']} |\n")
    print(f"speedup {result['speedup']}x; {len(pairs)} pairs, mean {result['tokens_per_pair_mean']:.0f} tokens per pair, "
          f"{result['shared_prefix_mean']:.0f} shared; max |log-prob difference| {result['max_abs_logp_diff']} (bf16={bf16})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
