"""Graph and service logic with a scripted chat model (the only fake: tools, log and SQLite are real)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver

from runtime.agent import RunContext
from runtime.config import Settings
from runtime.logwriter import TrajectoryLog
from runtime.service import AgentService, RunFailed, RunRequest
from runtime.store import TrajectoryStore
from runtime.toolbox import ToolBox

_ids = itertools.count()


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"id": f"call_{next(_ids)}", "name": name, "args": args, "type": "tool_call"}])


class ScriptedModel:
    """Stands in for VLLMChat: returns scripted replies, records what it was asked."""

    def __init__(self, replies: list[AIMessage | Exception]) -> None:
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []

    async def ainvoke(self, messages, **kwargs):
        self.calls.append({"messages": list(messages), **kwargs})
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        reply = reply.model_copy(deep=True)
        reply.id = f"chatcmpl-{next(_ids)}"
        reply.usage_metadata = {"input_tokens": 10, "output_tokens": 3, "total_tokens": 13}
        reply.response_metadata = {"finish_reason": "stop", "prompt_token_ids": [1, 2, 3],
                                   "token_ids": [4, 5, 2]}
        return reply


class ReadyEngine:
    def __init__(self, ready: bool = True) -> None:
        self.ready = asyncio.Event()
        if ready:
            self.ready.set()
        self.state = "ready" if ready else "down"
        self.last_error = None if ready else "test: engine down"


@pytest.fixture
async def make_service(settings: Settings):
    store = TrajectoryStore(settings.db_path)
    log = TrajectoryLog(store)
    made = []

    def make(replies, *, ready=True, active=(None, None), **overrides):
        s = settings.replace(**overrides)
        model = ScriptedModel(replies)
        svc = AgentService(s, ReadyEngine(ready), log, ToolBox.from_settings(s), InMemorySaver(), model,
                           lambda: active)
        made.append(svc)
        return svc, model, store

    yield make
    log.close()


def req(text: str, **kw) -> RunRequest:
    return RunRequest(messages=[HumanMessage(text)], caller="alice", request_body={"input": text}, **kw)


async def test_tool_call_then_answer_is_logged_token_exact(make_service) -> None:
    svc, model, store = make_service([call("calculator", expression="12 + 30"), AIMessage("The answer is 42.")])
    result = await svc.run(req("What is 12 + 30?", metadata={"task_id": "t1", "expected_answer": 42}))
    assert result.status == "ok" and result.answer == "The answer is 42." and result.n_steps == 2
    # the second model call saw the calculator's exact result
    assert model.calls[1]["messages"][-1].content == "42"
    assert model.calls[0]["model"] == "hone-base"
    t = store.get(result.trajectory_id)
    assert t["status"] == "ok" and t["task_id"] == "t1" and t["metadata"]["expected_answer"] == 42
    assert t["n_tool_calls"] == 1 and t["n_tool_errors"] == 0 and t["n_steps"] == 2
    generated = [m for m in t["messages"] if m["generated"]]
    assert [m["role"] for m in generated] == ["assistant", "assistant"]
    assert generated[0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert generated[0]["prompt_token_ids"] == [1, 2, 3] and generated[0]["completion_token_ids"] == [4, 5, 2]
    tool = next(m for m in t["messages"] if m["role"] == "tool" and not m["tool_call_id"].startswith("example_"))
    assert tool["content"] == "42" and not tool["is_error"] and tool["latency_ms"] is not None
    # the prompt prefix (system + worked examples) is logged, but not as generated
    assert t["messages"][0]["role"] == "system" and not t["messages"][0]["generated"]


async def test_active_adapter_is_read_on_every_call(make_service) -> None:
    active = {"v": (None, None)}
    svc, model, store = make_service([call("calculator", expression="1+1"), AIMessage("2")])
    svc.active_adapter = lambda: active["v"]
    original = model.ainvoke

    async def swap_after_first(messages, **kw):
        out = await original(messages, **kw)
        active["v"] = ("a0001", "/adapters/a0001")  # a swap lands between two steps of one run
        return out

    model.ainvoke = swap_after_first
    result = await svc.run(req("1+1?"))
    assert [c["model"] for c in model.calls] == ["hone-base", "a0001"]
    t = store.get(result.trajectory_id)
    assert [m["adapter"] for m in t["messages"] if m["generated"]] == [None, "a0001"]
    assert t["adapter"] == "a0001"


async def test_step_limit(make_service) -> None:
    svc, _, store = make_service([call("calculator", expression="1+1")] * 3, max_steps=3)
    result = await svc.run(req("loop forever"))
    assert result.status == "step_limit" and result.n_steps == 3
    assert store.get(result.trajectory_id)["status"] == "step_limit"


async def test_unparsed_tool_call_is_parse_error(make_service) -> None:
    svc, _, _ = make_service([AIMessage('<tool_call>{"name": "calculator", "arguments": {')])
    assert (await svc.run(req("2*3?"))).status == "parse_error"


async def test_tool_error_goes_back_to_the_model_and_recovery_is_ok(make_service) -> None:
    svc, model, store = make_service([
        call("calculator", expression="5/0"), call("calculator", expression="5/1"), AIMessage("5"),
    ])
    result = await svc.run(req("5 over 0?"))
    assert "division by zero" in model.calls[1]["messages"][-1].content
    assert result.status == "ok"
    t = store.get(result.trajectory_id)
    assert t["n_tool_errors"] == 1


async def test_unrecovered_tool_error_and_unknown_tool(make_service) -> None:
    svc, model, _ = make_service([call("wget", url="http://x"), AIMessage("I could not.")])
    result = await svc.run(req("fetch it"))
    assert result.status == "tool_error"
    assert "unknown tool 'wget'" in model.calls[1]["messages"][-1].content


async def test_storage_is_namespaced_per_caller(make_service) -> None:
    svc, _, _ = make_service([call("storage", action="put", key="code", value="4512"), AIMessage("saved"),
                              call("storage", action="get", key="code", value=""), AIMessage("?"),
                              call("storage", action="get", key="code", value=""), AIMessage("4512")])
    await svc.run(req("remember code 4512"))
    bob = await svc.run(RunRequest(messages=[HumanMessage("code?")], caller="bob", request_body={}))
    assert bob.messages[2]["role"] == "tool" and "4512" not in bob.messages[2]["content"]
    alice = await svc.run(req("code?"))
    assert alice.messages[2]["content"] == "4512"


async def test_a_run_records_its_namespaces_storage_as_it_started(make_service) -> None:
    """So the learner can re-run a recall turn from what the earlier turn stored."""
    svc, _, store = make_service([call("storage", action="put", key="code", value="4512"), AIMessage("saved"),
                                  AIMessage("It is 4512."), AIMessage("?"), AIMessage("off")])
    first = await svc.run(req("remember code 4512"))
    recall = await svc.run(req("code?"))
    assert store.get(first.trajectory_id)["storage_state"] == {"kv": {}}  # before its own put
    assert store.get(recall.trajectory_id)["storage_state"] == {"kv": {"code": "4512"}}
    small, _, _ = make_service([AIMessage("?")], storage_snapshot_max_bytes=5)  # "code" + "4512" is 8 bytes
    over = await small.run(req("code?"))
    assert store.get(over.trajectory_id)["storage_state"] == {"omitted": "over storage_snapshot_max_bytes=5"}
    off, _, _ = make_service([AIMessage("?")], storage_snapshot_max_bytes=0)
    assert store.get((await off.run(req("code?"))).trajectory_id)["storage_state"] is None


async def test_thread_continues_and_history_is_not_regenerated(make_service) -> None:
    svc, model, store = make_service([AIMessage("Hi Ann."), AIMessage("Your name is Ann.")])
    await svc.run(req("My name is Ann.", thread_id="th1"))
    second = await svc.run(req("What is my name?", thread_id="th1"))
    sent = [m.content for m in model.calls[1]["messages"] if isinstance(m, HumanMessage)]
    assert sent[-2:] == ["My name is Ann.", "What is my name?"]
    t = store.get(second.trajectory_id)
    assistants = [m for m in t["messages"] if m["role"] == "assistant" and m["content"] in ("Hi Ann.", "Your name is Ann.")]
    assert [(m["content"], m["generated"]) for m in assistants] == [("Hi Ann.", False), ("Your name is Ann.", True)]
    # another caller using the same thread_id gets a different thread
    svc2, model2, _ = make_service([AIMessage("Who?")])
    svc2.thread_graph = svc.thread_graph
    await svc2.run(RunRequest(messages=[HumanMessage("What is my name?")], caller="bob", request_body={},
                              thread_id="th1"))
    assert [m.content for m in model2.calls[0]["messages"] if isinstance(m, HumanMessage)][-1:] == ["What is my name?"]
    assert "My name is Ann." not in [m.content for m in model2.calls[0]["messages"]]


async def test_engine_down_is_logged_and_raised(make_service) -> None:
    svc, model, store = make_service([], ready=False)
    with pytest.raises(RunFailed) as e:
        await svc.run(req("2+2?"))
    assert e.value.kind == "engine_unavailable" and model.calls == []
    assert store.get(e.value.trajectory_id)["status"] == "engine_error"


async def test_engine_failure_mid_run_keeps_the_partial_trajectory(make_service) -> None:
    import httpx
    import openai

    boom = openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
    svc, _, store = make_service([call("calculator", expression="2+2"), boom])
    with pytest.raises(RunFailed) as e:
        await svc.run(req("2+2?"))
    t = store.get(e.value.trajectory_id)
    assert t["status"] == "engine_error" and "engine call failed" in t["error"]
    assert [m["role"] for m in t["messages"] if m["generated"] or m["role"] == "tool"][-2:] == ["assistant", "tool"]


async def test_cancelled_run_is_logged_interrupted(make_service) -> None:
    class Slow(ScriptedModel):
        async def ainvoke(self, messages, **kwargs):
            await asyncio.sleep(30)

    svc, _, store = make_service([])
    svc.llm = Slow([])
    task = asyncio.create_task(svc.run(req("slow")))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows, _ = store.list(status="interrupted")
    assert len(rows) == 1 and rows[0]["error"] == "run cancelled"


async def test_client_system_message_is_merged_not_duplicated(make_service) -> None:
    from langchain_core.messages import SystemMessage

    svc, model, store = make_service([AIMessage("Bonjour")])
    r = await svc.run(RunRequest(messages=[SystemMessage("Answer in French."), HumanMessage("Hi")],
                                 caller="alice", request_body={}))
    sent = model.calls[0]["messages"]
    assert sent[0].type == "system" and sent[0].content.endswith("Answer in French.")
    assert sum(m.type == "system" for m in sent) == 1
    logged = store.get(r.trajectory_id)["messages"]
    assert sum(m["role"] == "system" for m in logged) == 1


async def test_a_failed_turn_does_not_join_the_thread(make_service) -> None:
    import httpx
    import openai

    boom = openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions"))
    svc, model, _ = make_service([AIMessage("Hi Ann."), call("calculator", expression="1+1"), boom,
                                  AIMessage("Your name is Ann.")])
    await svc.run(req("My name is Ann.", thread_id="th"))
    with pytest.raises(RunFailed):
        await svc.run(req("What is my name?", thread_id="th"))
    await svc.run(req("What is my name?", thread_id="th"))  # the client's retry
    sent = model.calls[-1]["messages"]
    assert [m.content for m in sent if isinstance(m, HumanMessage)][-2:] == ["My name is Ann.", "What is my name?"]
    assert not any(m.type == "tool" and not m.tool_call_id.startswith("example_") for m in sent)


async def test_the_routed_example_is_sent_and_logged_before_the_request(make_service) -> None:
    svc, model, store = make_service([call("storage", action="get", key="pin", value=""), AIMessage("It is 7.")])
    result = await svc.run(req("Read pin from storage. What is my PIN?"))
    sent = model.calls[0]["messages"]
    assert sent[-1].content == "Read pin from storage. What is my PIN?"
    assert sent[-4].tool_calls[0]["id"] == "example_routed" and sent[-4].tool_calls[0]["args"]["action"] == "get"
    logged = store.get(result.trajectory_id)["messages"]
    routed = [m for m in logged if any(tc["id"] == "example_routed" for tc in m.get("tool_calls") or [])]
    assert len(routed) == 1 and not routed[0]["generated"]


async def test_first_step_tools_replace_the_bound_tools_on_the_first_model_call_only(make_service) -> None:
    narrowed = [{"type": "function", "function": {"name": "calculator", "parameters": {"pattern": "x"}}}]
    svc, model, _ = make_service([call("calculator", expression="12 / 4"), AIMessage("Each gets 3.")])
    result = await svc.run(req("12 apples for 4 friends?", first_step_tools=narrowed))
    assert result.status == "ok" and len(model.calls) == 2
    assert model.calls[0]["tools"] is narrowed and "tools" not in model.calls[1]
    svc, model, _ = make_service([AIMessage("3")])
    await svc.run(req("12 / 4?"))
    assert "tools" not in model.calls[0]
