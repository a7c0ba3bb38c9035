"""Dispatch of the model's tool calls to the three tools, with the caller's storage namespace.

Every failure becomes text the model can read (and `is_error=True` for the log), never an exception
that would end the run: a small model often recovers when told what went wrong.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from tools.calculator import evaluate
from tools.errors import ToolError
from tools.python_sandbox import SandboxLimits, format_result, run_python
from tools.specs import TOOL_SPECS
from tools.storage import KVStore

from .config import Settings


@dataclass
class ToolOutcome:
    content: str
    is_error: bool


class ToolBox:
    specs: list[dict] = TOOL_SPECS

    def __init__(self, kv: KVStore, limits: SandboxLimits) -> None:
        self.kv = kv
        self.limits = limits
        self.names = {s["function"]["name"] for s in self.specs}

    @classmethod
    def from_settings(cls, settings: Settings) -> ToolBox:
        kv = KVStore(
            settings.db_path,
            max_key_chars=settings.storage_max_key_chars,
            max_value_bytes=settings.storage_max_value_bytes,
            max_keys=settings.storage_max_keys,
        )
        limits = SandboxLimits(
            cpu_s=settings.python_cpu_s,
            wall_s=settings.python_wall_s,
            memory_mb=settings.python_memory_mb,
            output_bytes=settings.python_output_bytes,
        )
        return cls(kv, limits)

    async def call(self, name: str, args: Any, namespace: str) -> ToolOutcome:
        if name not in self.names:
            return ToolOutcome(f"error: unknown tool {name!r}; available tools: {', '.join(sorted(self.names))}", True)
        if isinstance(args, str):  # some parsers hand back the JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                return ToolOutcome(f"error: {name} arguments are not valid JSON: {e}", True)
        if not isinstance(args, dict):
            return ToolOutcome(f"error: {name} arguments must be a JSON object", True)
        try:
            if name == "calculator":
                return ToolOutcome(evaluate(_str_arg(args, "expression")), False)
            if name == "storage":
                action = _str_arg(args, "action")
                key, value = args.get("key"), args.get("value")
                text = await asyncio.to_thread(self.kv.call, namespace, action, key, value)
                return ToolOutcome(text, False)
            result = await run_python(_str_arg(args, "code"), self.limits)
            failed = result.exception is not None or result.timed_out or result.exit_code not in (0, None)
            return ToolOutcome(format_result(result), failed)
        except ToolError as e:
            return ToolOutcome(f"error: {e}", True)


def _str_arg(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise ToolError(f"missing string argument {key!r}")
    return value
