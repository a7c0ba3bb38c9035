"""Run `train_adapter` in a child process, one per cycle.

Why: the C allocator keeps the memory a training step freed, and it fragments across steps with
sequences of different lengths, so a long-lived learner only grows. In `hone bench loop` run 3 the
learner reached 12.6 GB peak in its first cycle and was OOM-killed at 19 GB in its second, taking
the cycle with it. A child process gives every byte back when it exits, and if the kernel kills it
for memory, the cycle fails with that reason while the learner lives on for the next one.

The child never outlives the cycle that wanted it: a learner that is stopping sets `stop` and the
child is killed at once (not minutes later, when its training would have ended), and a child whose
parent died (SIGKILL, a crash) exits on its own instead of training for nobody.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .train import TrainConfig, TrainingError, TrainResult
from .types import Pair, TokenSequence

_POLL_S = 0.5
ORPHANED_EXIT_CODE = 70


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent_pid:  # reparented: whoever asked for this adapter is gone
            os._exit(ORPHANED_EXIT_CODE)


def _child_main(target: Callable[..., None], parent_pid: int, *args: Any) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="hone-train-orphan-watch",
                     daemon=True).start()
    target(*args)


def _remove_partial_saves(out_dir: str | Path, snapshots: dict[int, str | Path] | None) -> None:
    for dest in (out_dir, *(snapshots or {}).values()):
        for tmp in Path(dest).parent.glob(f".{Path(dest).name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _child(events, model_dir, pairs, cfg, out_dir, parent_adapter, progress, snapshots=None, retain=()) -> None:
    from .train import train_adapter

    try:
        result = train_adapter(model_dir, pairs, cfg, out_dir, parent_adapter=parent_adapter, progress=progress,
                               on_step=lambda step: events.put(("step", step)), snapshots=snapshots,
                               retain=retain)
        events.put(("done", result))
    except TrainingError as e:
        events.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it as the cycle's error
        events.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = (" (most likely the kernel's out-of-memory killer: HONE_DPO_GRADIENT_CHECKPOINTING=true or a "
                "lower HONE_DPO_MAX_LENGTH lowers the peak)") if -exitcode == signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {exitcode} before reporting a result"


def train_adapter_isolated(
    model_dir: str | Path,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    parent_adapter: str | Path | None = None,
    progress: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    snapshots: dict[int, str | Path] | None = None,
    stop: threading.Event | None = None,
    retain: Sequence[TokenSequence] = (),
    _target: Callable[..., None] = _child,
) -> TrainResult:
    """`train_adapter` in a spawned child: same arguments, same result or TrainingError.

    `stop` (set from another thread, e.g. when the cycle's task is cancelled) kills the child within
    half a second and raises TrainingError."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads and sockets
    events = ctx.Queue()
    proc = ctx.Process(target=_child_main, name="hone-train", daemon=True,
                       args=(_target, os.getpid(), events, str(model_dir), list(pairs), cfg, str(out_dir),
                             str(parent_adapter) if parent_adapter else None, progress,
                             {e: str(d) for e, d in (snapshots or {}).items()}, list(retain)))
    proc.start()
    stopped = False
    try:
        while True:
            if stop is not None and stop.is_set():
                stopped = True
                raise TrainingError("training stopped: the learner is shutting down")
            try:
                kind, payload = events.get(timeout=_POLL_S)
            except queue.Empty:
                if proc.is_alive():
                    continue
                try:  # it may have reported just before exiting
                    kind, payload = events.get(timeout=_POLL_S)
                except queue.Empty:
                    proc.join()
                    _remove_partial_saves(out_dir, snapshots)  # killed while saving
                    raise TrainingError(_died(proc.exitcode)) from None
            if kind == "step":
                if on_step is not None:
                    on_step(payload)
            elif kind == "done":
                return payload
            else:
                raise TrainingError(payload)
    finally:
        proc.join(timeout=0 if stopped else 30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if stopped:
            _remove_partial_saves(out_dir, snapshots)
        events.close()
