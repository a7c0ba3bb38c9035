"""Hot-swap: put a trained adapter into the running vLLM, prove it is the one serving, then flip
the pointer every run reads before each model call.

    load (under its version name; in-flight requests keep going)
    -> verify: vLLM's log-probs of a fixed probe text under that name == the ones computed locally
       from the trained weights (stored in hone-adapter.json at training time)
    -> promote: adapters table + serving pointer in one transaction (the next model call uses it)
    -> unload adapters beyond the active one and its rollback target

A stale or wrong adapter under the right name fails verification: nothing is switched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from runtime.engine import Engine

from .registry import Registry, RegistryError

log = logging.getLogger("hone.learner")
METADATA_FILE = "hone-adapter.json"


class SwapError(RuntimeError):
    pass


def read_probe(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_FILE
    try:
        probe = json.loads(path.read_text())["probe"]
        assert probe["ids"] and len(probe["logprobs"]) == len(probe["ids"]) - 1
        return probe
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise SwapError(f"{path}: no usable probe to verify the adapter against ({e!r})") from None


async def served_logprobs(engine: Engine, model: str, ids: list[int]) -> list[float]:
    """vLLM's log-prob of each of ids[1:] given the tokens before it, under `model`."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    try:
        r = await engine._http.post(engine.openai_base_url + "/completions", json=body, timeout=120.0)
    except httpx.HTTPError as e:
        raise SwapError(f"probe request to vLLM failed: {e!r}") from None
    if r.status_code != 200:
        raise SwapError(f"vLLM refused the probe for {model!r}: {r.status_code} {r.text[:300]}")
    entries = r.json()["choices"][0]["prompt_logprobs"]
    return [float(entries[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]


def _mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


async def verify(engine: Engine, version: str, adapter_dir: str | Path, *, tolerance: float) -> dict[str, Any]:
    """Compare what vLLM serves as `version` with the trained weights' probe log-probs.

    Passes when vLLM is within `tolerance` (mean absolute nats; bf16 serving vs fp32 training differ
    a little) of the adapter AND closer to the adapter than to the base model, unless the adapter
    is too close to the base for the two to be told apart."""
    probe = read_probe(adapter_dir)
    served = await served_logprobs(engine, version, probe["ids"])
    d_adapter = _mean_abs(served, probe["logprobs"])
    d_base = _mean_abs(served, probe["base_logprobs"])
    separation = _mean_abs(probe["logprobs"], probe["base_logprobs"])
    ok = d_adapter <= tolerance and (d_adapter < d_base or separation <= tolerance)
    return {"ok": ok, "n_tokens": len(served), "diff_vs_trained": round(d_adapter, 5),
            "diff_vs_base": round(d_base, 5), "trained_vs_base": round(separation, 5), "tolerance": tolerance}


async def promote(engine: Engine, registry: Registry, version: str, *, tolerance: float,
                  keep: int) -> dict[str, Any]:
    """Load, verify and switch to `version`; raises SwapError (nothing switched) if it is not proven."""
    row = registry.get_adapter(version)
    if row is None:
        raise SwapError(f"no adapter {version!r} in the registry")
    await engine.load_adapter(version, row["path"])
    result = await verify(engine, version, row["path"], tolerance=tolerance)
    if not result["ok"]:
        raise SwapError(f"vLLM does not serve the trained {version}: {result}")
    result["replaced"] = registry.promote(version, verify=result)
    result["unloaded"] = await unload_extras(engine, registry, keep=keep)
    return result


async def unload_extras(engine: Engine, registry: Registry, *, keep: int) -> list[str]:
    """Unload registry adapters vLLM holds beyond the active one and its rollback chain (`keep` total)."""
    active, _ = registry.active()
    wanted: list[str] = []
    version = active
    while version and len(wanted) < keep:
        wanted.append(version)
        row = registry.get_adapter(version)
        version = row["previous"] if row else None
    known = {a["version"] for a in registry.list_adapters(limit=10_000)}
    unloaded = []
    for name in await engine.served_models():
        if name in known and name not in wanted:
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
