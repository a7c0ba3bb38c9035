"""The learner process: watch the log, start a cycle when one is due, one cycle at a time.

Triggers (first that fires): a queued manual request (`POST /v1/learner/cycles`), N labelled
serving runs since the last cycle started (`learner_min_new_labels`), or time since the last cycle
(`learner_interval_s`). The lease row in SQLite makes one cycle run at a time across processes
(`hone train` and the background learner). A cycle whose process died is marked failed at the next
start. The learner is separate from `hone serve`: if it crashes, serving does not notice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from runtime.config import Settings

from .cycle import Cycle, Say
from .labels import label_all
from .registry import Registry
from .runner import AgentRunner, agent_runner

log = logging.getLogger("hone.learner")
HEARTBEAT_S = 5.0


class LeaseHeld(RuntimeError):
    def __init__(self, holder: dict[str, Any]) -> None:
        super().__init__(f"another learner ({holder['holder']}) is running cycle {holder['cycle_id']}")
        self.holder = holder


def due(registry: Registry, settings: Settings, idle_since: float) -> tuple[str, int | None] | None:
    """(trigger, queued cycle id) if a cycle should start now."""
    request = registry.pending_request()
    if request is not None:
        return "manual", request["id"]
    last = registry.last_started_cycle()
    since = last["started_at"] if last else idle_since
    if settings.learner_min_new_labels:
        if registry.count_labelled_since(last["started_at"] if last else 0.0) >= settings.learner_min_new_labels:
            return "count", None
    if settings.learner_interval_s and time.time() - since >= settings.learner_interval_s:
        return "interval", None
    return None


class _Heartbeat:
    """Keeps the lease fresh from its own thread, so a long training step cannot let it expire."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.registry.heartbeat()
            except Exception as e:
                log.warning("lease heartbeat failed: %s", e)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


async def run_cycle(settings: Settings, registry: Registry, runner: AgentRunner, *, trigger: str,
                    requested_by: str | None = None, cycle_id: int | None = None, say: Say = lambda m: None,
                    progress: bool = False) -> dict[str, Any]:
    """Take the lease, run one cycle, record how it ended (failed, with the error, if it raised)."""
    held = registry.acquire_lease(cycle_id)
    if held is not None:
        raise LeaseHeld(held)
    try:
        cycle_id = registry.start_cycle(trigger, requested_by, cycle_id=cycle_id)
        registry.set_lease_cycle(cycle_id)
        with _Heartbeat(registry):
            cycle = Cycle(settings, registry, runner, cycle_id, say=say, progress=progress)
            try:
                await cycle.run()
            except BaseException as e:  # incl. cancellation: the row must not stay 'running'
                if isinstance(e, asyncio.CancelledError):  # SIGTERM or Ctrl-C reached the learner
                    phase = (registry.get_cycle(cycle_id) or {}).get("phase")
                    log.warning("cycle %s stopped during phase %r: the learner is shutting down", cycle_id, phase)
                    cycle.finish("failed", error=f"stopped during phase {phase!r}: the learner was shut down")
                else:
                    log.exception("cycle %s failed", cycle_id)
                    cycle.finish("failed", error=f"{type(e).__name__}: {e}"[:2000])
                if not isinstance(e, Exception):
                    raise
    finally:
        registry.release_lease()
    return registry.get_cycle(cycle_id)  # type: ignore[return-value]


async def learner_loop(settings: Settings, engine_url: str, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    registry = Registry(settings.db_path)
    failed = registry.fail_orphaned_cycles()
    if failed:
        log.warning("marked %d cycles cut off by a learner crash as failed", failed)
    started = time.time()
    try:
        async with agent_runner(settings, engine_url) as runner:
            log.info("learner ready (engine %s)", engine_url)
            while not stop.is_set():
                try:
                    await asyncio.to_thread(label_all, registry)
                    trigger = due(registry, settings, started)
                    if trigger is not None:
                        kind, queued = trigger
                        log.info("starting a cycle (trigger: %s)", kind)
                        cycle = await run_cycle(settings, registry, runner, trigger=kind, cycle_id=queued,
                                                say=log.info)
                        log.info("cycle %s ended: %s %s", cycle["id"], cycle["state"], cycle.get("error") or "")
                except LeaseHeld as e:
                    log.info("%s; waiting", e)
                except Exception:
                    log.exception("learner iteration failed; retrying after the poll interval")
                try:
                    await asyncio.wait_for(stop.wait(), settings.learner_poll_s)
                except TimeoutError:
                    pass
    finally:
        registry.close()
