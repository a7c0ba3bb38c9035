"""`hone bench loop`'s bookkeeping: pools (gate taken from the training pool, held-out disjoint),
the verdicts (target, regressions against the parent) and the table. The experiment itself runs
real parts for an hour, so it is a benchmark (docs/benchmarks.md), not a test; its mechanics, one
cycle from labels to eval, are tests/test_learner_integration.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from learner import experiment
from learner.experiment import (
    LOOP_DEFAULTS, REPO, ExperimentError, LoopConfig, done_promoting, learner_settings, load_pools,
)
from learner.report import table, verdicts, write_report
from learner.tasks import TaskFileError, load_task_file
from runtime.cli import main
from runtime.config import Settings


def ev(rate: float, n: int = 40) -> dict:
    return {"rate": rate, "n": n, "success": round(rate * n), "ci95": [0, 1], "eval_id": "e", "mean_steps": 2,
            "tool_call_validity": 1.0}


def result(*rows: tuple[str, str | None, float, float]) -> dict:
    out = {"started": "now", "rows": []}
    for i, (status, adapter, heldout, storage) in enumerate(rows):
        row = {"label": "base" if i == 0 else f"cycle {i}", "status": status, "adapter": adapter,
               "evals": {"heldout": ev(heldout), "storage": ev(storage, 12)}}
        if i:
            row.update(traffic={"n": 32, "solved": 8}, gate={"candidate_rate": 0.5, "current_rate": 0.4, "n_tasks": 24},
                       counts={"pairs": 20, "explore_rollouts": 48, "drift_excluded": 1, "drift_trimmed": 3},
                       timings={"train": 300.0, "gate": 100.0})
        out["rows"].append(row)
    return out


def test_target_is_the_larger_of_double_and_plus_ten_points_over_promoted_rows_only() -> None:
    r = result(("base", None, 0.20, 0.5), ("rejected", "hone-v1", 0.60, 0.5), ("promoted", "hone-v2", 0.35, 0.5))
    v = verdicts(r)
    assert v["target"] == pytest.approx(0.40) and v["best_promoted_heldout"] == 0.35 and not v["target_reached"]
    r = result(("base", None, 0.02, 0.5), ("promoted", "hone-v1", 0.12, 0.5))
    v = verdicts(r)
    assert v["target"] == pytest.approx(0.12) and v["target_reached"] and v["promoted"] == 1


def test_a_promoted_adapter_below_its_parent_on_any_pool_is_listed() -> None:
    r = result(("base", None, 0.2, 0.5), ("promoted", "hone-v1", 0.3, 0.4), ("rejected", "hone-v2", 0.1, 0.1),
               ("promoted", "hone-v3", 0.35, 0.45))
    drops = verdicts(r)["drops_vs_parent"]
    assert drops == [{"adapter": "hone-v1", "parent": "base", "pool": "storage", "from": 0.5, "to": 0.4}]


def test_a_regression_carries_its_task_by_task_comparison_when_the_run_recorded_it(tmp_path: Path) -> None:
    r = result(("base", None, 0.2, 0.5), ("promoted", "hone-v1", 0.3, 0.4))
    r["rows"][1]["vs_parent"] = {"storage": {"n": 12, "fixed": 0, "broken": 1, "p_value": 1.0},
                                 "heldout": {"n": 40, "fixed": 5, "broken": 1, "p_value": 0.219}}
    assert verdicts(r)["drops_vs_parent"] == [{"adapter": "hone-v1", "parent": "base", "pool": "storage", "from": 0.5,
                                               "to": 0.4, "n": 12, "fixed": 0, "broken": 1, "p_value": 1.0}]
    assert "regression: hone-v1 on storage 50.0% -> 40.0% (parent base; fixed 0, broke 1, McNemar p 1)" \
        in write_report(r, tmp_path)


def test_each_evaluated_candidate_is_compared_task_by_task_with_what_served_before(tmp_path: Path) -> None:
    from learner.tasks import Task
    from runtime.evals import EvalOptions, EvalStore, TaskResult

    store = EvalStore(tmp_path / "hone.db")  # a real SQLite file, as the experiment's home has
    tasks = [Task(f"file:t{i}", ({"role": "user", "content": f"q{i}"},), i, "numeric") for i in range(6)]

    def run(eval_id: str, solved: set[int]) -> dict:
        store.create(eval_id, tasks_file="t.jsonl", server="s", options=EvalOptions(), n_tasks=len(tasks))
        for i, t in enumerate(tasks):
            store.add_result(eval_id, t, TaskResult(task_id=t.id, task_type="x", success=i in solved, status="ok",
                                                    answer="", steps=1, tool_calls=0, tool_errors=0, latency_ms=1.0))
        return {"eval_id": eval_id}

    parent = {"heldout": run("ev-parent", {0, 1, 2}), "python": run("ev-p-parent", {0})}
    child = {"heldout": run("ev-child", {1, 2, 3, 4, 5}), "python": run("ev-p-child", set()), "new": run("ev-n", {0})}
    out = experiment.against_parent(store, child, parent)
    assert out == {"heldout": {"n": 6, "fixed": 3, "broken": 1, "p_value": 0.625},
                   "python": {"n": 6, "fixed": 0, "broken": 1, "p_value": 1.0}}  # a pool the parent lacks: none
    store.close()


def test_table_and_report_files(tmp_path: Path) -> None:
    r = result(("base", None, 0.2, 0.5), ("promoted", "hone-v1", 0.3, 0.5))
    t = table(r)
    assert "| cycle 1 | hone-v1 | promoted | 8/32 | 50.0% vs 40.0% (n=24) | 30.0% (12/40) | 50.0% (6/12) | 20 | 48 | 1 / 3 | 300 | 400 |" in t
    r["rows"][1]["counts"].update(trial_rollouts=228, trial_successes=8)  # explore_operator_trials ran
    assert "| 20 | 48 + 228 trials (8 solved) | 1 / 3 |" in table(r)
    r["rows"][1]["counts"]["retained"] = {"runs": 16, "tools": {"python": 16}, "excluded": {}}  # dpo_retain_weight
    assert "| 20 + 16 retained | 48 + 228 trials (8 solved) |" in table(r)
    r["rows"][1]["gate"]["candidates"] = [{"version": "hone-v1", "epoch": 2, "candidate_rate": 0.5},
                                          {"version": "hone-v1-e1", "epoch": 1, "candidate_rate": 0.45}]
    assert "| 50.0% vs 40.0% (n=24); epochs 2: 50.0%, 1: 45.0% |" in table(r)  # gate_candidates > 1
    r["rows"][1]["gate"]["guard"] = {"candidate_successes": 14, "current_successes": 13, "n_tasks": 42}
    assert "| 50.0% vs 40.0% (n=24); epochs 2: 50.0%, 1: 45.0%; guard 14/42 vs 13/42 |" in table(r)
    r["rows"][1]["gate"]["guard"]["groups"] = {"python": {"n": 45, "candidate_successes": 0, "current_successes": 1},
                                               "storage": {"n": 42, "candidate_successes": 14, "current_successes": 12}}
    assert "; guard python 0/45 vs 1/45, storage 14/42 vs 12/42 |" in table(r)
    text = write_report(r, tmp_path)
    assert (tmp_path / "loop.md").read_text() == text and "REACHED" not in text and "not reached" in text
    assert (tmp_path / "loop.png").is_file() == ("plot: skipped" not in text)  # skipped only without matplotlib
    assert "learner:" not in text  # results from before settings were recorded
    r["config"] = {"learner_settings": {"pairs_per_task": "1", "dpo_lr": "0.0001", "lora_rank": "16"}}
    line = next(x for x in write_report(r, tmp_path).splitlines() if x.startswith("learner:"))
    assert line.startswith("learner: pairs_per_task 1, dpo_lr 0.0001 (") and "lora_rank" not in line
    assert "host:" not in text  # results from before the host was recorded
    r["host"] = {"cpu": "AMD EPYC", "cores": 2, "native_bf16": True, "gpu": False, "serving_dtype": "bfloat16",
                 "commit": "5e6237a", "modified": True}
    lines = write_report(r, tmp_path).splitlines()
    assert lines[2] == ("host: AMD EPYC, 2 cores, native bf16, served in bfloat16; commit 5e6237a "
                        "(with uncommitted changes)")


def test_the_host_record_names_this_machine_and_commit(tmp_path: Path) -> None:
    import subprocess

    from runtime.hardware import cpu_has_native_bf16

    host = experiment.host_record("auto")
    assert host["serving_dtype"] == ("bfloat16" if cpu_has_native_bf16() or host["gpu"] else "float32")
    assert experiment.host_record("float16")["serving_dtype"] == "float16"  # a set dtype is what is served
    assert host["cores"] >= 1 and host["native_bf16"] == cpu_has_native_bf16()
    head = subprocess.run(["git", "-C", str(experiment.REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # a checkout; an installed copy has no commit to name
        assert host["commit"] == head.stdout.strip() and isinstance(host["modified"], bool)
    outside = experiment.host_record("auto", repo=tmp_path)  # not a git checkout
    assert outside["commit"] is None and outside["modified"] is None


def test_the_loop_measures_hones_own_learner_defaults(tmp_path: Path) -> None:
    defaults = Settings.load({"HONE_HOME": str(tmp_path)})
    got = learner_settings({**LOOP_DEFAULTS, "HONE_DPO_EPOCHS": "3"}, tmp_path / "h")
    for name in ("pairs_per_task", "max_pairs", "explore_budget", "dpo_beta", "dpo_lr", "dpo_nll_weight", "gate_margin"):
        assert got[name] == str(getattr(defaults, name)), name  # a result records what it ran, defaults included
    assert got["dpo_epochs"] == "3" and got["explore_concurrency"] == LOOP_DEFAULTS["HONE_EXPLORE_CONCURRENCY"]
    assert "admin_token" not in got and not (tmp_path / "h").exists()
    with pytest.raises(ExperimentError, match="takes no tokens"):
        learner_settings({"HONE_ADMIN_TOKEN": "a-long-secret"}, tmp_path / "h")  # only --set or HONE_CONFIG can get here


def test_a_bad_setting_fails_before_a_server_starts(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["bench", "loop", "--set", "HONE_DPO_LR=fast", "--out", str(tmp_path / "o")])
    assert out.exit_code == 1 and "bad setting" in out.output and "dpo_lr" in out.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # no half-made home left behind


def test_a_users_production_token_and_host_are_not_inherited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONE_ADMIN_TOKEN", "a-long-secret")
    monkeypatch.setenv("HONE_HOST", "0.0.0.0")
    monkeypatch.setenv("HONE_DPO_EPOCHS", "3")
    seen = {}

    @contextlib.contextmanager
    def fake_serve(home, env, timeout, say):  # stop before anything runs: only the env is under test
        seen.update(env)
        raise ExperimentError("stopped by the test")
        yield

    monkeypatch.setattr(experiment, "serve", fake_serve)
    with pytest.raises(ExperimentError, match="stopped by the test"):
        experiment.run_experiment(LoopConfig(out=tmp_path), say=lambda m: None)
    assert seen["HONE_DPO_EPOCHS"] == "3" and "HONE_ADMIN_TOKEN" not in seen and "HONE_HOST" not in seen
    guard = Path(seen["HONE_GATE_GUARD_FILE"])  # the default guards, joined in the run's home
    assert guard.parent.parent == tmp_path and guard.name == "guard-tasks.jsonl"
    assert [t.group for t in load_task_file(guard)] == ["storage"] * 42 + ["python"] * 45
    with pytest.raises(ExperimentError, match="stopped by the test"):
        experiment.run_experiment(LoopConfig(out=tmp_path, guards=()), say=lambda m: None)
    assert seen["HONE_GATE_GUARD_FILE"] == ""  # no guard: the learner's setting reads "" as unset


def test_pools_reserve_the_gate_and_refuse_overlap(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "question": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(10)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"id": "h1", "question": "2+2?", "answer": 4}) + "\n")
    cfg = LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=4)
    tr, gate, pools = load_pools(cfg)
    assert [t.id for t in gate] == ["t6", "t7", "t8", "t9"] and len(tr) == 6 and list(pools) == ["heldout"]
    with pytest.raises(ExperimentError, match="need more than gate_tasks"):
        load_pools(LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=10))
    with pytest.raises(ExperimentError, match="also occurs in the training pool"):
        load_pools(LoopConfig(train_tasks=train, heldout=train, suites=(), gate_tasks=4))
    multi = tmp_path / "multi.jsonl"
    multi.write_text(train.read_text() + json.dumps({"id": "m1", "turns": [{"content": "save 3"}, {
        "content": "what did I save?", "new_thread": True}], "answer": 3}) + "\n")
    with pytest.raises(ExperimentError, match="must be single-turn tasks; multi-turn: m1"):
        load_pools(LoopConfig(train_tasks=multi, heldout=held, suites=(), gate_tasks=4))
    # the guard is read before anything starts, and must not be one of the pools it would then decide on
    with pytest.raises(ExperimentError, match="guard shares task ids with the evaluated pools: \\['h1'\\]"):
        load_pools(LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=4, guards=(held,)))
    with pytest.raises(ExperimentError, match="the guard files share task ids: \\['t0'"):
        load_pools(LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=4, guards=(train, train)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(TaskFileError):
        load_pools(LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=4, guards=(broken,)))


def test_cli_refuses_bad_settings_and_missing_files(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["bench", "loop", "--set", "DPO_LR=1"])
    assert out.exit_code == 2 and "HONE_NAME=VALUE" in out.output
    out = CliRunner().invoke(main, ["bench", "loop", "--cycles", "2", "--promotions", "3"])
    assert out.exit_code == 2 and "at least as many --cycles" in out.output
    out = CliRunner().invoke(main, ["bench", "loop", "--heldout", str(tmp_path / "nope.jsonl")])
    assert out.exit_code == 2 and "does not exist" in out.output
    out = CliRunner().invoke(main, ["bench", "loop", "--guard", str(REPO / "tasks" / "storage.jsonl"), "--no-guard"])
    assert out.exit_code == 2 and "exclude each other" in out.output


def test_heldout_questions_seen_in_training_are_dropped_before_the_limit(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 1?", "answer": i + 1}) + "\n"
                             for i in range(10)))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"id": "h1", "question": "what is 3 + 1 ?", "answer": 4}) + "\n"
                    + json.dumps({"id": "h2", "question": "What is 30 + 1?", "answer": 31}) + "\n")
    _, _, pools = load_pools(LoopConfig(train_tasks=train, heldout=held, suites=(), gate_tasks=4, heldout_limit=1))
    assert [t.id for t in pools["heldout"][1]] == ["h2"]


def test_the_loop_stops_once_enough_candidates_were_promoted() -> None:
    rows = result(("base", None, 0.3, 0.0), ("promoted", "hone-v1", 0.4, 0.0), ("rejected", "hone-v2", 0.3, 0.0),
                  ("promoted", "hone-v3", 0.5, 0.0))["rows"]
    assert not done_promoting(rows, None)  # no limit: every --cycles cycle runs
    assert not done_promoting(rows[:3], 2)  # one promotion, one rejection: go on
    assert done_promoting(rows, 2)
    assert not done_promoting(rows, 3)


def test_loop_json_keeps_the_options_as_json_values() -> None:
    record = experiment.config_record(LoopConfig(cycles=4))
    assert json.loads(json.dumps(record)) == record  # no str() fallback needed, so nothing is repr'd
    assert record["cycles"] == 4 and record["promotions"] is None
    assert record["suites"] == [str(p) for p in LoopConfig().suites] and record["heldout"].endswith("asdiv-a-heldout-200.jsonl")


def test_storage_traffic_is_sent_turn_by_turn_and_counted_by_group() -> None:
    """Each task in a namespace of its own; a save then a recall in a new conversation: the recall
    runs thread-less with the expected answer (so the learner can re-run it from the stored state)."""
    import asyncio

    import httpx

    from learner.tasks import Task, Turn

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        text = body.get("input") or body["messages"][-1]["content"]
        answer = {"What is 6*7?": "42", "save 7807 as pin": "Saved.", "what is pin?": "It is 7807."}[text]
        status = "tool_error" if text == "save 7807 as pin" and body["namespace"].endswith(".2") else "ok"
        return httpx.Response(200, json={"answer": answer, "status": status, "adapter": None})

    recall = Task("file:s1", (), 7807, "numeric", turns=(Turn("save 7807 as pin"), Turn("what is pin?", True)),
                  group="storage")
    word = Task("file:w1", ({"role": "user", "content": "What is 6*7?"},), 42, "numeric", group="asdiv-a")
    out = asyncio.run(experiment.stream_traffic("http://loop", [word, recall, recall], 4, namespace="traffic.c1",
                                                transport=httpx.MockTransport(handler)))
    assert (out["solved"], out["n"]) == (2, 3)
    assert out["groups"] == {"asdiv-a": {"solved": 1, "n": 1}, "storage": {"solved": 1, "n": 2}}
    sent = sorted((b["namespace"], b.get("input") or "messages", "thread_id" in b, b["metadata"]["task_id"],
                   b["metadata"].get("expected_answer")) for b in bodies)
    assert sent == [("traffic.c1.0", "messages", False, "file:w1", 42),
                    ("traffic.c1.1", "save 7807 as pin", False, "file:s1#turn0", None),
                    ("traffic.c1.1", "what is pin?", False, "file:s1", 7807),
                    ("traffic.c1.2", "save 7807 as pin", False, "file:s1#turn0", None)]  # failed save: no recall


def test_side_traffic_must_not_be_measured_tasks(tmp_path: Path) -> None:
    cfg = LoopConfig()
    storage = experiment.load_side_traffic(cfg, cfg.storage_traffic, cfg.storage_per_cycle)
    assert len(storage) == 126 and all(t.turns and t.id.startswith("storage-train-") for t in storage)
    assert experiment.load_side_traffic(cfg, cfg.python_traffic, cfg.python_per_cycle) == []  # off by default
    python = experiment.load_side_traffic(cfg, cfg.python_traffic, 16)
    assert len(python) == 90 and all(t.group == "python" and t.id.startswith("python-train-") for t in python)
    measured = {t.messages[0]["content"] for p in (*cfg.suites, *cfg.guards) for t in load_task_file(p) if not t.turns}
    assert not measured & {t.messages[0]["content"] for t in python}  # disjoint by question, not only by id
    assert experiment.load_side_traffic(cfg, cfg.storage_traffic, 0) == []
    assert experiment.load_side_traffic(cfg, None, 24) == []
    shares = "shares tasks \\(by id or text\\) with the suites or the guard: "
    with pytest.raises(ExperimentError, match=shares + "\\['storage-000'"):
        experiment.load_side_traffic(cfg, REPO / "tasks" / "storage.jsonl", 24)
    with pytest.raises(ExperimentError, match=shares + "\\['python-guard-000'"):
        experiment.load_side_traffic(cfg, REPO / "bench" / "data" / "python-guard.jsonl", 16)
    renamed = tmp_path / "renamed.jsonl"  # a suite question under a new id
    row = json.loads((REPO / "tasks" / "python.jsonl").read_text().splitlines()[3])
    renamed.write_text(json.dumps({**row, "id": "mine-1"}) + "\n")
    with pytest.raises(ExperimentError, match=shares + "\\['mine-1'\\]"):
        experiment.load_side_traffic(cfg, renamed, 16)


def test_each_cycle_takes_the_next_slice_of_every_pool_wrapping_around() -> None:
    words, storage, python = list("abcdef"), list("ST"), []
    assert experiment.traffic_batch(0, [(words, 4), (storage, 1), (python, 16)]) == ["a", "b", "c", "d", "S"]
    assert experiment.traffic_batch(1, [(words, 4), (storage, 1), (python, 16)]) == ["e", "f", "a", "b", "T"]
    assert experiment.traffic_batch(2, [(words, 4), (storage, 0)]) == ["c", "d", "e", "f"]
