"""How much of a DPO step the shared prefix saves, on the pairs a cycle would train on.

Every trajectory starts with the same system prompt and worked examples (~1.2k tokens), then its
question, then the model's ~100 tokens. Ways to run a batch of pairs, forward + backward, with the
trainer's model (fp32 weights, LoRA on all linear projections, bf16 autocast where the CPU has it):

    whole   every row whole, one pair per forward                      (the first trainer)
    pair    each pair's shared prefix once, one pair per forward        (learner.dpo.pair_logps)
    padded  the batch's common prefix once, then its rows right-padded  (the trainer until 2026-12-06)
    batch   the batch's common prefix once, then the trie of its rows   (learner.dpo.rows_logps, now)

The methods alternate batch by batch so all see the same machine state. It also reports how far their
log-probs differ (bf16 rounding only: in fp32 they agree to 1e-5, tests/test_dpo.py).

    HONE_HOME=<loop out>/home-... HONE_PAIRS_PER_TASK=1 HONE_LEARNER_THREADS=2 \
        .venv/bin/python bench/prefix.py [--pairs 8] [--batch 4] [--methods padded,batch]

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
from learner.dpo import (  # noqa: E402
    _causal_lm, _masked_logps, padded_rows, pair_logps, rows_logps, sequence_logps, shared_forward_tokens,
    shared_prefix, shared_prefix_length,
)
from learner.pairs import build_pairs, collect  # noqa: E402
from learner.registry import Registry  # noqa: E402
from learner.train import _load_policy, _use_bf16, pair_rows, resolve_device  # noqa: E402
from runtime.config import Settings  # noqa: E402
from runtime.model import ensure_model  # noqa: E402
from runtime.store import TrajectoryStore  # noqa: E402


def padded_rows_logps(model, rows):
    """The trainer's forward until 2026-12-06: the common prefix once, its keys and values repeated
    for every row, then every row's suffix right-padded to the longest."""
    n = len(rows)
    prefix = shared_prefix([r for r, _ in rows])
    lm = _causal_lm(model)
    ids, mask, attention = padded_rows(*rows)
    shared = lm.model(input_ids=ids[:1, :prefix], use_cache=True)
    cache = shared.past_key_values
    cache.batch_repeat_interleave(n)
    tails = lm.model(input_ids=ids[:, prefix:], attention_mask=attention, past_key_values=cache,
                     use_cache=True).last_hidden_state
    hidden = torch.cat([shared.last_hidden_state.expand(n, -1, -1), tails], dim=1)
    return _masked_logps(lm, hidden, ids, mask)


def padded_positions(rows) -> int:
    prefix = shared_prefix(rows)
    return prefix + len(rows) * (max(len(r) for r in rows) - prefix)


def step(model, pairs, method: str, bf16: bool) -> tuple[float, torch.Tensor]:
    """Forward + backward of one batch of pairs; log-probs in row order (chosen, rejected, ...)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = []
    groups = [list(range(len(pairs)))] if method in ("padded", "batch") else [[i] for i in range(len(pairs))]
    for group in groups:
        rows = pair_rows(pairs, group)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if method == "whole":
                logps, _ = sequence_logps(model, *padded_rows(*rows))
            elif method == "pair":
                logps, _ = pair_logps(model, *rows[0], *rows[1])
            elif method == "padded":
                logps, _ = padded_rows_logps(model, rows)
            else:
                logps, _ = rows_logps(model, rows)
        logps = logps.float()
        (logps[0::2] - logps[1::2]).sum().backward()
        out.append(logps.detach())
    return time.perf_counter() - t0, torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (dpo_batch_size)")
    ap.add_argument("--methods", default="padded,batch", help="of whole, pair, padded, batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per batch and method")
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefix.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - {"whole", "pair", "padded", "batch"})
    if unknown:
        print(f"prefix: unknown --methods {unknown}; choose from whole, pair, padded, batch", file=sys.stderr)
        return 2

    s = Settings.load()
    if not s.db_path.exists():
        print(f"prefix: no log at {s.db_path}; set HONE_HOME to a home with labelled runs", file=sys.stderr)
        return 2
    with Registry(s.db_path).locked() as db:
        groups = collect(db, val_fraction=s.val_fraction)
    with TrajectoryStore(s.db_path) as store:
        pairs = build_pairs(store, groups, per_task=s.pairs_per_task, max_pairs=s.max_pairs,
                            model_dir=s.model_path, on_drift=s.pairs_on_drift).pairs[: args.pairs]
    if not pairs:
        print("prefix: the log gives no preference pairs", file=sys.stderr)
        return 2
    cfg = train_config(s)
    torch.set_num_threads(cfg.threads)
    device = resolve_device("cpu")
    bf16 = _use_bf16(cfg, device)
    model = _load_policy(ensure_model(s), cfg, None, device)
    model.train()
    batches = [pairs[i:i + args.batch] for i in range(0, len(pairs), args.batch)]

    step(model, batches[0][:1], "pair", bf16)  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {m: [] for m in methods}
    logps: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for batch in batches:
        for _ in range(args.repeats):
            for m in methods:
                t, lp = step(model, batch, m, bf16)
                times[m].append(t / len(batch))
                logps[m].append(lp)
    per_pair = {m: round(statistics.mean(v), 3) for m, v in times.items()}
    diffs = {f"{m}_vs_{methods[0]}": round(max(float((a - b).abs().max()) for a, b in zip(logps[m], logps[methods[0]])), 4)
             for m in methods[1:]}

    lengths = [(len(p.chosen.ids), len(p.rejected.ids), shared_prefix_length(p.chosen.ids, p.rejected.ids)) for p in pairs]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {cfg.threads}",
        "home": str(s.home), "pairs": len(pairs), "batch": args.batch, "repeats": args.repeats, "bf16_autocast": bf16,
        "tokens_per_pair_mean": statistics.mean(a + b for a, b, _ in lengths),
        "pair_shared_prefix_mean": statistics.mean(p for _, _, p in lengths),
        "s_per_pair": per_pair,
        "speedup_vs_" + methods[0]: {m: round(per_pair[methods[0]] / per_pair[m], 3) for m in methods},
        "max_abs_logp_diff": diffs,
        "positions_per_batch_mean": {  # token positions one batch's forward runs
            "padded": statistics.mean(padded_positions([ids for ids, _ in pair_rows(b, range(len(b)))]) for b in batches),
            "batch": statistics.mean(shared_forward_tokens([ids for ids, _ in pair_rows(b, range(len(b)))]) for b in batches),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| method | s per pair (forward + backward) | speedup |\n|---|---|---|")
    for m in methods:
        print(f"| {m} | {per_pair[m]} | {per_pair[methods[0]] / per_pair[m]:.2f}x |")
    print(f"\n{len(pairs)} pairs in batches of {args.batch}, mean {result['tokens_per_pair_mean']:.0f} tokens per pair, "
          f"{result['pair_shared_prefix_mean']:.0f} shared within a pair; max |log-prob difference| {diffs} (bf16={bf16})")
    print(f"positions per batch: {result['positions_per_batch_mean']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
