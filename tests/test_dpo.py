"""learner.dpo, learner.train, learner.probe: the loss, the masking, the adapter files, and a short
real training run on the prepared SmolLM2 (CPU, about 30 s)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.dpo import (common_prefix_length, dpo_loss, padded_rows, pair_logps, rows_logps, sequence_logps,
                         shared_forward_tokens)
from learner.probe import check_adapter_files, probe_adapter, probe_prompt_ids
from learner.train import TrainConfig, TrainingError, forward_groups, train_adapter
from learner.types import Pair, TokenSequence
from tests.test_model import needs_gguf

# --- the loss ----------------------------------------------------------------------------------


def test_dpo_loss_matches_hand_computed_values() -> None:
    # logits = (pc - pr) - (rc - rr) = (-1 + 3) - (-2 + 2) = 2;  loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    losses, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                        torch.tensor([-2.0]), beta=0.1)
    assert losses.item() == pytest.approx(0.598138, abs=1e-6)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-7)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)


def test_dpo_loss_is_log2_when_policy_equals_reference_and_adds_weighted_nll() -> None:
    x = torch.tensor([-5.0, -7.0])
    losses, chosen, rejected = dpo_loss(x, x - 1, x, x - 1, beta=0.5)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen, torch.zeros(2)) and torch.equal(rejected, torch.zeros(2))
    with_nll, _, _ = dpo_loss(x, x - 1, x, x - 1, beta=0.5, policy_chosen_nll=torch.tensor([2.0, 4.0]), nll_weight=0.25)
    assert torch.allclose(with_nll, losses + torch.tensor([0.5, 1.0]))


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down() -> None:
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.2)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1)  # -beta * sigmoid(0) = -0.1
    assert pr.grad.item() == pytest.approx(0.1)


# --- log-probs at generated positions only -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _naive_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1)


# prompt (0) | generated (1) | tool output (0) | generated (1) | trailing tool output (0)
MASK = [0] * 6 + [1] * 4 + [0] * 5 + [1] * 3 + [0] * 4


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, len(MASK)), generator=g)
    mask = torch.tensor([MASK, MASK])
    return ids, mask, torch.ones_like(ids)


def test_sequence_logps_equals_the_naive_full_vocabulary_computation(tiny_model) -> None:
    ids, mask, attention = _batch()
    mask[1, 7:10] = 0  # rows may differ in what they generated
    ours, n = sequence_logps(tiny_model, ids, mask, attention)
    assert torch.allclose(ours, _naive_logps(tiny_model, ids, mask), atol=1e-5)
    assert n.tolist() == [7, 4]


def test_right_padding_does_not_change_a_rows_logps(tiny_model) -> None:
    ids, mask, attention = _batch()
    short, _ = sequence_logps(tiny_model, ids[:1, :18], mask[:1, :18], attention[:1, :18])
    padded_ids, padded_mask, padded_attention = ids.clone(), mask.clone(), attention.clone()
    padded_ids[0, 18:], padded_mask[0, 18:], padded_attention[0, 18:] = 0, 0, 0
    padded, _ = sequence_logps(tiny_model, padded_ids, padded_mask, padded_attention)
    assert padded[0].item() == pytest.approx(short[0].item(), abs=1e-5)


def _loss_and_grads(model, ids, mask, attention):
    model.zero_grad()
    logps, _ = sequence_logps(model, ids, mask, attention)
    loss, _, _ = dpo_loss(logps[:1], logps[1:], torch.tensor([-60.0]), torch.tensor([-61.0]), beta=0.1)
    loss.sum().backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_tool_output_tokens_change_neither_loss_nor_gradients(tiny_model) -> None:
    """Tool output the model did not write is context: swapping its tokens for others must not move the
    loss or any gradient. (Here: the trailing observation, which no generated token attends to.)"""
    ids, mask, attention = _batch()
    loss_a, grads_a = _loss_and_grads(tiny_model, ids, mask, attention)
    changed = ids.clone()
    changed[:, -4:] = (changed[:, -4:] + 11) % 97
    loss_b, grads_b = _loss_and_grads(tiny_model, changed, mask, attention)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # the same edit with the mask ignored (as a trainer without an assistant mask does) does move it
    ones = torch.ones_like(mask)
    ones[:, 0] = 0
    assert _loss_and_grads(tiny_model, ids, ones, attention)[0] != _loss_and_grads(tiny_model, changed, ones, attention)[0]


def test_no_gradient_reaches_the_positions_that_predict_tool_output(tiny_model) -> None:
    """A middle observation changes what later tokens are conditioned on (that is its job), but the
    model is never trained to predict it: the loss has no term at those positions."""
    ids, mask, attention = _batch()
    captured = {}

    def keep(_module, _inputs, output):
        output.last_hidden_state.retain_grad()
        captured["h"] = output.last_hidden_state

    handle = tiny_model.model.register_forward_hook(keep)
    try:
        _loss_and_grads(tiny_model, ids, mask, attention)
    finally:
        handle.remove()
    per_position = captured["h"].grad.abs().sum(-1)[0]  # (T,)
    predicts_generated = torch.tensor(MASK[1:] + [0]).bool()
    assert (per_position[~predicts_generated] == 0).all()
    assert (per_position[predicts_generated] > 0).all()


def _lora(tiny_model):
    from peft import LoraConfig, get_peft_model

    # non-zero B matrices, so the adapter changes every output and its gradients are not trivially zero
    return get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))


def _pair_values_and_grads(model, fn):
    model.zero_grad()
    logps, n = fn()
    (2 * logps[0] - logps[1]).backward()
    return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


SHARED = list(range(10, 30))  # 20 tokens both attempts start with (prompt, question, ...)


@pytest.mark.parametrize("chosen, chosen_mask, rejected, rejected_mask", [
    # the attempts part after the prompt; one of them longer (right padding)
    (SHARED + [40, 41, 42, 43], [0] * 20 + [1] * 4, SHARED + [50, 51, 52, 53, 54, 55, 56], [0] * 20 + [1] * 7),
    # they share generated tokens (the same start of a tool call), then a tool output the mask leaves out
    (SHARED + [40, 41, 42, 60, 61, 43], [0] * 16 + [1] * 7 + [0] * 2 + [1],
     SHARED + [40, 41, 44, 62, 45], [0] * 16 + [1] * 7 + [0] + [1]),
    # one attempt is the other plus more turns: each row keeps one token of its own to run
    (SHARED + [40, 41], [0] * 20 + [1] * 2, SHARED + [40, 41, 70, 71], [0] * 20 + [1] * 4),
    # nothing shared but the first token
    ([1, 5, 6, 7, 8], [0, 0, 1, 1, 1], [1, 9, 9, 9], [0, 0, 1, 1]),
])
def test_pair_logps_equals_running_both_rows_whole(tiny_model, chosen, chosen_mask, rejected, rejected_mask) -> None:
    """Running the shared prefix once is an optimisation, not an approximation: same log-probs, same
    token counts and the same LoRA gradients as the two full rows (fp32)."""
    model = _lora(tiny_model)
    try:
        shared = _pair_values_and_grads(model, lambda: pair_logps(model, chosen, chosen_mask, rejected, rejected_mask))
        whole = _pair_values_and_grads(model, lambda: sequence_logps(
            model, *padded_rows((chosen, chosen_mask), (rejected, rejected_mask))))
    finally:
        model.unload()
    assert torch.allclose(shared[0], whole[0], atol=1e-5) and torch.equal(shared[1], whole[1])
    assert shared[2].keys() == whole[2].keys() and len(shared[2]) > 0
    assert all(torch.allclose(shared[2][k], whole[2][k], atol=1e-5) for k in whole[2])


def _embedded_shapes(model, fn) -> list[tuple[int, int]]:
    """The (rows, positions) of every batch of tokens the decoder embedded while fn ran."""
    seen: list[tuple[int, int]] = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_pair_logps_runs_the_shared_prefix_once(tiny_model) -> None:
    seen = _embedded_shapes(tiny_model, lambda: pair_logps(
        tiny_model, SHARED + [40, 41], [0] * 20 + [1] * 2, SHARED + [50, 51, 52], [0] * 20 + [1] * 3))
    assert seen == [(1, 20), (1, 5)]  # the prompt once, then both suffixes packed: 25 positions, not 2 x 23


# Three tasks after one prompt (SHARED): each a question, then a chosen and a rejected attempt.
BATCH_ROWS = [
    (SHARED + [31, 32, 40, 41, 42], [0] * 22 + [1] * 3), (SHARED + [31, 32, 50, 51], [0] * 22 + [1] * 2),
    (SHARED + [33, 34, 35, 40, 60, 61, 62], [0] * 23 + [1] * 4), (SHARED + [33, 34, 35, 44], [0] * 23 + [1]),
    (SHARED + [36, 40, 41, 70, 43], [0] * 21 + [1] * 2 + [0] + [1]), (SHARED + [36, 45], [0] * 21 + [1]),
]


def test_rows_logps_of_several_pairs_equals_running_every_row_whole(tiny_model) -> None:
    """A batch of pairs in one forward (one prompt, six suffixes): the same log-probs, token counts and
    LoRA gradients as the six full rows (fp32)."""
    model = _lora(tiny_model)

    def values_and_grads(fn):
        model.zero_grad()
        logps, n = fn()
        (logps * torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.25])).sum().backward()
        return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    try:
        shared = values_and_grads(lambda: rows_logps(model, BATCH_ROWS))
        whole = values_and_grads(lambda: sequence_logps(model, *padded_rows(*BATCH_ROWS)))
        pairwise = torch.cat([pair_logps(model, *BATCH_ROWS[i], *BATCH_ROWS[i + 1])[0] for i in (0, 2, 4)]).detach()
    finally:
        model.unload()
    assert torch.allclose(shared[0], whole[0], atol=1e-5) and torch.equal(shared[1], whole[1])
    assert torch.allclose(shared[0], pairwise, atol=1e-5)
    assert shared[2].keys() == whole[2].keys() and len(shared[2]) > 0
    assert all(torch.allclose(shared[2][k], whole[2][k], atol=1e-5) for k in whole[2])


@pytest.mark.parametrize("attention, checkpointing, rows", [
    ("eager", False, BATCH_ROWS),  # eager attention adds a float mask to the scores
    ("sdpa", True, BATCH_ROWS),  # gradient checkpointing keeps no cache: the prompt goes into the trie
    ("sdpa", False, [([1, 5, 6, 7], [0, 1, 1, 1]), ([2, 5, 6], [0, 0, 1]), ([1, 5, 9], [0, 1, 1])]),  # no common prefix
])
def test_rows_logps_is_exact_on_every_path(tiny_model, attention: str, checkpointing: bool, rows) -> None:
    model = _lora(tiny_model)
    weights = torch.linspace(-2.0, 2.0, len(rows))

    def values_and_grads(fn):
        model.zero_grad()
        logps, n = fn()
        (logps * weights).sum().backward()
        return logps.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    whole = values_and_grads(lambda: sequence_logps(model, *padded_rows(*rows)))
    try:
        tiny_model.set_attn_implementation(attention)
        if checkpointing:
            tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        packed = values_and_grads(lambda: rows_logps(model, rows))
    finally:
        tiny_model.gradient_checkpointing_disable()
        tiny_model.set_attn_implementation("sdpa")
        model.unload()
    assert torch.allclose(packed[0], whole[0], atol=1e-5) and torch.equal(packed[1], whole[1])
    assert packed[2].keys() == whole[2].keys() and len(packed[2]) > 0
    assert all(torch.allclose(packed[2][k], whole[2][k], atol=1e-5) for k in whole[2])


def test_rows_logps_runs_the_common_prefix_once_for_the_whole_batch(tiny_model) -> None:
    seen = _embedded_shapes(tiny_model, lambda: rows_logps(tiny_model, BATCH_ROWS))
    # the prompt once, then the six suffixes as one trie: each question once, 21 positions (padded
    # rows would run 6 x 7 = 42)
    assert seen == [(1, 20), (1, 21)]
    assert common_prefix_length([r for r, _ in BATCH_ROWS]) == 20
    assert shared_forward_tokens([r for r, _ in BATCH_ROWS]) == 20 + 21
    assert shared_forward_tokens([[1, 2, 3], [1, 2, 3]]) == 2 + 1  # identical rows: their last token runs once


def _token_pair(question: list[int], chosen: list[int], rejected: list[int], group: str) -> Pair:
    def seq(answer: list[int]) -> TokenSequence:
        return TokenSequence(tuple(SHARED + question + answer), tuple([0] * (20 + len(question)) + [1] * len(answer)))

    return Pair(seq(chosen), seq(rejected), group)


def test_forward_groups_fill_each_forward_up_to_the_token_budget() -> None:
    pairs = [_token_pair([31 + i], [40, 41], [50], f"t{i}") for i in range(5)]
    cost = shared_forward_tokens([s.ids for p in pairs[:2] for s in (p.chosen, p.rejected)])  # 20 + 4 * 3
    assert forward_groups(pairs, range(5), max_tokens=10_000) == [[0, 1, 2, 3, 4]]
    assert forward_groups(pairs, [4, 0, 2, 1, 3], max_tokens=cost) == [[4, 0], [2, 1], [3]]
    assert forward_groups(pairs, range(3), max_tokens=1) == [[0], [1], [2]]  # too big alone: still one forward each


def test_pairs_with_different_prompts_keep_a_forward_each() -> None:
    """Joining pairs that share no prompt saves no position, and one forward's attention would span both."""
    def pair(prompt: list[int], group: str) -> Pair:
        def seq(answer: list[int]) -> TokenSequence:
            return TokenSequence(tuple(prompt + answer), tuple([0] * len(prompt) + [1] * len(answer)))
        return Pair(seq([90, 91]), seq([92]), group)

    own = [pair(list(range(100 * i, 100 * i + 30)), f"t{i}") for i in range(1, 4)]
    assert forward_groups(own, range(3), max_tokens=10_000) == [[0], [1], [2]]
    # a chat header in common (bench/dpo.py's pairs) is not a shared prompt: 3 of 33 positions
    headed = [pair([7, 8, 9] + list(range(100 * i, 100 * i + 30)), f"t{i}") for i in range(1, 4)]
    assert forward_groups(headed, range(3), max_tokens=10_000) == [[0], [1], [2]]
    # a prompt shared for most of its length is
    shared = [pair(list(range(24)) + list(range(100 * i, 100 * i + 6)), f"t{i}") for i in range(1, 4)]
    assert forward_groups(shared, range(3), max_tokens=10_000) == [[0, 1, 2]]
    mixed = [own[0], _token_pair([31], [40, 41], [50], "s1"), _token_pair([32], [40], [50, 51], "s2")]
    assert forward_groups(mixed, range(3), max_tokens=10_000) == [[0], [1, 2]]


