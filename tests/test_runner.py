"""The learner's in-process runner on multi-turn tasks (gate and exploration use it): turns share the
namespace, `new_thread` drops the history, only the last turn is checked and carries the expected
answer. The service is a stand-in that records requests: this is the runner's own logic."""

from __future__ import annotations

import asyncio

from learner.runner import AgentRunner
from learner.tasks import Task, Turn
from runtime.service import RunResult


class RecordingService:
    def __init__(self, statuses: list[str] | None = None) -> None:
        self.requests = []
        self.statuses = statuses or []

    async def run(self, req):
        self.requests.append(req)
        n = len(self.requests)
        status = self.statuses[n - 1] if n <= len(self.statuses) else "ok"
        text = req.messages[-1].content
        answer = "It is blue-7." if "what" in text else "Saved."
        return RunResult(f"t{n}", status, answer, None, "m", None, 2, 1.0, [])


TASK = Task("file:m", (), "blue-7", "contains",
            turns=(Turn("save blue-7 as c"), Turn("also note it"), Turn("what is c?", True)))


def _attempt(service: RecordingService):
    runner = AgentRunner(settings=None, service=service, engine=None)  # type: ignore[arg-type]
    return asyncio.run(runner.attempt(TASK, source="gate", namespace="ns1", adapter=None, temperature=0.0))


def test_turns_share_the_namespace_and_a_new_thread_drops_the_history() -> None:
    service = RecordingService()
    a = _attempt(service)
    assert a.success and a.steps == 6 and a.trajectory_id == "t3"
    r1, r2, r3 = service.requests
    assert {r.namespace for r in service.requests} == {"ns1"}
    assert [m.content for m in r2.messages] == ["save blue-7 as c", "Saved.", "also note it"]  # continued
    assert [m.content for m in r3.messages] == ["what is c?"]  # new thread: no history
    assert "expected_answer" not in r1.metadata and r1.metadata["task_id"] == "file:m#turn0"
    assert r3.metadata["expected_answer"] == "blue-7" and r3.metadata["task_id"] == "file:m"


def test_a_failed_earlier_turn_ends_the_attempt_as_a_failure() -> None:
    service = RecordingService(["tool_error"])
    a = _attempt(service)
    assert not a.success and a.status == "tool_error" and len(service.requests) == 1
