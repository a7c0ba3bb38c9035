"""The grouped CPU LoRA ops against vLLM's own torch ops, on the shapes SmolLM2's layers use."""

from __future__ import annotations

import pytest
import torch

from runtime import vllm_lora_cpu as grouped

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

HIDDEN, RANK, SLOTS = 576, 16, 3


def stacked(out_dim: int, in_dim: int, *, empty_last: bool = True) -> torch.Tensor:
    w = torch.randn(SLOTS, 1, out_dim, in_dim, dtype=torch.bfloat16)
    if empty_last:  # an unused slot is zeros in vLLM, which is what the stock op reads for index -1
        w[-1] = 0
    return w


@pytest.mark.parametrize("slots", [[0] * 7, [1] * 5, [0, 1, 0, 0, 1, 1], [-1, 0, -1, 1, 0], [-1] * 4, [1]])
def test_shrink_and_expand_slice_match_vllm(slots: list[int]) -> None:
    torch.manual_seed(len(slots))
    idx = torch.tensor(slots)
    x = torch.randn(len(slots), HIDDEN, dtype=torch.bfloat16)
    a, b = stacked(RANK, HIDDEN), stacked(1536, RANK)
    groups = grouped.token_groups(idx)

    want = torch.zeros(len(slots), RANK)
    lora_ops.bgmv_shrink(x, a, want, idx, 0.5)
    got = torch.full((len(slots), RANK), 7.0)  # garbage: every row must be written
    grouped.shrink(x, a, got, groups, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    base = torch.randn(len(slots), 2 * 1536, dtype=torch.bfloat16)
    want_y, got_y = base.clone(), base.clone()
    lora_ops.bgmv_expand_slice(want, b, want_y, idx, 1536, 1536, True)
    grouped.expand(want, b, got_y, groups, 1536, 1536, True)
    torch.testing.assert_close(got_y, want_y, rtol=1e-2, atol=1e-2)  # bf16 output, summation order
    assert torch.equal(got_y[:, :1536], base[:, :1536])  # outside the slice nothing changes


def test_sgmv_prefill_form_matches_vllm() -> None:
    torch.manual_seed(0)
    seq_lens, seq_slots = torch.tensor([5, 3, 4]), torch.tensor([1, -1, 0])
    idx = torch.repeat_interleave(seq_slots, seq_lens)
    x = torch.randn(int(seq_lens.sum()), HIDDEN, dtype=torch.bfloat16)
    a, b = stacked(RANK, HIDDEN), stacked(HIDDEN, RANK)
    starts = torch.cumsum(seq_lens, 0) - seq_lens

    want = torch.zeros(len(idx), RANK)
    lora_ops.sgmv_shrink(x, a, want, starts, seq_lens, seq_slots, 3, 5, len(idx), 2.0)
    got = torch.zeros(len(idx), RANK)
    grouped.shrink(x, a, got, grouped.token_groups(idx), 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    y0 = torch.randn(len(idx), HIDDEN, dtype=torch.bfloat16)
    want_y, got_y = y0.clone(), y0.clone()
    lora_ops.sgmv_expand(want, b, want_y, starts, seq_lens, seq_slots, 3, 5, len(idx), True)
    grouped.expand(want, b, got_y, grouped.token_groups(idx), 0, HIDDEN, True)
    torch.testing.assert_close(got_y, want_y, rtol=1e-2, atol=1e-2)


def test_base_tokens_get_no_lora_even_when_every_slot_is_in_use() -> None:
    # vLLM's metadata: index -1 means "no LoRA". The stock CPU op reads slot -1 (the last one)
    # instead, which only works while that slot is empty.
    torch.manual_seed(1)
    idx = torch.tensor([-1, 0, -1])
    x = torch.randn(3, HIDDEN, dtype=torch.bfloat16)
    a = stacked(RANK, HIDDEN, empty_last=False)
    out = torch.zeros(3, RANK)
    grouped.shrink(x, a, out, grouped.token_groups(idx), 1.0)
    assert torch.count_nonzero(out[[0, 2]]) == 0
    assert torch.count_nonzero(out[1]) == RANK


def test_token_groups() -> None:
    assert grouped.token_groups(torch.tensor([], dtype=torch.long)) == []
    assert grouped.token_groups(torch.tensor([-1, -1])) == []
    assert grouped.token_groups(torch.tensor([2, 2, 2])) == [(2, None)]
    mixed = grouped.token_groups(torch.tensor([1, -1, 0, 1]))
    assert [(slot, rows.tolist()) for slot, rows in mixed] == [(0, [2]), (1, [0, 3])]


def test_register_is_inert_without_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    monkeypatch.delenv(grouped.ENV_FLAG, raising=False)
    before = current_platform.get_punica_wrapper()
    grouped.register()
    assert current_platform.get_punica_wrapper() == before


def test_wrapper_class_resolves_by_qualname() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cls = resolve_obj_by_qualname(grouped.QUALNAME)
    assert issubclass(cls, PunicaWrapperCPU) and cls.__name__ == "GroupedPunicaWrapperCPU"


def test_the_engine_turns_the_plugin_on_unless_configured_off(tmp_path) -> None:
    from runtime.config import Settings
    from runtime.engine import vllm_env

    on = Settings.load({"HONE_HOME": str(tmp_path)})
    off = Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_GROUPED_LORA": "false"})
    assert vllm_env(on)[grouped.ENV_FLAG] == "1" and vllm_env(off)[grouped.ENV_FLAG] == "0"


def test_the_plugin_is_registered_with_vllm() -> None:
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert found.get("hone_grouped_lora") == "runtime.vllm_lora_cpu:register"
