"""A logged trajectory as one training sequence, token-exact with what was served.

The sequence is the last model call's prompt plus its completion; the mask is 1 on the tokens of
every completion (what the model generated) and 0 everywhere else. Token ids logged at serving time
are used as they are. Before training we check that they chain: each step's prompt must extend the
previous step's prompt plus completion exactly. Where they do not (retokenization drift: the
template or tokenizer rendered history differently than it was sampled), two cases:

- The next prompt differs only inside the previous step's completion (on_drift="trim", the default).
  SmolLM2 often writes the end of a tool call as `"}` `}` where re-rendering it gives `"` `}}`:
  the same text, other tokens. The sequence keeps what the model generated up to the first
  difference and continues with the next prompt as it was served, as context. Every trained token is
  then one the model generated, in the context it was generated in; only the retokenized tail goes
  untrained (`TokenSequence.untrained`). Excluding these runs instead lost 20-30% of successes against
  11-13% of failures (docs/learner.md), and in run 27's first cycle every storage pair (storage is
  solved only with tools).
- The history before it differs (or on_drift="exclude"): the run is excluded and counted, because
  training on it would push up tokens the model never produced.

An operator trial (learner/explore.py) was served its first step with the calculator narrowed to one
operation, and that narrowing is written into the prompt's tool block. Serving never shows it, so the
trial is re-rendered with the agent's own tool specs: the same conversation in the prompt the model
is asked in.
"""

from __future__ import annotations

from typing import Any

from runtime.rendering import split_last_turn
from tools.specs import TOOL_SPECS

from .types import TokenSequence

_OPENAI_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


class SequenceError(ValueError):
    """The trajectory cannot become a training sequence; `kind` says why (for the cycle's counts)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # no_steps | drift | render


def _steps_from_log(steps: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]] | None:
    if all(s.get("prompt_token_ids") and s.get("completion_token_ids") for s in steps):
        return [(list(s["prompt_token_ids"]), list(s["completion_token_ids"])) for s in steps]
    return None


def _steps_by_rendering(messages: list[dict[str, Any]], model_dir: Any) -> list[tuple[list[int], list[int]]]:
    """For runs logged without token ids: re-render each step with the serving template."""
    plain = [{k: m[k] for k in _OPENAI_KEYS if m.get(k) is not None} for m in messages]
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("generated"):
            try:
                out.append(split_last_turn(plain[: i + 1], TOOL_SPECS, model_dir))
            except Exception as e:
                raise SequenceError("render", f"cannot re-render step at message {i}: {e}") from None
    return out


ON_DRIFT = ("trim", "exclude")


def trajectory_sequence(traj: dict[str, Any], *, model_dir: Any = None, on_drift: str = "trim") -> TokenSequence:
    """`traj` as returned by TrajectoryStore.get (with its messages)."""
    if on_drift not in ON_DRIFT:
        raise ValueError(f"on_drift must be one of {', '.join(ON_DRIFT)}, got {on_drift!r}")
    messages = traj["messages"]
    steps = [m for m in messages if m["role"] == "assistant" and m.get("generated")]
    if not steps:
        raise SequenceError("no_steps", f"{traj['id']}: the model generated nothing")
    trial = bool((traj.get("metadata") or {}).get("explore_operation"))
    pieces = (None if trial else _steps_from_log(steps)) or _steps_by_rendering(messages, model_dir)
    ids: list[int] = []
    mask: list[int] = []
    completion_start = 0  # where the previous step's completion begins in ids
    untrained = 0
    for k, (prompt, completion) in enumerate(pieces):
        if prompt[: len(ids)] != ids:
            first = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
            if on_drift == "exclude" or first < completion_start:
                raise SequenceError("drift", f"{traj['id']}: step {k + 1}'s prompt does not extend step {k}'s "
                                             f"prompt + completion (first difference at token {first})")
            untrained += len(ids) - first
            del ids[first:], mask[first:]
        context = prompt[len(ids):]
        completion_start = len(ids) + len(context)
        ids += context + completion
        mask += [0] * len(context) + [1] * len(completion)
    return TokenSequence(tuple(ids), tuple(mask), traj["id"], untrained=untrained)
