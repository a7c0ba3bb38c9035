"""The prompt prefix: fixed for arithmetic, with the named tool's example repeated last otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.prompts import example_messages, prompt_prefix, routed_example

TASKS = Path(__file__).resolve().parent.parent / "tasks"


def last_call(prefix) -> dict:
    return prefix[-3].tool_calls[0]


@pytest.mark.parametrize("request_text, tool, action", [
    ("Remember this for later: my door code is 82009. Put it in storage under the key door_code.", "storage", "put"),
    ("Overwrite employee_id in storage with the new value 818943.", "storage", "put"),
    ("I forgot my wifi password. Please read the key wifi_password from storage and tell me.", "storage", "get"),
    ("Get daily_distance from storage, then use the calculator to find the total for 13 days.", "storage", "get"),
    ("Use Python to count how many prime numbers are less than 26000.", "python", None),
    ("write some PYTHON: reverse 'abc'", "python", None),
])
def test_a_request_naming_a_tool_gets_its_example_last(request_text: str, tool: str, action: str | None) -> None:
    prefix = prompt_prefix(request=request_text)
    assert len(prefix) == 1 + len(example_messages()) + 4
    call = last_call(prefix)
    assert call["name"] == tool and call["id"] == "example_routed"
    if action:
        assert call["args"]["action"] == action
    assert prefix[-2].tool_call_id == "example_routed" and prefix[-1].type == "ai"


@pytest.mark.parametrize("request_text", [
    "Tom has 12 apples and buys 5 more. How many apples does he have now?",
    "A pet store had 64 birds that talked and 13 that did n't. how many birds did the pet store have total?",
    "Store it with python or in storage?",  # names both: no guess
    "",
    None,
])
def test_other_requests_get_the_fixed_prefix(request_text: str | None) -> None:
    assert routed_example(request_text) is None
    assert prompt_prefix(request=request_text) == prompt_prefix()


def test_the_shipped_arithmetic_samples_keep_the_fixed_prefix() -> None:
    # The loop's traffic and held-out pools are word problems: their prompt must stay the one measured.
    for name in ("asdiv-a-sample.jsonl", "gsm8k-sample.jsonl"):
        for line in (TASKS / name).read_text().splitlines():
            assert routed_example(json.loads(line)["question"]) is None, line


def test_no_examples_means_system_prompt_only() -> None:
    prefix = prompt_prefix("Be brief.", examples=False, request="Read key x from storage.")
    assert len(prefix) == 1 and prefix[0].content.endswith("Be brief.")
