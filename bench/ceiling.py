"""What could self-training reach on this model? pass@k of the served agent on the loop's pools.

    .venv/bin/python bench/ceiling.py [--samples 16] [--temperature 0.7] [--pools heldout,gate]
        [--home RUN_HOME --adapter hone-v3] [--concurrency 16] [--out DIR]

Why. The learner only learns from its own attempts: a DPO pair needs a success the agent itself
produced (trial-and-error, as in ETO), so a task the agent never solves in any sample yields no
pair, and RL from verifiable rewards has been measured to concentrate probability on answers the
base model already samples rather than to add new ones (Yue et al. 2025, "Does Reinforcement
Learning Really Incentivize Reasoning Capacity in LLMs Beyond the Base Model?"). So the share of
held-out tasks solved greedily OR in at least one of k samples is a practical ceiling for what a
few cycles of self-training can reach, and pass@k says how fast more sampling finds successes.

Method. `hone serve` (real vLLM, the embedded SmolLM2 unless HONE_MODEL is set, learner off) on a
fresh HONE_HOME; the pools are exactly `hone bench loop`'s (learner/loop_setup.py load_pools):
held-out = bench/data/asdiv-a-heldout-200.jsonl; gate = the last gate_tasks tasks of the training pool
(bench/data/asdiv-a-train.jsonl; MAWPS and the 40-task held-out before 2026-12-04:
bench/results/ceiling.json is from then). `--home` serves a finished run's HONE_HOME instead (copy it
first: the samples are logged there) so `--adapter` can measure what training did to the same numbers.
Each pool runs once greedily and `samples` times at `temperature` (the explorer's), all through
`hone eval`'s code over the HTTP API. pass@k is the unbiased estimator of Chen et al. 2021 from
n samples with c successes: 1 - C(n-c, k) / C(n, k). "majority of n" is self-consistency: the most
common final number of the n samples, checked like any reply; it is what sampling alone reaches with
no training, and what self-improvement without labels has been seen to approach (Huang et al. 2022,
"Large Language Models Can Self-Improve"). Results: stdout (markdown) and bench/results/ceiling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from math import comb
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from learner.checks import check_answer, last_number  # noqa: E402
from learner.experiment import LoopConfig, load_pools, serve  # noqa: E402
from runtime.evals import EvalOptions, EvalStore, run_eval  # noqa: E402


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


async def attempts(store: EvalStore, url: str, tasks, name: str, temperature: float, adapter: str,
                   concurrency: int) -> dict[str, tuple[bool, str]]:
    """One eval of the pool: per task, whether it was solved and the final reply."""
    row = await run_eval(store, tasks, server=url, headers={}, tasks_file=name,
                         options=EvalOptions(adapter=adapter, concurrency=concurrency, temperature=temperature))
    got = store.db.execute("select task_id, success, answer from eval_results where eval_id = ?", [row["id"]]).fetchall()
    return {t: (bool(s), a or "") for t, s, a in got}


def majority_correct(replies: list[str], task) -> bool:
    """Self-consistency (Wang et al. 2022): the most common final number among the samples, checked
    with the learner's own checker; ties go to the number seen first; replies with no number abstain."""
    numbers = [n for n in (last_number(r) for r in replies) if n is not None]
    if not numbers:
        return False
    winner = Counter(numbers).most_common(1)[0][0]
    return check_answer(repr(winner), task.expected, task.check)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--pools", default="heldout,gate")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--home", type=Path, help="serve this HONE_HOME (a copy of a loop run's) instead of a fresh one")
    ap.add_argument("--adapter", default="base", help="an adapter version registered in --home, or base")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    if args.adapter != "base" and not args.home:
        sys.exit("ceiling: --adapter needs --home, the HONE_HOME where that adapter is registered")
    if args.home and not (args.home / "hone.db").is_file():
        sys.exit(f"ceiling: {args.home} has no hone.db; --home takes a HONE_HOME a server has run in")

    cfg = LoopConfig()
    train, gate, pools = load_pools(cfg)
    chosen = {"gate": gate, **{k: v[1] for k, v in pools.items()}}
    names = [p for p in args.pools.split(",") if p]
    unknown = [p for p in names if p not in chosen]
    if unknown:
        sys.exit(f"ceiling: unknown pool(s) {unknown}; choose from {sorted(chosen)}")
    home = args.home.resolve() if args.home else args.out.resolve() / f"ceiling-home-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {"HONE_LEARNER_ENABLED": "false", **({"HONE_MODEL": os.environ["HONE_MODEL"]} if "HONE_MODEL" in os.environ else {})}
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.samples]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "samples": args.samples, "temperature": args.temperature, "adapter": args.adapter,
              "home": str(args.home) if args.home else None, "pools": {}}
    t0 = time.monotonic()
    with serve(home, env, 900, print) as url:
        store = EvalStore(home / "hone.db")
        try:
            for name in names:
                tasks = chosen[name]
                run = lambda temperature: asyncio.run(  # noqa: E731
                    attempts(store, url, tasks, name, temperature, args.adapter, args.concurrency))
                greedy = {k: ok for k, (ok, _) in run(0.0).items()}
                counts = {t.id: 0 for t in tasks}
                replies: dict[str, list[str]] = {t.id: [] for t in tasks}
                for i in range(args.samples):
                    for key, (ok, reply) in run(args.temperature).items():
                        counts[key] += ok
                        replies[key].append(reply)
                    print(f"{name}: sample {i + 1}/{args.samples} done ({time.monotonic() - t0:.0f}s)", flush=True)
                n = len(tasks)
                by_id = {t.id: t for t in tasks}
                majority = {key: majority_correct(replies[key], by_id[key]) for key in counts}
                flip = sum(1 for key, c in counts.items() if c and not greedy.get(key))
                result["pools"][name] = {
                    "n": n, "greedy": sum(greedy.values()) / n,
                    "sampled_mean": sum(counts.values()) / (n * args.samples),
                    "pass_at_k": {k: sum(pass_at_k(args.samples, c, k) for c in counts.values()) / n for k in ks},
                    "majority_of_samples": sum(majority.values()) / n,
                    "greedy_or_any_sample": (sum(greedy.values()) + flip) / n,
                    "never_solved": sum(1 for key, c in counts.items() if not c and not greedy.get(key)) / n,
                    "per_task": {key: {"greedy": greedy.get(key, False), "sampled": c, "majority": majority[key]}
                                 for key, c in counts.items()},
                }
        finally:
            store.close()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ceiling.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['machine']}, {result['date']}; adapter {args.adapter}; {args.samples} samples at T={args.temperature}; "
          f"{result['wall_s']:.0f}s\n")
    print("| pool | n | greedy | mean sampled | " + " | ".join(f"pass@{k}" for k in ks)
          + f" | majority of {args.samples} | greedy or any sample | never solved |")
    print("|---|---|---|---|" + "---|" * len(ks) + "---|---|---|")
    for name, p in result["pools"].items():
        print(f"| {name} | {p['n']} | {p['greedy']:.1%} | {p['sampled_mean']:.1%} | "
              + " | ".join(f"{p['pass_at_k'][k]:.1%}" for k in ks)
              + f" | {p['majority_of_samples']:.1%} | {p['greedy_or_any_sample']:.1%} | {p['never_solved']:.1%} |")


if __name__ == "__main__":
    main()
