"""End to end on real parts: `hone serve` -> a real vLLM (CPU) with the prepared SmolLM2 -> the
LangGraph agent -> real tools -> the SQLite log, driven over HTTP, the OpenAI SDK and the CLI.

Greedy decoding (temperature 0) keeps the model's choices repeatable, so a question the base model
answers with a calculator call does so every time."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from runtime.store import TrajectoryStore

from .integration_support import hone_server, prepared_model, wait_healthy

pytestmark = pytest.mark.integration

QUESTION = "A farmer has 23 cows and buys 19 more. How many cows does he have now?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with hone_server(tmp_path_factory.mktemp("serve-home"), prepared_model()) as s:
        yield s


def run(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/runs", json=body, timeout=300)


def generated_steps(traj: dict) -> list[dict]:
    return [m for m in traj["messages"] if m["role"] == "assistant" and m["generated"]]


def test_word_problem_is_answered_and_logged_with_its_tool_call(server) -> None:
    r = run(server, input=QUESTION, metadata={"task_id": "cows-1", "expected_answer": 42})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["steps"] >= 2 and body["adapter"] is None
    traj = httpx.get(f"{server.url}/v1/trajectories/{body['trajectory_id']}").json()
    assert traj["status"] == "ok" and traj["task_id"] == "cows-1" and traj["metadata"]["expected_answer"] == 42
    steps = generated_steps(traj)
    call = steps[0]["tool_calls"][0]["function"]
    assert call["name"] == "calculator"
    result = next(m for m in traj["messages"] if m["role"] == "tool" and m["tool_call_id"] == steps[0]["tool_calls"][0]["id"])
    expr = json.loads(call["arguments"])["expression"]
    assert result["content"] and not result["is_error"], (expr, result)
    for s in steps:  # token-exact: what vLLM sampled, and which model served it
        assert s["model"] == "hone-base" and s["adapter"] is None
        assert s["completion_token_ids"] and s["prompt_token_ids"]
        assert s["completion_tokens"] == len(s["completion_token_ids"])
    # the prompt of step 2 extends step 1's prompt + its completion (no retokenization drift)
    p1, c1, p2 = steps[0]["prompt_token_ids"], steps[0]["completion_token_ids"], steps[1]["prompt_token_ids"]
    assert p2[: len(p1)] == p1
    assert p2[len(p1): len(p1) + len(c1)] == c1

    # the CLI shows the calculator call, its result and the version that served it
    shown = server.hone("trajectories", "show", body["trajectory_id"]).stdout
    assert "calls calculator(" in shown and f"tool calculator" in shown and "hone-base" in shown


def test_feedback_round_trip_and_cli_listing(server) -> None:
    tid = run(server, input="What is 7 times 8?").json()["trajectory_id"]
    r = httpx.post(f"{server.url}/v1/trajectories/{tid}/feedback", json={"score": "success", "comment": "right"})
    assert r.status_code == 200, r.text
    traj = httpx.get(f"{server.url}/v1/trajectories/{tid}").json()
    assert traj["feedback"][0]["score"] == 1.0 and traj["feedback"][0]["comment"] == "right"
    listed = server.hone("trajectories", "list", "--limit", "5").stdout
    assert tid in listed
    exported = server.hone("trajectories", "export").stdout.splitlines()
    assert any(json.loads(line)["id"] == tid and json.loads(line)["feedback"] for line in exported)


def test_openai_sdk_against_chat_completions(server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.chat.completions.create(model="hone", messages=[{"role": "user", "content": QUESTION}])
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    tid = out.id.removeprefix("chatcmpl-")
    traj = httpx.get(f"{server.url}/v1/trajectories/{tid}").json()
    assert traj["id"] == tid and traj["final_answer"] == out.choices[0].message.content
    stream = client.chat.completions.create(model="hone", stream=True,
                                            messages=[{"role": "user", "content": QUESTION}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == out.choices[0].message.content  # greedy: same answer


def test_hone_run_cli_and_thread_continuation(server) -> None:
    first = server.hone("run", "--url", server.url, "--thread", "t-1", "--json", "Remember that my locker code is 9931.")
    first = json.loads(first.stdout)
    second = run(server, input="What is my locker code?", thread_id="t-1").json()
    traj = httpx.get(f"{server.url}/v1/trajectories/{second['trajectory_id']}").json()
    users = [m["content"] for m in traj["messages"] if m["role"] == "user"]
    assert users[-2:] == ["Remember that my locker code is 9931.", "What is my locker code?"]
    assert traj["thread_id"] == "t-1" and first["thread_id"] == "t-1"


def test_cli_errors_are_one_line_and_exit_nonzero(server, tmp_path: Path) -> None:
    r = server.hone("run", "--url", "http://127.0.0.1:9", "hello", check=False)
    assert r.returncode == 1 and "no hone server" in r.stderr and "Traceback" not in r.stderr
    r = server.hone("trajectories", "show", "t_missing", check=False)
    assert r.returncode == 1 and "no trajectory" in r.stderr


def _make_adapter(model_dir: Path, out: Path) -> Path:
    """A real PEFT LoRA adapter (random B, so it changes outputs) for the served model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def _vllm_process(server) -> psutil.Process:
    children = psutil.Process(server.proc.pid).children(recursive=False)
    return next(p for p in children if "vllm" in " ".join(p.cmdline()))


def test_active_adapter_is_used_and_survives_an_engine_crash(server) -> None:
    model_dir = Path(server.env["HONE_MODEL"])
    path = _make_adapter(model_dir, server.home / "adapters" / "a-test-1")
    TrajectoryStore(server.home / "hone.db").set_active_adapter("a-test-1", str(path))
    # the pointer alone is enough: the server loads the adapter on first use
    body = run(server, input=QUESTION).json()
    assert body["adapter"] == "a-test-1", body
    traj = httpx.get(f"{server.url}/v1/trajectories/{body['trajectory_id']}").json()
    assert {s["adapter"] for s in generated_steps(traj)} == {"a-test-1"} and traj["adapter"] == "a-test-1"

    # kill vLLM: requests get 503 + Retry-After (and are logged) until the supervisor has restarted it
    vllm = _vllm_process(server)
    os.killpg(vllm.pid, signal.SIGKILL)
    vllm.wait(30)
    r = run(server, input="What is 2 + 2?")
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    failed = httpx.get(f"{server.url}/v1/trajectories/{r.json()['error']['trajectory_id']}").json()
    assert failed["status"] == "engine_error"
    t0 = time.monotonic()
    wait_healthy(server.url, 600)
    print(f"engine restarted in {time.monotonic() - t0:.0f}s")
    body = run(server, input=QUESTION).json()
    assert body["status"] in ("ok", "tool_error", "parse_error", "step_limit") and body["adapter"] == "a-test-1"
    assert "a-test-1" in httpx.get(server.url + "/v1/adapters").json()["engine_models"]
    TrajectoryStore(server.home / "hone.db").set_active_adapter(None, None)
    assert run(server, input=QUESTION).json()["adapter"] is None
