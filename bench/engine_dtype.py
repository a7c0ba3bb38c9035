"""vLLM's serving speed by --dtype on this machine: 32 chat completions of 64 tokens, 16 at a time,
timed on the pass after a warm-up pass. Each dtype gets its own fresh vLLM server.

    HONE_MODEL=<prepared model dir> .venv/bin/python bench/engine_dtype.py float32 bfloat16

On a CPU without native bf16 (no AVX512-BF16 / AMX) vLLM emulates bf16; this is the measurement
behind `vllm_dtype auto` (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.engine import free_port  # noqa: E402

MODEL = Path(os.environ.get("HONE_MODEL", ".hone-test/model"))
REQUESTS, CONCURRENCY, TOKENS = 32, 16, 64


async def one_pass(url: str) -> tuple[int, float]:
    """Completion tokens served and seconds taken."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        async with sem:
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": "m", "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count from {i} upwards in words."}]})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(client, i) for i in range(REQUESTS))))
        return tokens, time.perf_counter() - t0


def measure(dtype: str, log: Path) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
           "--served-model-name", "m", "--port", str(port), "--dtype", dtype, "--max-model-len", "4096",
           "--chat-template", str(MODEL / "chat_template.jinja")]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not _healthy(port):
            if proc.poll() is not None:
                return f"{dtype}: vLLM exited with {proc.returncode}; see {log}"
            time.sleep(2)
        start_s = time.monotonic() - t0
        asyncio.run(one_pass(f"http://127.0.0.1:{port}"))  # warm-up
        tokens, s = asyncio.run(one_pass(f"http://127.0.0.1:{port}"))
        return f"{dtype}: start {start_s:.0f} s, {tokens} tokens in {s:.1f} s = {tokens / s:.1f} tok/s"
    finally:
        proc.terminate()
        proc.wait(60)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> int:
    dtypes = sys.argv[1:] or ["float32", "bfloat16"]
    if not (MODEL / "config.json").is_file():
        print(f"engine_dtype: no prepared model at {MODEL} (set HONE_MODEL)", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="hone-dtype-"))
    for dtype in dtypes:
        print(measure(dtype, logs / f"vllm-{dtype}.log"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