def test_how_a_batch_is_split_into_forwards_does_not_change_what_is_trained(tmp_path: Path, tiny_model) -> None:
    """One forward per step, or one per pair: the same steps, losses and adapter (fp32). The
    reference log-probs are batched differently from the policy's, and still agree."""
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(str(model_dir))
    pairs = [_token_pair([31 + i, 32 + i], [40 + i, 41, 42], [50 + i, 51], f"t{i}") for i in range(6)]
    results = {}
    for name, budget in (("batched", 10_000), ("per-pair", 1)):
        cfg = TrainConfig(lr=5e-3, epochs=2, batch_size=3, lora_rank=4, lora_alpha=8, threads=2, seed=3,
                          bf16_autocast=False, device="cpu", forward_tokens=budget, nll_weight=0.5)
        result = train_adapter(model_dir, pairs, cfg, tmp_path / name, progress=False, probe_prompt=SHARED[:8])
        meta = json.loads((result.path / "hone-adapter.json").read_text())
        results[name] = (meta["history"], load_file(str(result.path / "adapter_model.safetensors")))
    (h_batched, w_batched), (h_pairs, w_pairs) = results["batched"], results["per-pair"]
    assert len(h_batched) == len(h_pairs) == 4
    # step 1: the fresh LoRA is a no-op, so the policy's log-probs are the reference's, batched otherwise
    assert h_batched[0]["margin"] == pytest.approx(0.0, abs=1e-5) and h_batched[0]["chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    for a, b in zip(h_batched, h_pairs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["margin"] == pytest.approx(b["margin"], abs=1e-5)
    assert w_batched.keys() == w_pairs.keys()
    assert all(torch.allclose(w_batched[k], w_pairs[k], atol=1e-5) for k in w_batched)
    assert any(w_batched[k].abs().max() > 1e-3 for k in w_batched if "lora_B" in k)  # it did train


def test_an_epoch_snapshot_is_the_adapter_that_many_epochs_train(tmp_path: Path, tiny_model) -> None:
    """The learner gates earlier epochs next to the last: the epoch-1 snapshot of a 2-epoch run must
    be what a 1-epoch run trains (same seed and order), saved with its own probe and history."""
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(str(model_dir))
    pairs = [_token_pair([31 + i, 32 + i], [40 + i, 41, 42], [50 + i, 51], f"t{i}") for i in range(6)]

    def cfg(epochs: int) -> TrainConfig:
        return TrainConfig(lr=5e-3, epochs=epochs, batch_size=3, lora_rank=4, lora_alpha=8, threads=2, seed=3,
                           bf16_autocast=False, device="cpu")

    two = train_adapter(model_dir, pairs, cfg(2), tmp_path / "v1", progress=False, probe_prompt=SHARED[:8],
                        snapshots={1: tmp_path / "v1-e1"})
    one = train_adapter(model_dir, pairs, cfg(1), tmp_path / "one", progress=False, probe_prompt=SHARED[:8])
    [snap] = two.snapshots
    assert (snap.path, snap.epoch, two.epoch) == (tmp_path / "v1-e1", 1, 2)
    assert (snap.metrics["epochs"], snap.metrics["steps"], two.metrics["steps"]) == (1, 2, 4)
    w_snap, w_one = (load_file(str(d / "adapter_model.safetensors")) for d in (snap.path, one.path))
    assert all(torch.equal(w_snap[k], w_one[k]) for k in w_one)
    meta = json.loads((snap.path / "hone-adapter.json").read_text())
    assert meta["epoch"] == 1 and len(meta["history"]) == 2 and meta["probe"]["tokens"]
    assert meta["probe"] == json.loads((one.path / "hone-adapter.json").read_text())["probe"]
    w_two = load_file(str(two.path / "adapter_model.safetensors"))
    assert any(not torch.equal(w_two[k], w_one[k]) for k in w_one)  # the second epoch trained on
    assert not list(tmp_path.glob(".*.tmp-*"))

    with pytest.raises(TrainingError, match="earlier than the last"):
        train_adapter(model_dir, pairs, cfg(2), tmp_path / "v2", progress=False, snapshots={2: tmp_path / "v2-e2"})
    with pytest.raises(TrainingError, match="already exists"):
        train_adapter(model_dir, pairs, cfg(2), tmp_path / "v3", progress=False, snapshots={1: snap.path})


# --- adapter files -----------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path: Path, tiny_model) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = tmp_path / "adapter"
    peft_model.save_pretrained(str(out))
    peft_model.unload()  # leave the shared tiny model as it was
    return out


def _edit_weights(d: Path, fn) -> None:
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_a_real_adapter_passes_the_file_check(adapter_dir: Path) -> None:
    assert check_adapter_files(adapter_dir) is None
    assert "exceeds" in check_adapter_files(adapter_dir, max_rank=2)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "adapter_config.json").unlink(), "missing adapter_config.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "unreadable"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(
            (d / "adapter_model.safetensors").read_bytes()[:300]), "corrupt"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "corrupt"),
        (lambda d: _edit_weights(d, lambda t: next(v for k, v in t.items() if "lora_B" in k).fill_(float("nan"))),
         "NaN"),
        (lambda d: _edit_weights(d, lambda t: next(v for k, v in t.items() if "lora_A" in k).mul_(1e6)), "magnitude"),
        (lambda d: (d / "adapter_config.json").write_text(
            json.dumps({**json.loads((d / "adapter_config.json").read_text()), "r": 8})), "rank"),
        (lambda d: save_file({"x": torch.zeros(2)}, str(d / "adapter_model.safetensors")), "no LoRA weights"),
    ],
)
def test_broken_adapters_are_refused_with_a_reason(adapter_dir: Path, damage, reason: str) -> None:
    damage(adapter_dir)
    got = check_adapter_files(adapter_dir)
    assert got is not None and reason in got


