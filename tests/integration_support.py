"""Real parts for integration tests and benchmarks: the prepared SmolLM2 and a `hone serve` process
(which starts and supervises a real vLLM)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from runtime.engine import free_port

REPO = Path(__file__).resolve().parent.parent
# Prepared once per checkout (about 20 s) and reused: it is rebuilt when the template changes.
TEST_MODEL_DIR = REPO / ".hone-test" / "model"


def prepared_model() -> Path:
    from runtime.model import prepare_model

    return prepare_model(TEST_MODEL_DIR, progress=lambda m: print(f"[model] {m}", file=sys.stderr))


@dataclass
class Server:
    url: str
    home: Path
    proc: subprocess.Popen
    env: dict[str, str]

    def vllm_log(self, n: int = 60) -> str:
        p = self.home / "logs" / "vllm.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no vllm.log)"

    def hone(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `hone` CLI against this server's HONE_HOME."""
        return subprocess.run([str(Path(sys.executable).parent / "hone"), *args], env=self.env,
                              capture_output=True, text=True, timeout=120, check=check)


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hone serve exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/healthz", timeout=5)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s; last: {last}")


@contextlib.contextmanager
def hone_server(home: Path, model_dir: Path, *, extra_env: dict[str, str] | None = None,
                timeout: float = 600) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HONE_")}
    env.update(HONE_HOME=str(home), HONE_MODEL=str(model_dir), HONE_PORT=str(port), HONE_LOG_LEVEL="warning")
    env.update(extra_env or {})
    home.mkdir(parents=True, exist_ok=True)
    out = open(home / "serve.log", "ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "hone"), "serve"], env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", home, proc, env)
    try:
        try:
            wait_healthy(server.url, timeout, proc)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- serve.log ---\n{(home / 'serve.log').read_text()[-3000:]}"
                               f"\n--- vllm.log ---\n{server.vllm_log()}") from None
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()
