"""The system prompt and worked examples the agent sees before every conversation.

A 135M model makes no tool calls zero-shot; with example tool-call turns nearly all calls are well
formed (docs/benchmarks.md). The examples are real message turns, rendered by the same chat template
as live traffic, so the model sees exactly the format it must produce. They are prepended at model
call time and logged with every trajectory (generated=0), never stored in the thread's history.
"""

from __future__ import annotations

import json

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


def example_messages() -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for i, (question, tool, args, result, answer) in enumerate(_EXAMPLES):
        call_id = f"example_{i}"
        out.append(HumanMessage(question))
        out.append(AIMessage("", tool_calls=[{"id": call_id, "name": tool, "args": args, "type": "tool_call"}]))
        out.append(ToolMessage(result, tool_call_id=call_id, name=tool))
        out.append(AIMessage(answer))
    return out


def prompt_prefix(client_system: str | None = None, *, examples: bool = True) -> list[BaseMessage]:
    """System prompt (+ the client's own system text, if any) and the worked examples."""
    system = SYSTEM_PROMPT if not client_system else f"{SYSTEM_PROMPT}\n\n{client_system}"
    return [SystemMessage(system), *(example_messages() if examples else [])]


def prompt_fingerprint() -> str:
    """Changes whenever the prompt changes, so trajectories from different prompts can be told apart."""
    import hashlib

    blob = json.dumps([SYSTEM_PROMPT, _EXAMPLES], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
