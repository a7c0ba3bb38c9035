"""HTTP routes of the learning half: cycles (list, inspect, trigger) and adapters (list, roll back).

Cycles run in the learner process; these routes only read and write its records, so they answer
fast even mid-training. Triggering queues a request the learner picks up at its next poll.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from learner.registry import CYCLE_STATES, RegistryError
from learner.swap import SwapError, rollback

from .auth import authenticate, require_admin
from .errors import ApiError

router = APIRouter()


def _hone(request: Request):
    return request.app.state.hone


def _learner_info(hone) -> dict[str, Any]:
    proc = hone.learner
    return {"enabled": hone.settings.learner_enabled, "pid": proc.pid if proc else None,
            "restarts": proc.restarts if proc else 0, "last_exit": proc.last_exit if proc else None}


@router.get("/v1/learner/cycles")
async def list_cycles(request: Request, limit: int = Query(20, ge=1, le=1000),
                      state: str | None = Query(None)) -> dict[str, Any]:
    """Learner cycles, newest first: state, phase, per-phase timings, counts and the gate's numbers."""
    authenticate(_hone(request).settings, request)
    if state is not None and state not in CYCLE_STATES:
        raise ApiError(422, f"state must be one of {', '.join(CYCLE_STATES)}")
    hone = _hone(request)
    return {"cycles": hone.registry.list_cycles(limit, state), "learner": _learner_info(hone)}


@router.get("/v1/learner/cycles/{cycle_id}")
async def get_cycle(cycle_id: int, request: Request) -> dict[str, Any]:
    authenticate(_hone(request).settings, request)
    cycle = _hone(request).registry.get_cycle(cycle_id)
    if cycle is None:
        raise ApiError(404, f"no cycle {cycle_id}", "not_found")
    return cycle


@router.post("/v1/learner/cycles", status_code=202)
async def trigger_cycle(request: Request) -> JSONResponse:
    """Queue a cycle (admin). The learner process starts it at its next poll; an already queued
    request is returned instead of queueing a second."""
    caller = authenticate(_hone(request).settings, request)
    require_admin(caller)
    hone = _hone(request)
    cycle = hone.registry.request_cycle(requested_by=caller.name)
    body: dict[str, Any] = {"cycle": cycle, "learner": _learner_info(hone)}
    if not hone.settings.learner_enabled:
        body["note"] = "the learner is disabled in this server (learner_enabled=false): run `hone learner`"
    return JSONResponse(body, status_code=202)


@router.get("/v1/adapters")
async def adapters(request: Request, limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
    """The base model, the active adapter, what the engine has loaded, and the adapter registry."""
    authenticate(_hone(request).settings, request)
    hone = _hone(request)
    active, path = hone.store.get_active_adapter()
    loaded: list[str] | None = None
    if hone.engine.ready.is_set():
        try:
            loaded = await hone.engine.served_models()
        except Exception:
            loaded = None
    return {"base": hone.settings.served_model_name, "active": active, "active_path": path,
            "engine_models": loaded, "adapters": hone.registry.list_adapters(limit)}


@router.post("/v1/adapters/rollback")
async def rollback_adapter(request: Request) -> dict[str, Any]:
    """Serve the previously active adapter again (admin): loaded and verified in vLLM, then switched."""
    caller = authenticate(_hone(request).settings, request)
    require_admin(caller)
    hone = _hone(request)
    try:  # nothing to roll back is a 409 whatever the engine's state: retrying would not help
        _active, target, _path = hone.registry.rollback_target()
    except RegistryError as e:
        raise ApiError(409, str(e), "conflict") from None
    if target is not None and not hone.engine.ready.is_set():  # back to base loads nothing
        raise ApiError(503, f"engine is {hone.engine.state}; try again", "engine_unavailable",
                       headers={"Retry-After": "5"})
    try:
        return await rollback(hone.engine, hone.registry, by=caller.name, tolerance=hone.settings.swap_tolerance)
    except RegistryError as e:
        raise ApiError(409, str(e), "conflict") from None
    except SwapError as e:
        raise ApiError(502, str(e), "swap_failed") from None
    except Exception as e:  # vLLM refused to load it, etc.: say so, never a bare 500
        raise ApiError(502, f"rollback failed: {e}", "swap_failed") from None
