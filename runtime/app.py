"""The FastAPI application and its lifespan: wire config -> store/log -> engine -> agent service.

Start-up order matters: crashed runs are marked `interrupted` before any new run is logged, and the
HTTP server answers (503 on runs, `/healthz` says "starting") while vLLM is still loading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from learner.registry import Registry  # the learner's tables; no torch is imported by serving
from learner.runner import write_engine_file

from . import __version__
from .agent import make_llm
from .api import router
from .api_learner import router as learner_router
from .config import Settings
from .engine import Engine, ExternalEngine, ManagedEngine
from .errors import error_response, install_error_handlers
from .learner_process import LearnerProcess
from .logwriter import TrajectoryLog
from .model import ensure_model
from .service import AgentService
from .store import TrajectoryStore
from .toolbox import ToolBox

log = logging.getLogger("hone")


@dataclass
class Hone:
    """Everything a request handler needs, hung on `app.state.hone`."""

    settings: Settings
    store: TrajectoryStore
    log: TrajectoryLog
    engine: Engine
    service: AgentService
    registry: Registry
    learner: LearnerProcess | None = None


def build_engine(settings: Settings, on_ready) -> Engine:
    if settings.vllm_url:
        return ExternalEngine(settings.vllm_url, on_ready=on_ready)
    model_dir = ensure_model(settings)
    return ManagedEngine(settings, model_dir, on_ready=on_ready)


def create_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    """`engine` may be passed in (tests, benchmarks); by default it is built from the settings."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        store = TrajectoryStore(settings.db_path)
        interrupted = store.recover_interrupted()
        if interrupted:
            log.warning("marked %d runs cut off by an earlier crash as interrupted", interrupted)
        trajectory_log = TrajectoryLog(store)

        async def restore_active_adapter() -> None:
            # Runtime-loaded adapters die with the engine process: load the active one again.
            # A broken adapter must not keep the engine "unready" forever: serve, and let each run
            # fall back to the base model (AgentService.ensure_adapter) while the error is logged.
            name, path = store.get_active_adapter()
            try:
                if name and path and name not in await eng.served_models():
                    await eng.load_adapter(name, path)
            except Exception as e:
                log.error("could not restore active adapter %r from %s: %s", name, path, e)

        eng = engine if engine is not None else build_engine(settings, restore_active_adapter)
        if engine is not None and eng._on_ready is None:
            eng._on_ready = restore_active_adapter
        llm = make_llm(settings, eng.openai_base_url)
        async with AsyncSqliteSaver.from_conn_string(str(settings.checkpoints_path)) as checkpointer:
            await checkpointer.setup()
            service = AgentService(settings, eng, trajectory_log, ToolBox.from_settings(settings), checkpointer,
                                   llm, store.get_active_adapter)
            registry = Registry(settings.db_path)
            hone = Hone(settings, store, trajectory_log, eng, service, registry)
            app.state.hone = hone
            try:
                await eng.start()
                write_engine_file(settings, eng.base_url)  # how `hone train` / `hone learner` find vLLM
                if settings.learner_enabled:
                    hone.learner = LearnerProcess(settings, eng.base_url)
                    await hone.learner.start()
                yield
            finally:
                if hone.learner is not None:
                    await hone.learner.stop()
                await eng.stop()
                registry.close()
                await trajectory_log.aclose()
                store.close()

    app = FastAPI(title="hone", version=__version__, lifespan=lifespan,
                  description="A tool-calling agent that learns from its own traffic.")
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(learner_router)
    return BodyLimit(app, settings.max_body_bytes)


class BodyLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed chunked."""

    def __init__(self, app: FastAPI, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.state = app.state  # tests reach app.state.hone through the wrapper

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(scope, receive, send)
        # Bodies are small (<= limit), so buffer then replay: raising mid-stream would reach
        # Starlette's error middleware as a 500 instead of a clean 413.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        resp = error_response(413, f"request body larger than max_body_bytes={self.limit}", "request_too_large")
        await resp(scope, receive, send)
