"""TrajectoryLog: the asyncio face of TrajectoryStore for the HTTP server.

All writes go through one queue to one writer thread, so the event loop never blocks on SQLite
(an fsync per commit, or a busy wait while the learner holds the write lock) and writes never
contend with each other inside this process. Each write method returns only once its transaction
has COMMITTED: the server answers a request after ``await log.finish(...)``, so a run a client was
told about is on disk. Reads run in worker threads on the store's read connections.
"""

from __future__ import annotations

import asyncio
import builtins  # `list` is a method name here; annotations after it need the builtin
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import TrajectoryStore

log = logging.getLogger("hone.logwriter")


class LogClosed(RuntimeError):
    """The TrajectoryLog was closed; nothing more can be written through it."""


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


_STOP = object()  # queued by close(): everything queued before it is written, then the thread exits


class TrajectoryLog:
    """Async trajectory log. ``store`` may be a TrajectoryStore (left open by ``close``) or a path
    (the log opens a store and closes it with itself)."""

    def __init__(self, store: TrajectoryStore | str | Path) -> None:
        self._owns_store = not isinstance(store, TrajectoryStore)
        self.store = TrajectoryStore(store) if not isinstance(store, TrajectoryStore) else store
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        # Guards _closed against a write being queued after the stop marker, where it would hang forever.
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hone-trajectory-writer", daemon=True)
        # daemon: an interpreter exiting without close() must not hang on this thread. Nothing
        # acknowledged is lost that way (acknowledgement means committed); unacknowledged writes
        # are lost exactly as if the process had crashed, and recover_interrupted handles those.
        self._thread.start()

    # ------------------------------------------------------------------ writes (committed on return)

    async def start(self, **kwargs: Any) -> str:
        """``TrajectoryStore.start``: returns the new trajectory id."""
        return await self._submit(self.store.start, **kwargs)

    async def finish(self, traj_id: str, **kwargs: Any) -> None:
        """``TrajectoryStore.finish``: messages and summary, one transaction."""
        await self._submit(self.store.finish, traj_id, **kwargs)

    async def add_feedback(self, traj_id: str, **kwargs: Any) -> dict[str, Any]:
        """``TrajectoryStore.add_feedback``: returns the stored feedback row."""
        return await self._submit(self.store.add_feedback, traj_id, **kwargs)

    async def set_active_adapter(self, name: str | None, path: str | Path | None) -> None:
        await self._submit(self.store.set_active_adapter, name, path)

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        job = _Job(fn, args, kwargs)
        with self._lock:
            if self._closed:
                raise LogClosed("the trajectory log is closed; this write was not recorded")
            self._queue.put(job)
        return asyncio.wrap_future(job.future)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            assert isinstance(job, _Job)
            # A cancelled awaiter (client disconnected) cancels the future, but the write still
            # happens: the run took place and the learner wants it. Only the reply is dropped.
            wanted = job.future.set_running_or_notify_cancel()
            try:
                result = job.fn(*job.args, **job.kwargs)
            except BaseException as e:  # never let one bad write stop the thread
                if wanted:
                    job.future.set_exception(e)
                else:
                    log.error("trajectory write %s failed after its caller went away: %r", job.fn.__name__, e)
            else:
                if wanted:
                    job.future.set_result(result)

    # ------------------------------------------------------------------ reads

    async def get(self, traj_id: str) -> dict[str, Any] | None:
        self._check_readable()
        return await asyncio.to_thread(self.store.get, traj_id)

    async def list(self, **filters: Any) -> tuple[builtins.list[dict[str, Any]], str | None]:
        """``TrajectoryStore.list``: one page and the next cursor."""
        self._check_readable()
        return await asyncio.to_thread(lambda: self.store.list(**filters))

    async def count(self, **filters: Any) -> int:
        self._check_readable()
        return await asyncio.to_thread(lambda: self.store.count(**filters))

    async def get_active_adapter(self) -> tuple[str | None, str | None]:
        # A thread hop costs more than the query itself (~10 µs); hot paths may call
        # self.store.get_active_adapter() directly, since reads never wait for the writer in WAL mode.
        self._check_readable()
        return await asyncio.to_thread(self.store.get_active_adapter)

    def _check_readable(self) -> None:
        if self._closed and self._owns_store:
            raise LogClosed("the trajectory log is closed (and with it, its store)")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Write everything already queued, then stop the writer thread. Idempotent; blocks until
        the queue is drained (use ``aclose`` from async code that must keep serving meanwhile)."""
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if first and self._owns_store:
            self.store.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> TrajectoryLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
