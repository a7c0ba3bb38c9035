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


def test_the_trainer_asks_the_same_bf16_question_as_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import learner.train as train
    from runtime.engine import serving_dtype

    cpu = torch.device("cpu")
    for flags in ({"avx2", "avx512f"}, {"avx2"}, {"avx2", "avx512f", "avx512_bf16"}):
        monkeypatch.setattr("runtime.hardware.cpu_flags", lambda f=flags: f)
        assert train._use_bf16(train.TrainConfig(), cpu) == (serving_dtype("auto", gpu=False) == "bfloat16")
    assert train._use_bf16(train.TrainConfig(), cpu) is True  # the last flags had AVX512-BF16
    assert train._use_bf16(train.TrainConfig(bf16_autocast=False), cpu) is False  # an explicit setting is kept


def test_a_two_core_host_gives_the_model_both_cores() -> None:
    from runtime.engine import reserved_cpu_cores

    assert reserved_cpu_cores("auto", cores=2) == "0"
    assert reserved_cpu_cores("auto", cores=1) == "0"
    assert reserved_cpu_cores("auto", cores=16) is None  # vLLM's default: one core for its scheduler
    assert reserved_cpu_cores("3", cores=2) == "3"


def test_vllm_env_reserves_cores_unless_the_user_binds_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    settings = Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_CPU_RESERVED_CORES": "1"})
    assert vllm_env(settings)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in vllm_env(settings)  # a hand binding is left alone
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "2")
    assert vllm_env(settings)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"


def test_a_bad_reserved_cores_setting_is_a_config_error(tmp_path: Path) -> None:
    from runtime.config import ConfigError

    with pytest.raises(ConfigError, match="vllm_cpu_reserved_cores must be 'auto' or a whole number"):
        Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_CPU_RESERVED_CORES": "two"})


def test_the_kv_block_size_is_32_on_a_cpu_and_vllms_own_on_a_gpu(tmp_path: Path) -> None:
    from runtime.engine import kv_block_size, vllm_command

    assert kv_block_size("auto", gpu=False) == "32"
    assert kv_block_size("auto", gpu=True) is None
    assert kv_block_size("64", gpu=True) == "64"
    settings = Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_BLOCK_SIZE": "64"})
    cmd = vllm_command(settings, tmp_path, 8000)
    assert cmd[cmd.index("--block-size") + 1] == "64"
    settings = Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_EXTRA_ARGS": "--block-size=96"})
    cmd = vllm_command(settings, tmp_path, 8000)
    assert [a for a in cmd if a.startswith("--block-size")] == ["--block-size=96"]  # the user's own flag wins


def test_a_bad_block_size_is_a_config_error(tmp_path: Path) -> None:
    from runtime.config import ConfigError

    for bad in ("0", "big", "-32"):
        with pytest.raises(ConfigError, match="vllm_block_size must be 'auto' or a whole number"):
            Settings.load({"HONE_HOME": str(tmp_path), "HONE_VLLM_BLOCK_SIZE": bad})


def test_training_threads_follow_the_cores_this_process_may_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import learner.cycle as cycle

    monkeypatch.setattr(cycle, "usable_cores", lambda: 4)  # e.g. a container pinned to 4 of the host's 64 cores
    assert cycle.train_config(Settings.load({"HONE_HOME": str(tmp_path)})).threads == 2  # serving keeps the rest
    monkeypatch.setattr(cycle, "usable_cores", lambda: 1)
    assert cycle.train_config(Settings.load({"HONE_HOME": str(tmp_path)})).threads == 1
    settings = Settings.load({"HONE_HOME": str(tmp_path), "HONE_LEARNER_THREADS": "3"})
    assert cycle.train_config(settings).threads == 3


def test_the_dpo_reference_setting_reaches_the_trainer(tmp_path: Path) -> None:
    import learner.cycle as cycle

    assert cycle.train_config(Settings.load({"HONE_HOME": str(tmp_path)})).reference == "base"
    settings = Settings.load({"HONE_HOME": str(tmp_path), "HONE_DPO_REFERENCE": "parent"})
    assert cycle.train_config(settings).reference == "parent"
