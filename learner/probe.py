"""Fingerprints of an adapter: a fixed probe text's log-probs, and a sanity check of its files.

At training time we record, for a short chat-formatted probe, the log-prob of every token under the
trained weights and under the base model. At swap time vLLM scores the same ids under the adapter's
name (learner/swap.py); if its numbers match the trained ones and not the base's, vLLM serves what
we trained, not a stale or wrong adapter.

`check_adapter_files` runs before vLLM ever sees a candidate: a missing, truncated, NaN-filled or
wildly scaled adapter is rejected with a reason instead of being served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE_MAX_TOKENS = 96
MAX_ABS_WEIGHT = 1e3  # LoRA factors are O(1e-2); a factor this large is not a trained adapter

DEFAULT_PROBE = [
    {"role": "user", "content": "A shelf holds 12 books and 7 more arrive. Save the total as 'books'."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "12 + 7"}}}]},
]


def probe_ids(model_dir: str | Path) -> list[int]:
    """The probe rendered with the serving template (no tool list: keeps it short), capped in length."""
    from runtime.model import render_ids

    return render_ids(DEFAULT_PROBE, None, model_dir, add_generation_prompt=False)[-PROBE_MAX_TOKENS:]


def probe_logprobs(model: Any, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t = 1..len-1, in fp32, as vLLM's prompt_logprobs reports them."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()


def probe_adapter(model_dir: str | Path, adapter_dir: str | Path | None, ids: list[int]) -> list[float]:
    """Probe log-probs of the base model (adapter_dir None) or base + adapter, loaded from disk."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return probe_logprobs(model, ids)


def check_adapter_files(adapter_dir: str | Path, *, max_rank: int | None = None) -> str | None:
    """None if the directory holds a plausible PEFT LoRA adapter, else the reason it does not."""
    d = Path(adapter_dir)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.is_file():
            return f"missing {p.name}"
    try:
        cfg = json.loads(cfg_path.read_text())
        rank = int(cfg["r"])
    except (ValueError, KeyError, TypeError) as e:
        return f"adapter_config.json is unreadable: {e!r}"
    if max_rank is not None and rank > max_rank:
        return f"rank {rank} exceeds the server's max LoRA rank {max_rank}"
    try:
        import torch
        from safetensors import safe_open

        n_lora = 0
        with safe_open(str(weights_path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if "lora_A" in name or "lora_B" in name:
                    n_lora += 1
                    r_dim = t.shape[0] if "lora_A" in name else t.shape[-1]
                    if r_dim != rank:
                        return f"{name} has rank {r_dim}, adapter_config.json says {rank}"
                t = t.float()
                if not torch.isfinite(t).all():
                    return f"{name} contains NaN or Inf"
                peak = t.abs().max().item() if t.numel() else 0.0
                if peak > MAX_ABS_WEIGHT:
                    return f"{name} has a weight of magnitude {peak:.3g} (> {MAX_ABS_WEIGHT:g}): not a trained adapter"
    except Exception as e:  # truncated or not safetensors at all
        return f"adapter_model.safetensors is corrupt: {e}"
    if n_lora == 0:
        return "adapter_model.safetensors holds no LoRA weights"
    return None
