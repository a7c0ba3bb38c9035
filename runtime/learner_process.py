"""`hone serve` runs the learner as a child process, so training never shares the server's memory or
event loop, and a learner crash leaves serving untouched: it is logged and the learner restarted
after a backoff. Its output goes to $HONE_HOME/logs/learner.log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from .config import Settings
from .engine import _die_with_parent

log = logging.getLogger("hone.learner")


class LearnerProcess:
    def __init__(self, settings: Settings, engine_url: str) -> None:
        self.settings = settings
        self.engine_url = engine_url
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.log_path = settings.logs_dir / "learner.log"

    def _spawn(self) -> None:
        env = dict(os.environ, HONE_HOME=str(self.settings.home))
        if self.settings.model is not None:  # `hone serve --model` is a flag, not in the environment
            env["HONE_MODEL"] = str(self.settings.model)
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} learner starting\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", "learner", "--vllm-url", self.engine_url],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )

    async def start(self) -> None:
        self._spawn()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="learner-supervise")

    async def _supervise(self) -> None:
        backoff = 5.0
        while not self._stopping:
            assert self.proc is not None
            started = time.time()
            code = await asyncio.to_thread(self.proc.wait)
            if self._stopping:
                return
            self.last_exit = code
            backoff = 5.0 if time.time() - started > 300 else min(backoff * 2, 600.0)
            log.error("learner exited with code %s; serving is unaffected; restarting in %.0fs (see %s)",
                      code, backoff, self.log_path)
            await asyncio.sleep(backoff)
            if not self._stopping:
                self._spawn()
                self.restarts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    async def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 15)
            except TimeoutError:  # mid-training: the cycle is marked failed at the next start
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
