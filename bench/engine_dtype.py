"""vLLM CPU throughput by --dtype on this machine: 32 chat completions, 16 at a time, 64 tokens each.

    HONE_MODEL=<prepared model dir> .venv/bin/python bench/engine_dtype.py float32 bfloat16
"""
import asyncio, os, subprocess, sys, time
import httpx
MODEL = os.environ.get("HONE_MODEL", ".hone-test/model")  # a prepared model directory
async def load(port):
    async with httpx.AsyncClient(timeout=600) as c:
        sem = asyncio.Semaphore(16)
        async def one(i):
            async with sem:
                r = await c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "max_tokens": 64,
                    "min_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": f"Count from {i} upwards in words."}]})
                r.raise_for_status(); return r.json()["usage"]["completion_tokens"]
        t = time.perf_counter(); toks = sum(await asyncio.gather(*(one(i) for i in range(32)))); return toks, time.perf_counter() - t
for dtype in sys.argv[1:]:
    port = 18000 + len(dtype)
    p = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--served-model-name", "m",
        "--port", str(port), "--dtype", dtype, "--max-model-len", "4096", "--chat-template", MODEL + "/chat_template.jinja"],
        stdout=open(f"/tmp/dt/{dtype}.log", "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200: break
        except httpx.HTTPError: pass
        if p.poll() is not None: print(dtype, "exited"); break
        time.sleep(2)
    if p.poll() is None:
        asyncio.run(load(port))  # warm-up
        toks, s = asyncio.run(load(port))
        print(f"{dtype}: start {time.time()-t0:.0f}s, {toks} tokens in {s:.1f}s = {toks/s:.1f} tok/s", flush=True)
    p.terminate(); p.wait(60)
