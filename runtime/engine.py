"""The inference engine: a vLLM OpenAI-compatible server, either our supervised child or external.

The runtime talks to vLLM only over HTTP, so a managed child and an external server behave the same
to the rest of the code. The managed child is restarted when it dies; after a restart the active
LoRA adapter is loaded again, because runtime-loaded adapters live only in the engine's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from .config import Settings
from .hardware import cpu_has_native_bf16, gpu_present, usable_cores

log = logging.getLogger("hone.engine")

_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """The engine is unreachable or failed; the HTTP layer answers 503."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_dtype(setting: str, cpu_flags: set[str] | None = None, gpu: bool | None = None) -> str:
    """`auto`: bfloat16 on a GPU or on a CPU with native bf16 (AVX512-BF16 or AMX), else float32.
    The trainer's `dpo_autocast = auto` asks the same question (runtime/hardware.py)."""
    if setting != "auto":
        return setting
    if gpu is None:
        gpu = gpu_present()
    if gpu:
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16(cpu_flags) else "float32"


def reserved_cpu_cores(setting: str, cores: int | None = None) -> str | None:
    """How many cores vLLM-CPU keeps off the model for its scheduler process; None = vLLM's default
    (one per worker). `auto` reserves none on a host with 2 cores or fewer: there the default runs
    the model on one thread, and a 60-task eval took 123 s against 81 s with both cores
    (docs/benchmarks.md). Larger hosts, not measured, keep vLLM's default."""
    if setting != "auto":
        return setting
    return "0" if (usable_cores() if cores is None else cores) <= 2 else None


def kv_block_size(setting: str, gpu: bool | None = None) -> str | None:
    """`auto`: 32 tokens on a CPU, vLLM's default (16) on a GPU. vLLM-CPU defaults to 128, and its
    prefix cache reuses only whole blocks: an agent's next step recomputed up to 127 tokens of a
    context it had just computed. On the held-out eval, 32 cut recomputed prompt tokens by a third
    and the eval's time by 12% (docs/benchmarks.md). vLLM-CPU wants a multiple of 32."""
    if setting != "auto":
        return setting
    return None if (gpu_present() if gpu is None else gpu) else "32"


def vllm_command(settings: Settings, model_dir: Path, port: int) -> list[str]:
    """The exact command line of the managed vLLM server (also printed by `hone serve --dry-run`)."""
    template = model_dir / "chat_template.jinja"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", settings.served_model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", serving_dtype(settings.vllm_dtype),
        "--max-model-len", str(settings.vllm_max_model_len),
        "--enable-lora",
        "--max-lora-rank", str(settings.vllm_max_lora_rank),
        "--max-loras", str(settings.vllm_max_loras),
        "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes",
        "--disable-uvicorn-access-log",
    ]
    if template.is_file():
        cmd += ["--chat-template", str(template)]
    extra = shlex.split(settings.vllm_extra_args)
    block_size = kv_block_size(settings.vllm_block_size)
    if block_size is not None and not any(a == "--block-size" or a.startswith("--block-size=") for a in extra):
        cmd += ["--block-size", block_size]
    cmd += extra
    return cmd


# vLLM's processes talk over ZeroMQ sockets named $TMPDIR/<uuid4>, and a socket path holds at most
# 107 bytes: under a deep HONE_HOME every engine start failed ("ipc path ... is longer than 107
# characters") and the supervisor restarted it forever.
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_LEN = len("/") + 36


def engine_tmpdir(settings: Settings) -> Path:
    """TMPDIR for the engine: HONE_HOME/run/tmp, or a short per-home folder in the system's temp dir."""
    tmp = settings.run_dir / "tmp"
    if len(os.fsencode(tmp)) + _SOCKET_NAME_LEN > _SOCKET_PATH_MAX:
        root = Path(tempfile.gettempdir())
        if len(os.fsencode(root)) > 40:
            root = Path("/tmp")
        tag = hashlib.sha256(os.fsencode(settings.home.resolve())).hexdigest()[:12]
        tmp = root / f"hone-{os.getuid()}-{tag}"
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    return tmp


def vllm_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    tmp = engine_tmpdir(settings)
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(settings.vllm_kv_cache_gb),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CACHE_ROOT=str(settings.run_dir / "vllm-cache"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TMPDIR=str(tmp),
        HONE_VLLM_GROUPED_LORA="1" if settings.vllm_grouped_lora else "0",
    )
    reserved = reserved_cpu_cores(settings.vllm_cpu_reserved_cores)
    # vLLM's own variables, set by the user, win: they may bind cores by hand.
    if reserved is not None and not {"VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND"} & env.keys():
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
    return env


