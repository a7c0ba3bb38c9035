"""The `hone` CLI on a real SQLite log: tables, JSONL export, feedback, and clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runtime.cli import main
from runtime.config import Settings
from runtime.store import TrajectoryStore


@pytest.fixture
def home(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HONE_HOME", str(settings.home))
    store = TrajectoryStore(settings.db_path)
    tid = store.start(caller="local", thread_id=None, request={"input": "What is 2 + 3?"}, metadata={"task_id": "t"},
                      request_key="k", model="hone-base")
    store.finish(tid, status="ok", final_answer="The answer is 5.", latency_ms=12.0, messages=[
        {"role": "system", "content": "sys", "generated": False},
        {"role": "user", "content": "What is 2 + 3?", "generated": False},
        {"role": "assistant", "content": "", "generated": True, "model": "hone-base", "latency_ms": 5.0,
         "completion_tokens": 9, "tool_calls": [{"id": "c1", "type": "function", "function": {
             "name": "calculator", "arguments": "{\"expression\": \"2 + 3\"}"}}]},
        {"role": "tool", "content": "5", "tool_call_id": "c1", "name": "calculator", "is_error": False},
        {"role": "assistant", "content": "The answer is 5.", "generated": True, "model": "hone-base"},
    ])
    return tid


def test_list_show_export_feedback(home: str) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["trajectories", "list"])
    assert out.exit_code == 0 and home in out.output and "What is 2 + 3?" in out.output
    out = runner.invoke(main, ["trajectories", "show", home])
    assert out.exit_code == 0
    assert 'calls calculator({"expression": "2 + 3"})' in out.output and "tool calculator: 5" in out.output
    out = runner.invoke(main, ["trajectories", "feedback", home, "success", "--comment", "right"])
    assert out.exit_code == 0
    out = runner.invoke(main, ["trajectories", "export"])
    row = json.loads(out.stdout.splitlines()[0])
    assert row["id"] == home and row["feedback"][0]["score"] == 1.0 and len(row["messages"]) == 5


@pytest.mark.parametrize("args, code, fragment", [
    (["trajectories", "show", "t_missing"], 1, "no trajectory"),
    (["trajectories", "feedback", "t_missing", "success"], 1, "no trajectory"),
    (["trajectories", "feedback", "X", "great"], 2, "success, failure"),
    (["trajectories", "list", "--since", "yesterday"], 2, "ISO-8601"),
    (["trajectories", "list", "--cursor", "garbage"], 2, "cursor"),
    (["run", "--meta", "novalue", "hi"], 2, "KEY=VALUE"),
])
def test_bad_input_is_one_line_on_stderr(home: str, args: list[str], code: int, fragment: str) -> None:
    out = CliRunner().invoke(main, args)
    assert out.exit_code == code, out.output
    assert fragment in out.output and "Traceback" not in out.output


def test_bad_configuration_is_a_usage_error(home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONE_PORT", "eighty")
    out = CliRunner().invoke(main, ["config"])
    assert out.exit_code == 2 and "HONE_PORT" in out.output


def test_cycles_list_counts_operator_trials_as_explored(home: str, settings: Settings) -> None:
    from learner.registry import Registry

    registry = Registry(settings.db_path)
    with_trials = registry.start_cycle("timer")
    registry.finish_cycle(with_trials, "rejected", counts={"pairs": 40, "explore_rollouts": 256, "trial_rollouts": 230})
    free_only = registry.start_cycle("timer")
    registry.finish_cycle(free_only, "rejected", counts={"pairs": 12, "explore_rollouts": 64})
    registry.close()

    out = CliRunner().invoke(main, ["cycles"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line.split() for line in out.output.splitlines()[1:]}
    assert "256+230" in rows[str(with_trials)] and "64" in rows[str(free_only)]
