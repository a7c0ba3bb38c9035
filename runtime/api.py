"""HTTP routes. Each route authenticates, validates, calls AgentService or the store, and shapes JSON.

Status codes: 401/403 auth, 404 unknown id, 413 body too large, 422 invalid input,
503 (+Retry-After) engine unavailable, 504 run timeout. Errors are JSON, never a traceback.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from . import __version__
from .auth import Caller, authenticate, require_admin
from .errors import ApiError
from .messages import MessageFormatError, from_openai
from .service import RunFailed, RunRequest, RunResult
from .store import NotFound
from .timeutil import parse_time

router = APIRouter()

_THREAD_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def _hone(request: Request):
    return request.app.state.hone


def _caller(request: Request) -> Caller:
    return authenticate(_hone(request).settings, request)


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | None = Field(None, description="the user's message (or use `messages`)")
    messages: list[dict[str, Any]] | None = Field(None, description="OpenAI-format messages to append")
    thread_id: str | None = Field(None, description="continue this conversation; omitted = stateless run")
    metadata: dict[str, Any] = Field(default_factory=dict, description="e.g. task_id, expected_answer")
    adapter: str | None = Field(None, description="admin only: serve with this adapter version, or 'base'")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_steps: int | None = Field(None, ge=1, le=50)
    namespace: str | None = Field(None, description="a storage namespace inside the caller's own "
                                  "('<caller>/<namespace>'), e.g. one per eval task; omitted = the caller's")
    source: Literal["serve", "eval"] | None = Field(None, description="'eval' marks a measurement run: "
                                                    "logged and labelled, never trained on")

    @field_validator("thread_id", "namespace")
    @classmethod
    def _thread(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not _THREAD_ID.match(v):
            raise ValueError(f"{info.field_name} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
        return v


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # the OpenAI SDK sends fields we do not use
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    metadata: dict[str, Any] | None = None
    thread_id: str | None = None

    _thread = field_validator("thread_id")(RunBody._thread.__func__)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float | bool | Literal["success", "failure"]
    comment: str | None = Field(None, max_length=10_000)

    def numeric(self) -> float:
        if isinstance(self.score, str):
            return 1.0 if self.score == "success" else 0.0
        if isinstance(self.score, bool):
            return 1.0 if self.score else 0.0
        if not 0.0 <= self.score <= 1.0:
            raise ApiError(422, "score: must be between 0 and 1, or 'success'/'failure'")
        return float(self.score)


async def _run(request: Request, caller: Caller, messages: list[dict[str, Any]], body: dict[str, Any], *,
               thread_id: str | None, metadata: dict[str, Any], adapter: str | None = None,
               temperature: float | None = None, max_steps: int | None = None, namespace: str | None = None,
               source: str | None = None) -> RunResult:
    if adapter is not None:
        require_admin(caller)
    try:  # what the log will store: strict JSON (no NaN), valid UTF-8 (no lone surrogates)
        json.dumps(body, allow_nan=False, ensure_ascii=False).encode()
        json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:
        raise ApiError(422, f"request is not storable JSON: {e}") from None
    try:
        parsed = from_openai(messages)
    except MessageFormatError as e:
        raise ApiError(422, str(e)) from None
    if not parsed:
        raise ApiError(422, "no messages to run")
    hone = _hone(request)
    try:
        return await hone.service.run(RunRequest(
            messages=parsed, caller=caller.name, request_body=body, thread_id=thread_id, metadata=metadata,
            adapter=adapter, temperature=temperature, max_steps=max_steps, source=source or "serve",
            namespace=f"{caller.name}/{namespace}" if namespace else None,
        ))
    except RunFailed as e:
        extra = {"trajectory_id": e.trajectory_id}
        if e.kind == "engine_unavailable":
            raise ApiError(503, e.args[0], "engine_unavailable", headers={"Retry-After": "5"}, **extra) from None
        if e.kind == "engine_rejected":
            raise ApiError(422, e.args[0], "engine_rejected", **extra) from None
        if e.kind == "timeout":
            raise ApiError(504, e.args[0], "timeout", **extra) from None
        raise ApiError(500, e.args[0], "internal_error", **extra) from None


@router.post("/v1/runs")
async def create_run(body: RunBody, request: Request) -> dict[str, Any]:
    """Run the agent on one new user input (or messages) and return the answer with its trajectory id."""
    caller = _caller(request)
    if (body.input is None) == (body.messages is None):
        raise ApiError(422, "give exactly one of `input` or `messages`")
    messages = [{"role": "user", "content": body.input}] if body.input is not None else body.messages or []
    result = await _run(request, caller, messages, body.model_dump(exclude_none=True), thread_id=body.thread_id,
                        metadata=body.metadata, adapter=body.adapter, temperature=body.temperature,
                        max_steps=body.max_steps, namespace=body.namespace, source=body.source)
    return {
        "trajectory_id": result.trajectory_id, "status": result.status, "answer": result.answer,
        "thread_id": result.thread_id, "steps": result.n_steps, "model": result.model, "adapter": result.adapter,
        "latency_ms": round(result.latency_ms, 1), "tool_calls": result.tool_calls,
        "tool_errors": result.tool_errors, "messages": result.messages,
    }


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatBody, request: Request) -> JSONResponse | StreamingResponse:
    """OpenAI-compatible: the agent (tools and all) answers the conversation; the final answer is the
    assistant message. Without `thread_id` the client sends the whole history each time (stateless)."""
    caller = _caller(request)
    metadata = dict(body.metadata or {})
    result = await _run(request, caller, body.messages, body.model_dump(exclude_none=True), thread_id=body.thread_id,
                        metadata=metadata, temperature=body.temperature)
    steps = [m for m in result.messages if m["role"] == "assistant"]
    completion = {
        "id": f"chatcmpl-{result.trajectory_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.adapter or result.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                     "finish_reason": "stop" if result.status == "ok" else "length" if result.status == "step_limit" else "stop"}],
        "usage": None,
        "hone": {"trajectory_id": result.trajectory_id, "status": result.status, "steps": result.n_steps,
                 "tool_calls": sum(len(m.get("tool_calls") or []) for m in steps), "thread_id": result.thread_id},
    }
    headers = {"X-Hone-Trajectory-Id": result.trajectory_id}
    if not body.stream:
        return JSONResponse(completion, headers=headers)

    async def events():  # the answer exists only once the agent is done: one content chunk, then stop
        base = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        yield f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': result.answer}, 'finish_reason': None}], 'hone': completion['hone']})}\n\n"
        yield f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': {}, 'finish_reason': completion['choices'][0]['finish_reason']}]})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post("/v1/trajectories/{trajectory_id}/feedback")
async def feedback(trajectory_id: str, body: FeedbackBody, request: Request) -> dict[str, Any]:
    """Record a user's verdict on a run: success/failure or a score in [0, 1], with a comment."""
    caller = _caller(request)
    hone = _hone(request)
    traj = await hone.log.get(trajectory_id)
    if traj is None:
        raise ApiError(404, f"no trajectory {trajectory_id!r}", "not_found")
    if not caller.admin and traj["caller"] != caller.name:  # 404, not 403: ids of others stay unknowable
        raise ApiError(404, f"no trajectory {trajectory_id!r}", "not_found")
    try:
        return await hone.log.add_feedback(trajectory_id, score=body.numeric(), comment=body.comment,
                                           caller=caller.name)
    except NotFound:
        raise ApiError(404, f"no trajectory {trajectory_id!r}", "not_found") from None


