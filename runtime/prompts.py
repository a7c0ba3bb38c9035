"""The system prompt and worked examples the agent sees before every conversation.

A 135M model makes no tool calls zero-shot; with example tool-call turns nearly all calls are well
formed (docs/benchmarks.md). The examples are real message turns, rendered by the same chat template
as live traffic, so the model sees exactly the format it must produce. They are prepended at model
call time and logged with every trajectory (generated=0), never stored in the thread's history.

The model copies the most recent example, so a request that names the storage or python tool gets
that tool's closest example repeated last (`routed_example`); everything else, arithmetic included,
gets the fixed prefix, which vLLM's prefix cache shares across requests.
"""

from __future__ import annotations

import json
import re

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

SYSTEM_PROMPT = (
    "You are a helpful assistant. Use the calculator for every arithmetic step, the storage tool to "
    "save and recall facts, and python for longer computations. After the tool result, give the final "
    "answer in one short sentence."
)

# (user question, tool name, tool arguments, tool result, final answer): one per operator, as
# measured in ../shared/notes/feasibility.md, plus one storage and one python example.
_EXAMPLES: list[tuple[str, str, dict, str, str]] = [
    # A 135M model copies the most recent example, so the rarer tools come first and the
    # arithmetic that most traffic needs comes last.
    ("What is the sum of the squares of the numbers from 1 to 10?",
     "python", {"code": "print(sum(i * i for i in range(1, 11)))"}, "385", "The answer is 385."),
    ("What is my bike lock number?",
     "storage", {"action": "get", "key": "bike lock", "value": ""}, "7301", "Your bike lock number is 7301."),
    ("Remember that my locker code is 4512.",
     "storage", {"action": "put", "key": "locker code", "value": "4512"}, "stored 'locker code' (4 bytes)",
     "I saved your locker code."),
    ("28 beads are shared equally among 7 necklaces. How many beads are on each necklace?",
     "calculator", {"expression": "28 / 7"}, "4", "The answer is 4."),
    ("Sara had 50 dollars and spent 18. How much money does she have left?",
     "calculator", {"expression": "50 - 18"}, "32", "The answer is 32."),
    ("There are 6 boxes with 8 pencils in each box. How many pencils are there?",
     "calculator", {"expression": "6 * 8"}, "48", "The answer is 48."),
    ("Tom has 12 apples and buys 5 more. How many apples does he have now?",
     "calculator", {"expression": "12 + 5"}, "17", "The answer is 17."),
]


# Repeated last for a request that names the tool, chosen among that tool's by the cue words the
# request shares with it. Only tool names route: "store" and "code" are common in arithmetic word
# problems ("a pet store", "a door code"); "storage" is in 1 of 1,157 ASDiv-A questions and "python"
# in none (docs/benchmarks.md). Keys and values differ from the suites' (tasks/), which measure this.
_ROUTED: list[tuple[frozenset[str], tuple[str, str, dict, str, str]]] = [
    (frozenset({"save", "store", "put", "remember", "keep", "write", "set", "overwrite", "replace", "update"}),
     ("Save 4512 in storage under the key locker_code. It is my locker code.",
      "storage", {"action": "put", "key": "locker_code", "value": "4512"}, "stored 'locker_code' (4 bytes)",
      "I saved your locker code.")),
    (frozenset({"get", "read", "recall", "look", "check", "tell", "retrieve", "find", "what", "forgot"}),
     ("Read locker_code from storage. What is my locker code?",
      "storage", {"action": "get", "key": "locker_code", "value": ""}, "4512", "Your locker code is 4512.")),
    (frozenset(),
     ("Use Python to find the sum of the cubes of the numbers from 1 to 20.",
      "python", {"code": "print(sum(i ** 3 for i in range(1, 21)))"}, "44100", "The answer is 44100.")),
]
ROUTED_TOOLS = ("storage", "python")
_WORD = re.compile(r"[a-z]+")


def _example(example: tuple[str, str, dict, str, str], call_id: str) -> list[BaseMessage]:
    question, tool, args, result, answer = example
    return [HumanMessage(question),
            AIMessage("", tool_calls=[{"id": call_id, "name": tool, "args": args, "type": "tool_call"}]),
            ToolMessage(result, tool_call_id=call_id, name=tool),
            AIMessage(answer)]


def example_messages() -> list[BaseMessage]:
    return [m for i, example in enumerate(_EXAMPLES) for m in _example(example, f"example_{i}")]


def routed_example(request: str | None) -> tuple[str, str, dict, str, str] | None:
    """The example to repeat last for this request, if it names exactly one routed tool: of that
    tool's examples, the one whose cue words it uses most (ties: the first)."""
    words = set(_WORD.findall((request or "").lower()))
    named = words & set(ROUTED_TOOLS)
    if len(named) != 1:
        return None
    (tool,) = named
    candidates = [(len(words & cues), -i, example) for i, (cues, example) in enumerate(_ROUTED) if example[1] == tool]
    return max(candidates, key=lambda c: c[:2])[2]


def prompt_prefix(client_system: str | None = None, *, examples: bool = True,
                  request: str | None = None) -> list[BaseMessage]:
    """System prompt (+ the client's own system text, if any), the worked examples, and the example
    routed to `request` (the latest user message) if it names the storage or python tool."""
    system = SYSTEM_PROMPT if not client_system else f"{SYSTEM_PROMPT}\n\n{client_system}"
    if not examples:
        return [SystemMessage(system)]
    routed = routed_example(request)
    last = [] if routed is None else _example(routed, "example_routed")
    return [SystemMessage(system), *example_messages(), *last]


def prompt_fingerprint() -> str:
    """Changes whenever the prompt changes, so trajectories from different prompts can be told apart."""
    import hashlib

    blob = json.dumps([SYSTEM_PROMPT, _EXAMPLES, [(sorted(c), e) for c, e in _ROUTED]], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
