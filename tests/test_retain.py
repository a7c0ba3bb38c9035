"""learner.retain and the trainer's retain term: which logged runs are kept likely (a real SQLite
log), and what keeping them does to training (a tiny random Llama, CPU, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.dpo import rows_logps
from learner.pairs import build_pairs, collect
from learner.retain import pair_tools, retain_runs, tools_called
from learner.train import TrainConfig, retain_chunks, train_adapter
from learner.types import TokenSequence
from tests.test_dpo import SHARED, _token_pair, tiny_model  # noqa: F401 - tiny_model is a fixture
from tests.test_pairs import VAL, Log, calc, keys, store  # noqa: F401 - store is a fixture

PYTHON = [{"id": "c1", "type": "function", "function": {"name": "python", "arguments": '{"code": "print(6*7)"}'}}]
STORAGE = [{"id": "c1", "type": "function",
            "function": {"name": "storage", "arguments": '{"action": "get", "key": "k", "value": ""}'}}]


@pytest.fixture
def log(store, tmp_path: Path):
    lg = Log(store, tmp_path / "hone.db")
    yield lg
    lg.close()


def served_by(log: Log, tid: str, adapter: str | None) -> None:
    log.db.execute("UPDATE trajectories SET adapter = ? WHERE id = ?", [adapter, tid])


# ================================================================ which runs


def test_tools_called_reads_the_models_own_calls_only() -> None:
    traj = {"messages": [
        {"role": "assistant", "generated": False, "tool_calls": calc("12 + 5")},  # a worked example
        {"role": "assistant", "generated": True, "tool_calls": json.dumps(PYTHON)},
        {"role": "tool", "name": "python", "content": "42"},
        {"role": "assistant", "generated": True, "tool_calls": STORAGE},
        {"role": "assistant", "generated": True, "content": "42", "tool_calls": None},
    ]}
    assert tools_called(traj) == {"python", "storage"}
    assert tools_called({"messages": []}) == frozenset()


def test_retained_runs_use_only_tools_no_pair_uses_and_were_served_by_what_serves_now(log: Log) -> None:
    calc_task, py_new, py_old, py_base, py_explored, mixed, no_call = keys("train", 7)
    log.run(calc_task, True, call=calc("6 * 7"))
    log.run(calc_task, False, call=calc("6 + 7"))  # the one pair: calculator
    retained_new = log.run(py_new, False, call=PYTHON)
    log.run(py_old, False, call=PYTHON)  # an older run of the task ...
    retained_old = log.run(py_old, False, call=PYTHON)  # ... its latest one is kept, once
    base_run = log.run(py_base, True, call=PYTHON)  # served by the base, not by what serves now
    log.run(py_explored, False, call=PYTHON, source="exploration")  # sampled, not served
    log.run(mixed, False, call=PYTHON + calc("6 * 7"))  # also calls a tool the pairs train
    log.run(no_call, False, steps=False)  # answered without a tool: says nothing about one
    log.run(keys("validation", 1)[0], False, call=PYTHON)  # held out: never training data
    log.label()
    for tid in log.db.execute("SELECT id FROM trajectories").fetchall():
        served_by(log, tid[0], None if tid[0] == base_run else "hone-v1")

    groups = collect(log.db, val_fraction=VAL)
    pairs = build_pairs(log.store, groups, per_task=1, max_pairs=8).pairs
    assert len(pairs) == 1 and pair_tools(log.store, pairs) == {"calculator"}

    got = retain_runs(log.store, groups, pairs, serving="hone-v1", limit=10)
    assert [r.trajectory_id for r in got.runs] == [retained_old, retained_new]  # newest first
    assert got.tools == {"python": 2} and got.excluded == {}
    assert all(isinstance(r, TokenSequence) and r.n_generated for r in got.runs)
    assert [r.trajectory_id for r in retain_runs(log.store, groups, pairs, serving="hone-v1", limit=1).runs] == [
        retained_old]
    assert [r.trajectory_id for r in retain_runs(log.store, groups, pairs, serving=None, limit=10).runs] == [base_run]
    assert retain_runs(log.store, groups, pairs, serving="hone-v1", limit=0).runs == []
    # once a pair trains python, no python run is retained
    log.run(py_new, True, call=PYTHON)
    log.label()
    for tid in log.db.execute("SELECT id FROM trajectories WHERE adapter IS NULL").fetchall():
        served_by(log, tid[0], "hone-v1")
    groups = collect(log.db, val_fraction=VAL)
    pairs = build_pairs(log.store, groups, per_task=1, max_pairs=8).pairs
    assert pair_tools(log.store, pairs) == {"calculator", "python"}
    assert retain_runs(log.store, groups, pairs, serving="hone-v1", limit=10).runs == []


# ================================================================ what retaining does in training


def _retained(n: int) -> list[TokenSequence]:
    """Runs of another kind: the same system prompt, another question, their own generated tokens."""
    return [TokenSequence(tuple(SHARED + [70 + i, 71] + [80 + i, 81, 82, 83]), tuple([0] * 22 + [1] * 4))
            for i in range(n)]


def _nll(model_dir: Path, adapter: Path | None, runs: list[TokenSequence]) -> float:
    """Mean per-token NLL of the runs under the base model, or under base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        logps, n = rows_logps(model.eval(), [(r.ids, r.mask) for r in runs])
    return float((-logps / n).mean())