def _time(value: str | None, name: str) -> float | None:
    try:
        return parse_time(value, name)
    except ValueError as e:
        raise ApiError(422, str(e)) from None


@router.get("/v1/trajectories")
async def list_trajectories(
    request: Request,
    status: str | None = None, label: str | None = None, adapter: str | None = None,
    caller: str | None = None, source: str | None = None, task_id: str | None = None,
    since: str | None = Query(None, description="unix seconds or ISO-8601"),
    until: str | None = Query(None, description="unix seconds or ISO-8601"),
    limit: int = Query(50, ge=1, le=500), cursor: str | None = None,
) -> dict[str, Any]:
    """Admin: newest first, with cursor paging (`next_cursor`)."""
    require_admin(_caller(request))
    try:
        rows, next_cursor = await _hone(request).log.list(
            status=status, label=label, adapter=adapter, caller=caller, source=source, task_id=task_id,
            since=_time(since, "since"), until=_time(until, "until"), limit=limit, cursor=cursor)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    return {"data": rows, "next_cursor": next_cursor}


@router.get("/v1/trajectories/{trajectory_id}")
async def get_trajectory(trajectory_id: str, request: Request) -> dict[str, Any]:
    """One trajectory with every message (tool calls, results, token ids, timings) and its feedback."""
    caller = _caller(request)
    traj = await _hone(request).log.get(trajectory_id)
    if traj is None or (not caller.admin and traj["caller"] != caller.name):
        raise ApiError(404, f"no trajectory {trajectory_id!r}", "not_found")
    return traj


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """200 when the engine answers; 503 while it starts or restarts."""
    hone = _hone(request)
    active, _ = hone.store.get_active_adapter()
    body = {"status": "ok" if hone.engine.ready.is_set() else hone.engine.state, "engine": hone.engine.state,
            "engine_url": hone.engine.base_url, "engine_error": hone.engine.last_error,
            "model": hone.settings.served_model_name, "active_adapter": active, "version": __version__}
    return JSONResponse(body, status_code=200 if hone.engine.ready.is_set() else 503,
                        headers=None if hone.engine.ready.is_set() else {"Retry-After": "5"})
