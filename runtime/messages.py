"""Conversions between OpenAI-format message dicts (the wire and the log) and LangChain messages."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pydantic

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage


class MessageFormatError(ValueError):
    """A client message could not be understood; the HTTP layer answers 422 with this text."""


def from_openai(messages: list[dict[str, Any]]) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        try:
            _append(out, i, m)
        except (pydantic.ValidationError, TypeError) as e:  # wrong field types inside a message
            raise MessageFormatError(f"messages[{i}]: {_first_error(e)}") from None
    return out


def _first_error(e: Exception) -> str:
    if isinstance(e, pydantic.ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(e)


def _append(out: list[BaseMessage], i: int, m: Any) -> None:
    if not isinstance(m, dict):
        raise MessageFormatError(f"messages[{i}] must be an object")
    role = m.get("role")
    content = _text_content(m.get("content"), i)
    if role == "system" or role == "developer":
        if out:
            raise MessageFormatError(f"messages[{i}]: a system message is only allowed first")
        out.append(SystemMessage(content))
    elif role == "user":
        out.append(HumanMessage(content))
    elif role == "assistant":
        calls = []
        for j, tc in enumerate(m.get("tool_calls") or []):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise MessageFormatError(f"messages[{i}].tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}")
            args = fn.get("arguments") or "{}"
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                raise MessageFormatError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") from None
            if not isinstance(args, dict):
                raise MessageFormatError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
            calls.append({"id": tc.get("id") or f"call_{i}_{j}", "name": fn["name"], "args": args, "type": "tool_call"})
        out.append(AIMessage(content, tool_calls=calls))
    elif role == "tool":
        if not m.get("tool_call_id"):
            raise MessageFormatError(f"messages[{i}]: a tool message needs tool_call_id")
        out.append(ToolMessage(content, tool_call_id=m["tool_call_id"], name=m.get("name")))
    else:
        raise MessageFormatError(f"messages[{i}]: unknown role {role!r} (use system, user, assistant or tool)")


def _text_content(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is meaningful to this model
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise MessageFormatError(f"messages[{i}].content: only text parts are supported")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    raise MessageFormatError(f"messages[{i}].content must be a string or a list of text parts")


def to_openai(msg: BaseMessage) -> dict[str, Any]:
    if isinstance(msg, SystemMessage):
        return {"role": "system", "content": str(msg.content)}
    if isinstance(msg, HumanMessage):
        return {"role": "user", "content": str(msg.content)}
    if isinstance(msg, AIMessage):
        d: dict[str, Any] = {"role": "assistant", "content": str(msg.content)}
        if msg.tool_calls:
            d["tool_calls"] = [
                {"id": tc["id"], "type": "function",
                 "function": {"name": tc["name"], "arguments": json.dumps(tc["args"], ensure_ascii=False)}}
                for tc in msg.tool_calls
            ]
        return d
    if isinstance(msg, ToolMessage):
        return {"role": "tool", "content": str(msg.content), "tool_call_id": msg.tool_call_id, "name": msg.name}
    raise TypeError(f"cannot convert {type(msg).__name__}")


_WS = re.compile(r"\s+")


def request_key(messages: list[BaseMessage]) -> str:
    """Same task, same key: the user turns, lower-cased with whitespace collapsed, hashed."""
    users = [_WS.sub(" ", str(m.content)).strip().lower() for m in messages if isinstance(m, HumanMessage)]
    return hashlib.sha256("\x1e".join(users).encode()).hexdigest()[:16]
