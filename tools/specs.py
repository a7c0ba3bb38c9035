"""OpenAI function-tool schemas for the agent's three tools.

Strict mode requires every property to be listed in "required" and no additional properties,
so optional inputs are required strings with documented "ignored" values instead. Descriptions
are short on purpose: a 135M-parameter model reads them in every prompt.
"""

from __future__ import annotations

from typing import Any

CALCULATOR = "calculator"
STORAGE = "storage"
PYTHON = "python"

STORAGE_ACTIONS = ("put", "get", "list", "delete")


def _function(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
            "strict": True,
        },
    }


TOOL_SPECS: list[dict[str, Any]] = [
    _function(
        CALCULATOR,
        "Exact arithmetic. Returns the result as a number.",
        {
            "expression": {
                "type": "string",
                "description": "Math only, e.g. (2+3)*4/7 or 2**10 or sqrt(2). "
                "Operators: + - * / // % ** ( ). Functions: sqrt abs round floor ceil min max "
                "factorial. No variables or words.",
            }
        },
    ),
    _function(
        STORAGE,
        "Save and recall text between turns. Returns the value, key list or a confirmation.",
        {
            "action": {
                "type": "string",
                "enum": list(STORAGE_ACTIONS),
                "description": "put: save value under key. get: read key. "
                "list: keys starting with key (\"\" for all). delete: remove key.",
            },
            "key": {"type": "string", "description": "Name of the entry, e.g. user_name."},
            "value": {
                "type": "string",
                "description": "Text to save. Only used by put; use \"\" otherwise.",
            },
        },
    ),
    _function(
        PYTHON,
        "Run Python code and return what it prints. No internet, no files outside its folder.",
        {
            "code": {
                "type": "string",
                "description": "A complete Python program. Use print() to show results.",
            }
        },
    ),
]
