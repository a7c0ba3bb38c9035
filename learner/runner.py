"""The agent, in the learner's process: the same graph, tools and log as `hone serve`, talking to the
same vLLM. Exploration and gate runs go through it, so they are real agent runs, logged like any
other (marked by `source`), each in a storage namespace of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.agent import make_llm
from runtime.config import Settings
from runtime.engine import Engine, ExternalEngine
from runtime.logwriter import TrajectoryLog
from runtime.messages import from_openai
from runtime.service import AgentService, RunFailed, RunRequest
from runtime.store import TrajectoryStore
from runtime.toolbox import ToolBox
from tools.errors import ToolError

from .checks import check_answer
from .labels import FAILURE_STATUSES
from .tasks import Task

ENGINE_FILE = "engine.json"  # under HONE_HOME/run: written by `hone serve`, read by the learner and CLI


class EngineNotFound(RuntimeError):
    pass


def write_engine_file(settings: Settings, url: str) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.run_dir / f".{ENGINE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(settings.run_dir / ENGINE_FILE)


def find_engine_url(settings: Settings, explicit: str | None = None) -> str:
    """The vLLM to use: given explicitly, configured (vllm_url), or the one a running `hone serve` wrote."""
    if explicit:
        return explicit
    if settings.vllm_url:
        return settings.vllm_url
    path = settings.run_dir / ENGINE_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        raise EngineNotFound(f"no running `hone serve` found for HONE_HOME={settings.home} (no live {path}); "
                             "start the server or pass --vllm-url") from None


@dataclass
class Attempt:
    task: Task
    trajectory_id: str | None
    status: str
    answer: str
    success: bool
    steps: int


class AgentRunner:
    def __init__(self, settings: Settings, service: AgentService, engine: Engine) -> None:
        self.settings = settings
        self.service = service
        self.engine = engine

    async def attempt(self, task: Task, *, source: str, namespace: str, adapter: str | None,
                      temperature: float, extra_metadata: dict[str, Any] | None = None,
                      first_step_tools: list[dict[str, Any]] | None = None) -> Attempt:
        """One run of `task` (each turn of a multi-turn task, in `namespace`); engine outages raise
        (a cycle must not mistake them for model failures)."""
        steps = 0
        history: list[dict[str, Any]] = []
        if task.storage:  # the logged run's starting state: a recall turn needs what was stored before
            try:
                await asyncio.to_thread(self.service.toolbox.kv.restore, namespace, task.storage)
            except ToolError as e:  # storage limits lowered since it was recorded: this task only fails
                return Attempt(task, None, "storage_error", str(e), False, 0)
        turns = [(list(task.messages), True)] if not task.turns else [
            ([{"role": "user", "content": t.content}], i == len(task.turns) - 1) for i, t in enumerate(task.turns)]
        for i, (messages, last) in enumerate(turns):
            if task.turns and task.turns[i].new_thread:
                history = []
            metadata = task.run_metadata(**(extra_metadata or {}))
            if not last:  # earlier turns are not checked, and must not group with the checked one
                metadata = {k: v for k, v in metadata.items() if k not in ("expected_answer", "check")}
                metadata.update(task_id=f"{task.key}#turn{i}", turn=i)
            req = RunRequest(
                messages=from_openai(history + messages), caller="learner",
                request_body={"messages": history + messages, "source": source},
                metadata=metadata, source=source, namespace=namespace, adapter=adapter, temperature=temperature,
                first_step_tools=first_step_tools if i == 0 else None,
            )
            try:
                result = await self.service.run(req)
            except RunFailed as e:
                if e.kind in ("engine_unavailable", "timeout", "internal"):
                    raise
                return Attempt(task, e.trajectory_id, "engine_error", "", False, steps)
            steps += result.n_steps
            history = history + messages + [{"role": "assistant", "content": result.answer}]
            if result.status in FAILURE_STATUSES:
                return Attempt(task, result.trajectory_id, result.status, result.answer, False, steps)
        ok = check_answer(result.answer, task.expected, task.check)
        return Attempt(task, result.trajectory_id, result.status, result.answer, ok, steps)

    async def attempt_all(self, jobs: Sequence[dict[str, Any]], *, on_done=None) -> list[Attempt]:
        sem = asyncio.Semaphore(self.settings.explore_concurrency)

        async def one(job: dict[str, Any]) -> Attempt:
            async with sem:
                a = await self.attempt(**job)
            if on_done is not None:
                on_done(a)
            return a

        return list(await asyncio.gather(*(one(j) for j in jobs)))


@contextlib.asynccontextmanager
async def agent_runner(settings: Settings, engine_url: str, *, ready_timeout: float = 600) -> AsyncIterator[AgentRunner]:
    store = TrajectoryStore(settings.db_path)
    log = TrajectoryLog(store)
    engine = ExternalEngine(engine_url)
    try:
        await engine.start()
        await engine.wait_ready(ready_timeout)
        service = AgentService(settings, engine, log, ToolBox.from_settings(settings), None,
                               make_llm(settings, engine.openai_base_url), store.get_active_adapter)
        yield AgentRunner(settings, service, engine)
    finally:
        await engine.stop()
        await log.aclose()
        store.close()


def adapter_path(settings: Settings, version: str) -> Path:
    return settings.adapters_dir / version
