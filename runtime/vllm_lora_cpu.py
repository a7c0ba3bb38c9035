"""Grouped LoRA matmuls for vLLM on CPU, loaded into the managed vLLM as a general plugin.

vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops) gather one copy of the adapter's weight matrix per
*token* and then do a batched matrix-vector product: for a 2,048-token prefill that is 2,048 copies
of a 16 x 1,536 matrix per projection, per layer. On a 2-core machine that made every request
served under an adapter ~2x slower than the base model (and ~25x slower in the LoRA ops themselves,
bench/lora_serving.py). Here the tokens are grouped by adapter once per batch, when vLLM updates the
LoRA metadata, and each group does one matrix product: the same arithmetic, on the same dtypes.

Tokens with adapter index -1 (requests for the base model) get no LoRA term, as vLLM's metadata
documents; the stock CPU op instead indexed slot -1, the last adapter slot, which is all zeros
unless every slot is in use.

Loaded through the `vllm.general_plugins` entry point (pyproject.toml) in every vLLM process, and
active only where hone's engine asked for it (HONE_VLLM_GROUPED_LORA=1, set by runtime/engine.py),
so any other vLLM in the same environment runs unchanged.
"""

from __future__ import annotations

import os

import torch

ENV_FLAG = "HONE_VLLM_GROUPED_LORA"
QUALNAME = "runtime.vllm_lora_cpu.GroupedPunicaWrapperCPU"

# (adapter slot, rows): rows is None when every token uses that slot, else a LongTensor of rows.
Groups = list[tuple[int, "torch.Tensor | None"]]


def register() -> None:
    """vLLM plugin entry point: route the CPU platform's LoRA wrapper to the grouped one."""
    if os.environ.get(ENV_FLAG, "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: QUALNAME)


def token_groups(indices: torch.Tensor) -> Groups:
    """Group token rows by adapter slot; rows with slot < 0 (no adapter) are left out."""
    slots = indices.tolist()
    if not slots:
        return []
    first = slots[0]
    if all(s == first for s in slots):
        return [] if first < 0 else [(first, None)]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in sorted(set(slots)) if s >= 0]


def shrink(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, groups: Groups, scale: float) -> None:
    """out[:, :rank] = scale * x @ A[slot].T per group; rows of no group get 0."""
    rank = weights.shape[-2]
    if not (len(groups) == 1 and groups[0][1] is None):
        out[:, :rank] = 0
    for slot, rows in groups:
        a = weights[slot].reshape(rank, -1).to(out.dtype)
        if rows is None:
            out[:, :rank] = scale * (x.to(out.dtype) @ a.T)
        else:
            out[rows, :rank] = scale * (x[rows].to(out.dtype) @ a.T)


def expand(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, groups: Groups,
           offset: int, size: int, add: bool) -> None:
    """out[:, offset:offset+size] (+)= x @ B[slot].T per group; rows of no group add 0."""
    if not add:
        out[:, offset:offset + size] = 0
    for slot, rows in groups:
        b = weights[slot].reshape(weights.shape[-2], -1).to(out.dtype)[:size]
        if rows is None:
            out[:, offset:offset + size] += x.to(out.dtype) @ b.T
        else:
            out[rows, offset:offset + size] += x[rows].to(out.dtype) @ b.T


def _load_wrapper_class():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
        """PunicaWrapperCPU with one matmul per adapter in the batch instead of one per token."""

        def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
            self._groups = token_groups(self.token_lora_indices)

        def _shrink_prefill(self, y, x, w_t_all, scale):
            if not self.no_lora:
                shrink(x, w_t_all, y, self._groups, scale)

        def _shrink_decode(self, y, x, w_t_all, scale):
            shrink(x, w_t_all, y, self._groups, scale)

        def _expand_prefill(self, y, x, w_t_all, add_inputs):
            if not self.no_lora:
                self._expand_whole(y, x, w_t_all, add_inputs)

        def _expand_decode(self, y, x, w_t_all, add_inputs):
            self._expand_whole(y, x, w_t_all, add_inputs)

        def _expand_whole(self, y, x, w_t_all, add_inputs):
            if x.shape[0] != y.shape[0]:  # the stock op's broadcast case: keep its semantics
                return super()._expand_decode(y, x, w_t_all, add_inputs)
            expand(x, w_t_all, y, self._groups, 0, min(w_t_all.shape[-2], y.shape[1]), add_inputs)

        def _expand_slice_prefill(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            if not self.no_lora:
                expand(x, w_t_all, y, self._groups, y_offset, y_slice_size, add_inputs)

        def _expand_slice_decode(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs):
            expand(x, w_t_all, y, self._groups, y_offset, y_slice_size, add_inputs)

    GroupedPunicaWrapperCPU.__module__ = __name__
    GroupedPunicaWrapperCPU.__qualname__ = "GroupedPunicaWrapperCPU"
    return GroupedPunicaWrapperCPU


def __getattr__(name: str):
    # vLLM resolves the wrapper by qualname inside its engine process; importing vLLM only then
    # keeps this module importable (and testable) without loading the engine at hone's import time.
    if name == "GroupedPunicaWrapperCPU":
        cls = _load_wrapper_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