def test_retain_weight_keeps_the_retained_runs_likely_and_zero_changes_nothing(tmp_path: Path, tiny_model) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(str(model_dir))
    pairs = [_token_pair([31 + i, 32 + i], [40 + i, 41, 42], [50 + i, 51], f"t{i}") for i in range(6)]
    retain = _retained(3)

    def train(name: str, weight: float, runs=retain, forward_tokens: int = 10_000):
        cfg = TrainConfig(lr=2e-2, epochs=2, batch_size=2, lora_rank=4, lora_alpha=8, threads=2, seed=3,
                          bf16_autocast=False, device="cpu", retain_weight=weight, forward_tokens=forward_tokens)
        return train_adapter(model_dir, pairs, cfg, tmp_path / name, progress=False, probe_prompt=SHARED[:8],
                             retain=runs)

    plain, ignored, kept = train("plain", 0.0, runs=()), train("ignored", 0.0), train("kept", 1.0)
    weights = {name: load_file(str(r.path / "adapter_model.safetensors")) for name, r in
               (("plain", plain), ("ignored", ignored), ("kept", kept))}
    assert all(torch.equal(weights["plain"][k], weights["ignored"][k]) for k in weights["plain"])
    assert "retain_used" not in ignored.counts and "retain_nll_first" not in ignored.metrics
    assert kept.counts["retain_in"] == kept.counts["retain_used"] == 3
    assert kept.counts["retain_generated_tokens"] == 12

    start = _nll(model_dir, None, retain)
    drifted, anchored = _nll(model_dir, plain.path, retain), _nll(model_dir, kept.path, retain)
    assert anchored < start and anchored < drifted  # the pairs alone left them less likely than the retain term did
    # each step's share is recorded: 3 runs over 3 steps an epoch, one each; step 1 is the untrained policy
    history = json.loads((kept.path / "hone-adapter.json").read_text())["history"]
    assert all("retain_nll" in h for h in history) and len(history) == 6
    first_run = _nll(model_dir, None, retain[:1])
    assert kept.metrics["retain_nll_first"] == pytest.approx(first_run, abs=1e-4)
    assert kept.metrics["retain_nll_last_epoch"] < kept.metrics["retain_nll_first"]

    # the retained runs ride in the pairs' forward, or in their own: the same training
    separate = train("separate", 1.0, forward_tokens=1)
    w_sep = load_file(str(separate.path / "adapter_model.safetensors"))
    assert all(torch.allclose(weights["kept"][k], w_sep[k], atol=1e-5) for k in w_sep)
    h_sep = json.loads((separate.path / "hone-adapter.json").read_text())["history"]
    assert [h["retain_nll"] for h in h_sep] == pytest.approx([h["retain_nll"] for h in history], abs=1e-5)


def test_retained_runs_longer_than_max_length_are_left_out(tmp_path: Path, tiny_model) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(str(model_dir))
    pairs = [_token_pair([31 + i], [40 + i, 41], [50 + i], f"t{i}") for i in range(2)]
    long_run = TokenSequence(tuple(SHARED + list(range(30, 60))), tuple([0] * 20 + [1] * 30))
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=2, lora_rank=4, lora_alpha=8, threads=2, bf16_autocast=False,
                      device="cpu", retain_weight=1.0, max_length=30)
    result = train_adapter(model_dir, pairs, cfg, tmp_path / "v", progress=False, probe_prompt=SHARED[:8],
                           retain=[*_retained(1), long_run])
    assert (result.counts["retain_in"], result.counts["retain_used"]) == (2, 1)


def test_retain_chunks_fill_forwards_up_to_the_budget() -> None:
    rows = [(r.ids, r.mask) for r in _retained(3)]
    assert [len(c) for c in retain_chunks(rows, 10_000)] == [3]
    assert [len(c) for c in retain_chunks(rows, 1)] == [1, 1, 1]
    assert retain_chunks([], 100) == []
