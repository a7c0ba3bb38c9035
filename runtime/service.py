"""One agent run from request to durable log: the code path every HTTP route and the CLI share.

    run() -> log.start (row 'running') -> graph (agent <-> tools) -> log.finish (committed) -> result

A run is logged whatever happens: engine down (engine_error), client gone or server stopping
(interrupted), or a crash (the 'running' row is marked interrupted at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from .agent import EngineRequestError, RunContext, build_graph
from .config import Settings
from .engine import Engine, EngineError
from .logwriter import TrajectoryLog
from .messages import request_key, to_openai
from .toolbox import ToolBox

log = logging.getLogger("hone.service")

RUN_TIMEOUT = "run_timeout"


class RunFailed(Exception):
    """A run that could not produce an answer. `kind` picks the HTTP status; the run is logged."""

    def __init__(self, kind: str, message: str, trajectory_id: str) -> None:
        super().__init__(message)
        self.kind = kind  # engine_unavailable | engine_rejected | timeout | internal
        self.trajectory_id = trajectory_id


@dataclass
class RunRequest:
    messages: list[BaseMessage]  # the new messages to append to the thread
    caller: str
    request_body: dict[str, Any]
    thread_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "serve"
    namespace: str | None = None  # storage namespace; default: the caller
    adapter: str | None = None  # force a version ("base" for none); default: the active adapter
    temperature: float | None = None
    max_steps: int | None = None
    first_step_tools: list[dict[str, Any]] | None = None  # tool specs for the first model call (RunContext)


@dataclass
class RunResult:
    trajectory_id: str
    status: str
    answer: str
    thread_id: str | None
    model: str
    adapter: str | None
    n_steps: int
    latency_ms: float
    messages: list[dict[str, Any]]  # this run's new messages, OpenAI format
    tool_calls: int = 0  # tool calls the model made in this run
    tool_errors: int = 0  # of those, the ones whose tool answered with an error (bad arguments, failures)


class AgentService:
    def __init__(self, settings: Settings, engine: Engine, log: TrajectoryLog, toolbox: ToolBox,
                 checkpointer: Any, llm: Any, active_adapter) -> None:
        self.settings = settings
        self.engine = engine
        self.log = log
        self.toolbox = toolbox
        self.llm = llm
        self.active_adapter = active_adapter  # () -> (name | None, path | None); cheap, read per call
        self.stateless_graph = build_graph(None)  # every run executes here
        self.thread_graph = build_graph(checkpointer)  # holds threads' histories (read, then appended)
        self._thread_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._adapter_lock = asyncio.Lock()

    def resolve_model(self, forced: str | None) -> tuple[str, str | None]:
        if forced == "base":
            return self.settings.served_model_name, None
        if forced:
            return forced, forced
        name, _path = self.active_adapter()
        return (name, name) if name else (self.settings.served_model_name, None)

    async def ensure_adapter(self, name: str) -> bool:
        """Load adapter `name` into the engine (from the pointer's path, else HONE_HOME/adapters/name)."""
        async with self._adapter_lock:
            active, path = self.active_adapter()
            source = Path(path) if name == active and path else self.settings.adapters_dir / name
            try:
                if name not in await self.engine.served_models():
                    await self.engine.load_adapter(name, source)
                return True
            except Exception as e:
                log.error("could not load adapter %r from %s, serving the base model: %s", name, source, e)
                return False

    async def run(self, req: RunRequest) -> RunResult:
        t0 = time.perf_counter()
        first_model, _ = self.resolve_model(req.adapter)
        namespace = req.namespace or req.caller
        traj_id = await self.log.start(
            caller=req.caller, thread_id=req.thread_id, request=req.request_body, metadata=req.metadata,
            request_key=request_key(req.messages), task_id=_task_id(req.metadata), source=req.source,
            model=self.settings.served_model_name, storage_state=await self._storage_state(namespace),
        )
        ctx = RunContext(
            llm=self.llm, toolbox=self.toolbox, namespace=namespace,
            resolve_model=lambda: self.resolve_model(req.adapter),
            max_steps=req.max_steps or self.settings.max_steps,
            temperature=self.settings.temperature if req.temperature is None else req.temperature,
            max_tokens=self.settings.max_tokens,
            base_model=self.settings.served_model_name, ensure_adapter=self.ensure_adapter,
            fallback_to_base=req.adapter is None, first_step_tools=req.first_step_tools,
        )
        history: list[BaseMessage] = []
        try:
            if not self.engine.ready.is_set():
                raise EngineError(f"engine is {self.engine.state}: {self.engine.last_error or 'starting up'}")
            if req.thread_id is None:
                await asyncio.wait_for(self._invoke(req.messages, ctx),
                                       self.settings.request_timeout_s)
            else:
                key = f"{req.caller}/{req.thread_id}"  # callers never share threads
                lock = self._thread_locks.setdefault(key, asyncio.Lock())
                async with lock:  # two turns of one thread must not interleave
                    config = {"configurable": {"thread_id": key}}
                    snapshot = await self.thread_graph.aget_state(config)
                    history = list((snapshot.values or {}).get("messages", []))
                    await asyncio.wait_for(self._invoke([*history, *req.messages], ctx),
                                           self.settings.request_timeout_s)
                    # Only a turn that completed joins the thread: a failed or cancelled one would
                    # otherwise leave the user's message (and half a tool exchange) for the retry to
                    # repeat. as_node="tools": its plain edge needs no run context to resolve.
                    await self.thread_graph.aupdate_state(config, {"messages": [*req.messages, *ctx.trace]},
                                                          as_node="tools")
        except EngineError as e:
            await self._finish(traj_id, ctx, history, req, "engine_error", str(e), t0)
            raise RunFailed("engine_unavailable", str(e), traj_id) from None
        except EngineRequestError as e:
            await self._finish(traj_id, ctx, history, req, "engine_error", str(e), t0)
            raise RunFailed("engine_rejected", str(e), traj_id) from None
        except TimeoutError:
            msg = f"run exceeded request_timeout_s={self.settings.request_timeout_s:g}"
            await self._finish(traj_id, ctx, history, req, "engine_error", msg, t0)
            raise RunFailed("timeout", msg, traj_id) from None
        except asyncio.CancelledError:
            # Client gone or server stopping: record what happened before re-raising.
            await asyncio.shield(self._finish(traj_id, ctx, history, req, "interrupted", "run cancelled", t0))
            raise
        except Exception as e:  # a bug of ours: log the run, answer a clean 500
            log.exception("run %s failed", traj_id)
            await self._finish(traj_id, ctx, history, req, "interrupted", f"internal error: {e!r}", t0)
            raise RunFailed("internal", f"internal error ({type(e).__name__}); see server log", traj_id) from None
        status = ctx.stop_reason or _tool_status(ctx.trace)
        try:
            return await self._finish(traj_id, ctx, history, req, status, None, t0)
        except Exception as e:  # never leave the row 'running': record at least that it failed
            log.exception("logging run %s failed", traj_id)
            with contextlib.suppress(Exception):
                await self.log.finish(traj_id, status="interrupted", messages=[], error=f"log write failed: {e!r}")
            raise RunFailed("internal", f"the run finished but could not be logged ({type(e).__name__})",
                            traj_id) from None

    async def _storage_state(self, namespace: str) -> dict[str, Any] | None:
        """The namespace's contents as the run starts: what a re-run must start from (a recall turn
        is only re-runnable with what an earlier turn stored)."""
        limit = self.settings.storage_snapshot_max_bytes
        if limit <= 0:
            return None
        try:
            kv = await asyncio.to_thread(self.toolbox.kv.snapshot, namespace, limit)
        except Exception as e:  # a busy or broken kv table must not fail the user's run
            log.warning("could not record storage state of %r: %s", namespace, e)
            return {"omitted": f"could not be read: {type(e).__name__}"}
        return {"kv": kv} if kv is not None else {"omitted": f"over storage_snapshot_max_bytes={limit}"}

    async def _invoke(self, messages: list[BaseMessage], ctx: RunContext) -> None:
        config = {"recursion_limit": 2 * ctx.max_steps + 4}
        await self.stateless_graph.ainvoke({"messages": messages}, config, context=ctx)

    async def _finish(self, traj_id: str, ctx: RunContext, history: list[BaseMessage], req: RunRequest,
                      status: str, error: str | None, t0: float) -> RunResult:
        latency_ms = (time.perf_counter() - t0) * 1000
        new = [*req.messages, *ctx.trace]
        # The prompt prefix (system + examples) is logged so the learner can re-render exactly.
        logged = [_log_dict(m, ctx, generated=False) for m in (ctx.prefix or [])]
        conversation = [*history, *req.messages]
        if ctx.prefix and conversation and conversation[0].type == "system":
            conversation = conversation[1:]  # merged into the prefix's system message
        logged += [_log_dict(m, ctx, generated=False) for m in conversation]
        logged += [_log_dict(m, ctx, generated=isinstance(m, AIMessage)) for m in ctx.trace]
        answer = ""
        if ctx.trace and isinstance(ctx.trace[-1], AIMessage):
            answer = str(ctx.trace[-1].content).strip()
        adapter = next((ctx.steps[m.id].adapter for m in reversed(ctx.trace)
                        if isinstance(m, AIMessage) and m.id in ctx.steps), None)
        steps = [ctx.steps[m.id] for m in ctx.trace if isinstance(m, AIMessage) and m.id in ctx.steps]
        model = steps[-1].model if steps else self.resolve_model(req.adapter)[0]
        await self.log.finish(traj_id, status=status, messages=logged, final_answer=answer, error=error,
                              adapter=adapter, latency_ms=latency_ms)
        return RunResult(
            trajectory_id=traj_id, status=status, answer=answer, thread_id=req.thread_id,
            model=model, adapter=adapter, n_steps=ctx.n_model_calls, latency_ms=latency_ms,
            messages=[to_openai(m) for m in new],
            tool_calls=sum(len(m.tool_calls) for m in ctx.trace if isinstance(m, AIMessage)),
            tool_errors=sum(1 for m in ctx.trace if isinstance(m, ToolMessage) and m.status == "error"),
        )


def _tool_status(trace: list[BaseMessage]) -> str:
    """tool_error when a tool failed and no later tool call succeeded (the model never recovered)."""
    tool_msgs = [m for m in trace if isinstance(m, ToolMessage)]
    if tool_msgs and tool_msgs[-1].status == "error":
        return "tool_error"
    return "ok"


def _task_id(metadata: dict[str, Any]) -> str | None:
    v = metadata.get("task_id")
    return str(v) if v is not None else None


def _log_dict(m: BaseMessage, ctx: RunContext, *, generated: bool) -> dict[str, Any]:
    d = to_openai(m)
    d["generated"] = generated
    if isinstance(m, AIMessage) and generated and m.id in ctx.steps:
        s = ctx.steps[m.id]
        d.update(model=s.model, adapter=s.adapter, started_at=s.started_at, latency_ms=s.latency_ms,
                 prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                 prompt_token_ids=s.prompt_token_ids, completion_token_ids=s.completion_token_ids,
                 finish_reason=s.finish_reason)
    if isinstance(m, ToolMessage):
        rec = ctx.tools.get(m.tool_call_id)
        d["is_error"] = m.status == "error"
        if rec is not None:
            d.update(started_at=rec.started_at, latency_ms=rec.latency_ms)
    return d


def new_thread_id() -> str:
    return uuid.uuid4().hex
