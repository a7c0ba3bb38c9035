"""Render conversations with THE chat template: the single way to turn OpenAI-format messages (+
tools) into prompt text or token ids.

It renders exactly what vLLM renders for the same request (same template, same argument handling),
so the ids the learner trains on are the ids the served model saw. The template and the prepared
model directory come from runtime.model.
"""

from __future__ import annotations

import copy
import functools
import json
import typing
from pathlib import Path

from .model import TEMPLATE_NAME, ModelError, _offline

END_TOKEN = "<|im_end|>"  # end of every turn; the eos id (2) vLLM stops on and returns in token_ids


@functools.lru_cache(maxsize=4)
def _tokenizer(model_dir: str, stamp: tuple[float, ...]) -> typing.Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load_tokenizer(model_dir: Path | str) -> typing.Any:
    """The model's tokenizer (cached per directory; reloaded when the template file changes)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    stamp = tuple(
        p.stat().st_mtime if p.is_file() else 0.0
        for p in (model_dir / TEMPLATE_NAME, model_dir / "tokenizer_config.json", model_dir / "tokenizer.json")
    )
    return _tokenizer(str(model_dir.absolute()), stamp)


def normalize_messages(messages: typing.Iterable[typing.Mapping[str, typing.Any]]) -> list[dict[str, typing.Any]]:
    """OpenAI-format messages as vLLM hands them to the template: content parts joined with "\\n",
    tool-call ``arguments`` JSON strings decoded to objects (invalid or non-object -> ``{}``),
    empty ``tool_calls`` dropped. Inputs are not modified."""
    out: list[dict[str, typing.Any]] = []
    for message in messages:
        m = copy.deepcopy(dict(message))
        content = m.get("content")
        if isinstance(content, list):
            texts = [
                p.get("text", "") if isinstance(p, dict) else str(p)
                for p in content
                if not isinstance(p, dict) or p.get("type", "text") == "text"
            ]
            m["content"] = "\n".join(texts)
        if m.get("role") == "assistant" and "tool_calls" in m:
            calls = m.get("tool_calls")
            if not calls:
                m.pop("tool_calls", None)
            else:
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict):
                        continue
                    args = fn.get("arguments")
                    if isinstance(args, str):
                        try:
                            args = json.loads(args) if args.strip() else {}
                        except ValueError:
                            args = {}
                    fn["arguments"] = args if isinstance(args, dict) else {}
        out.append(m)
    return out


def render(
    messages: typing.Sequence[typing.Mapping[str, typing.Any]],
    tools: typing.Sequence[typing.Mapping[str, typing.Any]] | None = None,
    model_dir: Path | str | None = None,
    *,
    add_generation_prompt: bool = True,
    tokenize: bool = False,
) -> typing.Any:
    """Render OpenAI-format ``messages`` (+ OpenAI ``tools``) with the model's chat template.

    Returns the prompt text, or with ``tokenize=True`` the token ids (a list of int) — the same
    ids vLLM reports as ``prompt_token_ids`` for the same request. ``model_dir`` defaults to the
    embedded model under the default settings.
    """
    if model_dir is None:
        model_dir = _default_model_dir()
    tok = load_tokenizer(model_dir)
    kwargs: dict[str, typing.Any] = {}
    if tokenize:
        kwargs["return_dict"] = False
    result = tok.apply_chat_template(
        normalize_messages(messages),
        tools=[dict(t) for t in tools] if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        **kwargs,
    )
    if tokenize and not isinstance(result, list):  # defensive: some versions return BatchEncoding
        result = list(result["input_ids"])
    return result


def render_ids(
    messages: typing.Sequence[typing.Mapping[str, typing.Any]],
    tools: typing.Sequence[typing.Mapping[str, typing.Any]] | None = None,
    model_dir: Path | str | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """``render(..., tokenize=True)``."""
    return render(messages, tools, model_dir, add_generation_prompt=add_generation_prompt, tokenize=True)


def split_last_turn(
    messages: typing.Sequence[typing.Mapping[str, typing.Any]],
    tools: typing.Sequence[typing.Mapping[str, typing.Any]] | None = None,
    model_dir: Path | str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, completion) for a conversation whose last message is the assistant's.

    prompt = ``render_ids(messages[:-1], add_generation_prompt=True)`` — what vLLM was given;
    completion = the assistant turn as the model would have generated it, ending with
    ``<|im_end|>`` (the eos id vLLM also returns as the last of ``token_ids``). For training
    prefer the ids logged at serving time; this re-rendering equals them whenever the model
    generated the canonical format (``<tool_call>\\n{json.dumps}\\n</tool_call>``).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ModelError("split_last_turn needs a conversation that ends with an assistant message")
    prompt = render_ids(messages[:-1], tools, model_dir, add_generation_prompt=True)
    full = render_ids(messages, tools, model_dir, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ModelError("chat template is not prefix-consistent for this conversation")
    rest = full[len(prompt) :]
    eos = load_tokenizer(model_dir if model_dir is not None else _default_model_dir()).convert_tokens_to_ids(END_TOKEN)
    if eos not in rest:
        raise ModelError("rendered assistant turn has no <|im_end|>")
    return prompt, rest[: rest.index(eos) + 1]


def _default_model_dir() -> Path:
    from runtime.config import Settings

    return Settings.load().model_path