def _die_with_parent() -> None:
    # If `hone serve` is SIGKILLed, the kernel sends SIGTERM to the engine instead of orphaning it.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Engine:
    """An OpenAI-compatible vLLM server at ``base_url``. Subclasses decide who runs it."""

    def __init__(self, base_url: str, *, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.ready = asyncio.Event()
        self.last_error: str | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self._on_ready = on_ready
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=2.0))

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def state(self) -> str:
        return "ready" if self.ready.is_set() else "starting" if self.last_error is None else "down"

    async def start(self) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="engine-watch")

    async def stop(self) -> None:
        task = getattr(self, "_watch_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            r = await self._http.get(self.base_url + "/health", timeout=5.0)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            raise EngineError(f"engine not ready after {timeout:.0f}s: {self.last_error or 'still starting'}") from None

    async def _mark_ready(self) -> None:
        if self._on_ready is not None:
            await self._on_ready()
        self.ready.set()
        self.last_error = None

    async def _watch(self) -> None:
        """Poll health; flip `ready` so requests fail fast with 503 while the engine is away."""
        while True:
            ok = await self.healthy()
            if ok and not self.ready.is_set():
                try:
                    await self._mark_ready()
                    log.info("engine ready at %s", self.base_url)
                except Exception as e:  # the adapter reload failed: stay unready, try again
                    self.last_error = f"engine up but restoring the active adapter failed: {e}"
                    log.error(self.last_error)
            elif not ok and self.ready.is_set():
                self.ready.clear()
                self.last_error = "engine stopped answering its health check"
                log.warning(self.last_error)
            await asyncio.sleep(1.0 if ok else 0.5)

    # ---- LoRA management (runtime updating must be enabled on the server) ----
    async def load_adapter(self, name: str, path: Path | str) -> None:
        r = await self._http.post(
            self.base_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300.0
        )
        if r.status_code != 200 and "already been loaded" not in r.text:
            raise EngineError(f"vLLM refused to load adapter {name!r} from {path}: {r.status_code} {r.text[:300]}")

    async def unload_adapter(self, name: str) -> None:
        r = await self._http.post(self.base_url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60.0)
        if r.status_code != 200 and "not found" not in r.text.lower():
            raise EngineError(f"vLLM refused to unload adapter {name!r}: {r.status_code} {r.text[:300]}")

    async def served_models(self) -> list[str]:
        r = await self._http.get(self.base_url + "/v1/models", timeout=10.0)
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]


class ExternalEngine(Engine):
    """A vLLM server somebody else runs (``HONE_VLLM_URL``). We only watch its health."""


class ManagedEngine(Engine):
    """A vLLM server we start as a child process and restart when it dies."""

    def __init__(self, settings: Settings, model_dir: Path, **kw) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.port = settings.vllm_port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", **kw)
        self.proc: subprocess.Popen | None = None
        self.log_path = settings.logs_dir / "vllm.log"
        self._stopping = False
        self._supervisor: asyncio.Task | None = None

    def _spawn(self) -> None:
        self.settings.logs_dir.mkdir(parents=True, exist_ok=True)
        cmd = vllm_command(self.settings, self.model_dir, self.port)
        log.info("starting vLLM: %s", shlex.join(cmd))
        logf = open(self.log_path, "ab")
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=vllm_env(self.settings),
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        logf.close()
        self.started_at = time.time()

    async def start(self) -> None:
        self._spawn()
        await super().start()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="engine-supervise")

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.proc is not None
            code = await asyncio.to_thread(self.proc.wait)
            if self._stopping:
                return
            self.ready.clear()
            uptime = time.time() - (self.started_at or time.time())
            self.last_error = f"vLLM exited with code {code}; restarting (see {self.log_path})"
            log.error(self.last_error)
            backoff = 1.0 if uptime > 120 else min(backoff * 2, 60.0)
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            # vLLM's engine-core child may outlive the API process: clear the whole group first.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                self._spawn()
                self.restarts += 1
            except OSError as e:  # e.g. disk full for the log: keep trying rather than give up
                self.last_error = f"could not restart vLLM: {e}"
                log.error(self.last_error)
                await asyncio.sleep(10)
                continue

    async def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await super().stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
