"""What `hone bench loop` prints and writes: the table (base, each candidate, each promoted adapter),
the plot of success against cycle, and the verdicts: the target, and no promoted adapter worse than
its parent on any suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .gate import guard_counts


# The learner settings loop.md names: those runs were compared on (docs/benchmarks.md).
REPORTED_SETTINGS = ("pairs_per_task", "max_pairs", "explore_budget", "explore_operator_trials", "dpo_beta",
                     "dpo_lr", "dpo_epochs", "dpo_nll_weight", "dpo_reference", "dpo_retain_weight", "pairs_on_drift",
                     "gate_candidates",
                     "gate_margin", "gate_max_p", "gate_pool_guard")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def serving_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The base row, then each promoted one: what served after each cycle."""
    return [r for r in result["rows"] if r["status"] in ("base", "promoted") and r.get("evals")]


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Target: held-out success >= max(2 x base, base + 10 points) within 3 promoted cycles.
    Regression: a promoted adapter that solved fewer tasks than its parent (the previous serving row)
    on any pool, however few; with the task-by-task comparison where the run recorded it (fixed,
    broken, McNemar p), so a reader can tell a 1-task coin flip from a real loss."""
    served = serving_rows(result)
    base = served[0]["evals"]["heldout"]["rate"] if served else None
    if base is None:
        return {}
    target = max(2 * base, base + 0.10)
    within = served[1:4]
    best = max((r["evals"]["heldout"]["rate"] for r in within), default=None)
    drops = []
    for parent, child in zip(served, served[1:]):
        for pool, ev in child["evals"].items():
            before = parent["evals"][pool]["rate"]
            if ev["rate"] is not None and before is not None and ev["rate"] < before:
                drop = {"adapter": child["adapter"], "parent": parent["adapter"] or "base", "pool": pool,
                        "from": before, "to": ev["rate"]}
                drops.append({**drop, **(child.get("vs_parent") or {}).get(pool, {})})
    return {"base_heldout": base, "target": target, "best_promoted_heldout": best,
            "target_reached": best is not None and best >= target - 1e-9, "promoted": len(served) - 1,
            "drops_vs_parent": drops}


def _explore_cell(counts: dict[str, Any]) -> str:
    """Free samples, then operator trials where that round ran (explore_operator_trials), with how many
    of the trials solved their task: the trials are what gives the pairs their reverse directions."""
    cell = str(counts.get("explore_rollouts", "-"))
    if counts.get("trial_rollouts"):
        cell += f" + {counts['trial_rollouts']} trials ({counts.get('trial_successes', 0)} solved)"
    return cell


def _pairs_cell(counts: dict[str, Any]) -> str:
    """Pairs, and the runs retained beside them where dpo_retain_weight was on ("64 + 16 retained")."""
    cell = str(counts.get("pairs", "-"))
    retained = counts.get("retained")
    if retained:
        cell += f" + {retained['runs']} retained"
    return cell


def table(result: dict[str, Any]) -> str:
    pools = list(next((r["evals"] for r in result["rows"] if r.get("evals")), {}).keys())
    head = ["row", "adapter", "status", "traffic solved", "gate (cand vs current)", *pools, "pairs", "explore",
            "drift excl. / trimmed", "train s", "cycle s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        evals = r.get("evals") or {}
        cells = [r["label"], r.get("adapter") or "base", r["status"]]
        t = r.get("traffic")
        cell = f"{t['solved']}/{t['n']}" if t else "-"
        if t and len(t.get("groups") or {}) > 1:  # storage traffic beside the word problems
            cell += " (" + ", ".join(f"{g} {v['solved']}/{v['n']}" for g, v in t["groups"].items()) + ")"
        cells.append(cell)
        g = r.get("gate")
        cell = f"{_pct(g['candidate_rate'])} vs {_pct(g['current_rate'])} (n={g['n_tasks']})" if g else "-"
        if g and len(g.get("candidates") or []) > 1:  # gate_candidates: every epoch's adapter, best first above
            cell += "; epochs " + ", ".join(f"{c['epoch']}: {_pct(c['candidate_rate'])}" for c in g["candidates"])
        guard = (g or {}).get("guard")
        if guard:  # gate_guard_file: the candidate must solve at least as many as its parent, per kind
            groups = guard_counts(guard, unnamed="")
            cell += "; guard " + ", ".join(f"{name + ' ' if name else ''}{v['candidate_successes']}/{v['n']} vs "
                                           f"{v['current_successes']}/{v['n']}" for name, v in groups.items())
        both = (g or {}).get("pooled")
        if both:  # gate_pool_guard: the p-value test ran on gate and guard tasks together
            cell += f"; pooled fixed {both['fixed']}, broke {both['broken']}, p {both['p_value']:.2g}"
        cells.append(cell)
        for p in pools:
            ev = evals.get(p)
            cells.append(f"{_pct(ev['rate'])} ({ev['success']}/{ev['n']})" if ev else "-")
        counts, timings = r.get("counts") or {}, r.get("timings") or {}
        cells += [_pairs_cell(counts), _explore_cell(counts),
                  str(counts.get("drift_excluded", "-")) + (f" / {counts['drift_trimmed']}"
                                                            if "drift_trimmed" in counts else ""),
                  f"{timings['train']:.0f}" if "train" in timings else "-",
                  f"{sum(timings.values()):.0f}" if timings else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Success against cycle: what served after each cycle (line) and every candidate (markers).
    False (and no file) without matplotlib (`pip install -e ".[bench]"`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    pools = list(next((r["evals"] for r in rows if r.get("evals")), {}).keys())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, pool in enumerate(pools):
        colour = f"C{i}"
        xs, ys, current = [], [], None
        for k, r in enumerate(rows):
            if r.get("evals") and r["status"] in ("base", "promoted"):
                current = r["evals"][pool]["rate"]
            if current is not None:
                xs.append(k)
                ys.append(100 * current)
        ax.plot(xs, ys, "-o", color=colour, label=f"{pool} (serving)")
        cand = [(k, 100 * r["evals"][pool]["rate"]) for k, r in enumerate(rows)
                if r.get("evals") and r["status"] == "rejected"]
        if cand:
            ax.plot(*zip(*cand), "x", color=colour, markersize=8, label=f"{pool} (rejected candidate)")
    gates = [(k, r["gate"]) for k, r in enumerate(rows) if r.get("gate")]
    if gates:  # the gate pool: the traffic's own distribution, never streamed; what promotion decides on
        xs, ys = [0], [100 * gates[0][1]["current_rate"]]
        for k, g in gates:
            xs.append(k)
            ys.append(100 * (g["candidate_rate"] if g.get("promote") else g["current_rate"]))
        ax.plot(xs, ys, "-s", color="C7", markersize=4, label=f"gate pool, n={gates[0][1]['n_tasks']} (serving)")
    target = (result.get("verdicts") or {}).get("target")
    if target is not None:
        ax.axhline(100 * target, color="C0", linestyle="--", linewidth=1, label="held-out target (issue 4)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(["base" if r["status"] == "base" else f"cycle {k}" for k, r in enumerate(rows)])
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("hone bench loop: success against learner cycle")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def host_line(host: dict[str, Any]) -> str:
    """"host: AMD EPYC, 2 cores, native bf16, served in bfloat16; commit 5e6237a"; a GPU host names no CPU."""
    where = "a GPU" if host.get("gpu") else f"{host.get('cpu') or 'unknown CPU'}, {host.get('cores')} cores, " + (
        "native bf16" if host.get("native_bf16") else "no native bf16")
    commit = host.get("commit") or "unknown commit"
    return (f"host: {where}, served in {host.get('serving_dtype')}; commit {commit}"
            + (" (with uncommitted changes)" if host.get("modified") else ""))


def write_report(result: dict[str, Any], out: Path) -> str:
    v = verdicts(result)
    result["verdicts"] = v
    lines = [f"# hone bench loop, {result.get('started')}", ""]
    if host := result.get("host"):
        lines += [host_line(host), ""]
    lines += [table(result), ""]
    if v:
        lines.append(f"held-out: base {_pct(v['base_heldout'])}, target {_pct(v['target'])}, best promoted "
                     f"{_pct(v['best_promoted_heldout'])} after {v['promoted']} promotion(s): "
                     f"{'REACHED' if v['target_reached'] else 'not reached'}")
        for d in v["drops_vs_parent"]:
            paired = f"; fixed {d['fixed']}, broke {d['broken']}, McNemar p {d['p_value']:.2g}" if "p_value" in d else ""
            lines.append(f"regression: {d['adapter']} on {d['pool']} {_pct(d['from'])} -> {_pct(d['to'])} "
                         f"(parent {d['parent']}{paired})")
    learner = result.get("config", {}).get("learner_settings")
    if learner:
        lines.append("learner: " + ", ".join(f"{k} {learner[k]}" for k in REPORTED_SETTINGS if k in learner)
                     + " (all settings: loop.json config.learner_settings)")
    if plot(result, out / "loop.png"):
        lines.append(f"plot: {out / 'loop.png'}")
    else:
        lines.append("plot: skipped (matplotlib not installed: pip install -e '.[bench]')")
    text = "\n".join(lines) + "\n"
    (out / "loop.md").write_text(text)
    return text
