"""The managed engine's environment: vLLM's IPC sockets must bind wherever HONE_HOME lives."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import zmq

from runtime.config import Settings
from runtime.engine import engine_tmpdir, vllm_env


def _bind_like_vllm(tmpdir: str) -> None:
    """What vLLM's make_zmq_socket does with TMPDIR: an ipc socket named after a fresh uuid4."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(f"ipc://{tmpdir}/{uuid.uuid4()}")
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_short_home_keeps_the_engine_tmpdir_inside_it(tmp_path: Path) -> None:
    settings = Settings.load({"HONE_HOME": str(tmp_path)})
    tmp = engine_tmpdir(settings)
    assert tmp == settings.run_dir / "tmp" and tmp.is_dir()
    _bind_like_vllm(vllm_env(settings)["TMPDIR"])


def test_a_deep_home_gets_a_short_tmpdir_that_vllm_can_bind_in(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 30)
    settings = Settings.load({"HONE_HOME": str(deep)})
    with pytest.raises(zmq.ZMQError, match="longer than"):  # the failure every engine start hit before
        (settings.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        _bind_like_vllm(str(settings.run_dir / "tmp"))
    tmp = engine_tmpdir(settings)
    assert len(os.fsencode(tmp)) + 37 <= 107 and tmp.is_dir() and oct(tmp.stat().st_mode & 0o777) == "0o700"
    assert engine_tmpdir(settings) == tmp  # stable per home: restarts reuse it
    _bind_like_vllm(vllm_env(settings)["TMPDIR"])
    other = Settings.load({"HONE_HOME": str(deep / "other")})
    assert engine_tmpdir(other) != tmp


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it() -> None:
    from runtime.engine import serving_dtype

    assert serving_dtype("auto", {"avx2", "avx512f", "avx512_bf16"}, gpu=False) == "bfloat16"
    assert serving_dtype("auto", {"avx2", "amx_bf16"}, gpu=False) == "bfloat16"
    assert serving_dtype("auto", {"avx", "avx2", "avx512f"}, gpu=False) == "float32"  # bf16 emulated: ~5x slower
    assert serving_dtype("auto", set(), gpu=True) == "bfloat16"
    assert serving_dtype("float16", {"avx512_bf16"}, gpu=False) == "float16"  # an explicit setting is kept
    assert serving_dtype("auto") in ("bfloat16", "float32")  # this machine's own answer