# --- real training on SmolLM2 ------------------------------------------------------------------


def _real_pairs(model_dir: Path) -> list[Pair]:
    """Two tasks, each with a correct (chosen) and a wrong (rejected) tool call, rendered as served."""
    from runtime.rendering import split_last_turn
    from tools.specs import TOOL_SPECS

    def seq(question: str, expression: str) -> TokenSequence:
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "calculator",
                                                          "arguments": {"expression": expression}}}]}]
        prompt, completion = split_last_turn(messages, TOOL_SPECS[:1], model_dir)
        return TokenSequence(tuple(prompt + completion), tuple([0] * len(prompt) + [1] * len(completion)))

    return [Pair(seq("Tom has 3 apples and buys 4 more. How many?", "3 + 4"),
                 seq("Tom has 3 apples and buys 4 more. How many?", "3 - 4"), "apples"),
            Pair(seq("A box holds 6 rows of 5 eggs. How many eggs?", "6 * 5"),
                 seq("A box holds 6 rows of 5 eggs. How many eggs?", "6 + 5"), "eggs")]


@needs_gguf
def test_training_produces_a_loadable_adapter_that_prefers_chosen(tmp_path: Path) -> None:
    from tests.integration_support import prepared_model

    model_dir = prepared_model()
    pairs = _real_pairs(model_dir)
    # fp32 on every host: under bf16 autocast (on where the CPU has AVX512-BF16) the step-1 policy and
    # reference forwards round differently, and the loss is ln 2 only to ~1e-2.
    cfg = TrainConfig(lr=2e-3, epochs=3, batch_size=2, lora_rank=4, lora_alpha=8, threads=2, seed=1,
                      bf16_autocast=False)
    steps = []
    result = train_adapter(model_dir, pairs, cfg, tmp_path / "hone-v1", progress=False, on_step=steps.append)

    assert result.path == tmp_path / "hone-v1" and check_adapter_files(result.path, max_rank=16) is None
    assert not list(tmp_path.glob(".hone-v1.tmp-*")), "the temporary directory was left behind"
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[-1]["of"] == 3
    assert result.metrics["loss_first"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert result.metrics["loss_last_epoch"] < result.metrics["loss_first"]
    assert result.metrics["accuracy_last_epoch"] == 1.0
    assert result.counts == {"pairs_in": 2, "pairs_used": 2, "skipped_too_long": 0,
                             "generated_tokens": sum(p.chosen.n_generated + p.rejected.n_generated for p in pairs),
                             "total_tokens": sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)}

    meta = json.loads((result.path / "hone-adapter.json").read_text())
    assert meta["parent"] is None and meta["config"]["lora_rank"] == 4 and meta["reference"].startswith("base")
    probe = meta["probe"]
    assert probe["prompt_ids"] == probe_prompt_ids(model_dir)
    assert 0 < len(probe["tokens"]) == len(probe["logprobs"]) == len(probe["base_logprobs"]) == len(probe["margins"]) <= 24
    assert all(m >= 0 for m in probe["margins"]) and all(lp <= 0 for lp in probe["logprobs"])
    # what was saved is what was trained: reloading it from disk reproduces the recorded probe
    reloaded = probe_adapter(model_dir, result.path, probe["prompt_ids"], probe["tokens"])
    assert max(abs(a - b) for a, b in zip(reloaded, probe["logprobs"])) < 1e-4
    base = probe_adapter(model_dir, None, probe["prompt_ids"], probe["tokens"])
    assert max(abs(a - b) for a, b in zip(base, probe["base_logprobs"])) < 1e-4
    assert max(abs(a - b) for a, b in zip(probe["base_logprobs"], probe["logprobs"])) > 1e-3

    # a child warm-starts from the parent; the reference stays the base, so it starts off log 2
    child = train_adapter(model_dir, pairs[:1], TrainConfig(lr=1e-4, epochs=1, batch_size=1, threads=2), tmp_path / "hone-v2",
                          parent_adapter=result.path, progress=False)
    child_meta = json.loads((child.path / "hone-adapter.json").read_text())
    assert child_meta["parent"] == str(result.path)
    assert child.metrics["loss_first"] < math.log(2) - 0.01
    assert json.loads((child.path / "adapter_config.json").read_text())["r"] == 4  # the parent's shape
    # with the parent as reference the child's policy equals its reference at step 1: the loss is ln 2 again
    anchored = train_adapter(model_dir, pairs[:1], TrainConfig(lr=1e-4, epochs=1, batch_size=1, threads=2,
                                                               bf16_autocast=False, reference="parent"),
                             tmp_path / "hone-v2p", parent_adapter=result.path, progress=False)
    assert anchored.metrics["loss_first"] == pytest.approx(math.log(2), abs=1e-3)
    assert json.loads((anchored.path / "hone-adapter.json").read_text())["reference"].startswith("parent")
    with pytest.raises(TrainingError, match="reference must be base or parent"):
        train_adapter(model_dir, pairs, TrainConfig(reference="self"), tmp_path / "hone-v4", progress=False)

    with pytest.raises(TrainingError, match="already exists"):
        train_adapter(model_dir, pairs, cfg, result.path, progress=False)
    with pytest.raises(TrainingError, match="max_length"):
        train_adapter(model_dir, pairs, TrainConfig(max_length=10), tmp_path / "hone-v3", progress=False)


def test_the_trainer_picks_its_device_and_refuses_a_missing_gpu_with_a_reason(monkeypatch) -> None:
    from learner.train import TrainingError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    with pytest.raises(TrainingError, match="dpo_device is cuda but torch sees no GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"  # cpu vs cuda results: bench/train_device.py (docs/benchmarks.md)
