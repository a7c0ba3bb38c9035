"""The swap check's decision rule (learner/swap.py verify) on recorded probes: vLLM's answer is
played by a stand-in returning given tokens and log-probs; the real-vLLM cases (trained, wrong
weights, under load) are in tests/test_learner_integration.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from learner.swap import verify

TOKENS = [10, 11, 12, 13, 14, 15]
TRAINED = [-0.5, -0.4, -0.9, -0.3, -0.2, -0.6]
BASE = [-0.8, -0.9, -1.2, -0.9, -0.6, -1.0]  # clearly different from the trained adapter
MARGINS = [2.0, 1.5, 0.2, 3.0, 1.0, 2.0]  # position 2 is a near-tie


class Engine:
    def __init__(self, tokens: list[int], logprobs: list[float]) -> None:
        self.answer = tokens, logprobs


def probe_dir(tmp_path: Path, base=BASE) -> Path:
    (tmp_path / "hone-adapter.json").write_text(json.dumps({"probe": {
        "prompt_ids": [1, 2, 3], "tokens": TOKENS, "logprobs": TRAINED, "margins": MARGINS, "base_logprobs": base}}))
    return tmp_path


def run(monkeypatch, tmp_path, tokens, logprobs, base=BASE) -> dict:
    async def served_greedy(engine, model, prompt_ids, n):
        return engine.answer

    monkeypatch.setattr("learner.swap.served_greedy", served_greedy)
    return asyncio.run(verify(Engine(tokens, logprobs), "v", probe_dir(tmp_path, base), tolerance=0.1))


def noisy(xs, d=0.02):
    return [x + (d if i % 2 else -d) for i, x in enumerate(xs)]


def test_the_trained_adapter_passes(monkeypatch, tmp_path) -> None:
    r = run(monkeypatch, tmp_path, TOKENS, noisy(TRAINED))
    assert r["ok"] and r["tokens_agree"] == 6 and r["distinguishable"]


def test_a_flip_at_a_near_tie_is_tolerated_but_not_at_a_confident_position(monkeypatch, tmp_path) -> None:
    flipped = TOKENS[:2] + [99] + TOKENS[3:]
    assert run(monkeypatch, tmp_path, flipped, noisy(TRAINED))["ok"]
    early = [99] + TOKENS[1:]
    r = run(monkeypatch, tmp_path, early, noisy(TRAINED))
    assert not r["ok"] and r["tokens_required"] == 2


@pytest.mark.parametrize("served", [BASE, [x - 0.5 for x in TRAINED]])
def test_the_base_model_or_wrong_weights_under_the_name_fail(monkeypatch, tmp_path, served) -> None:
    assert not run(monkeypatch, tmp_path, TOKENS, noisy(served))["ok"]


def test_an_adapter_indistinguishable_from_the_base_is_accepted_and_says_so(monkeypatch, tmp_path) -> None:
    near_base = [x + 0.01 for x in TRAINED]
    r = run(monkeypatch, tmp_path, TOKENS, noisy(TRAINED), base=near_base)
    assert r["ok"] and r["distinguishable"] is False
