"""learner.train_process: training in a child process returns the trainer's result, its progress
and its errors, and a child killed by the kernel fails the cycle with a reason instead of the
learner; a child never outlives a stopping or dead learner. Real processes (spawn), the real trainer
on the prepared SmolLM2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from learner.train import TrainConfig, TrainingError
from learner.train_process import train_adapter_isolated
from tests.test_dpo import _real_pairs
from tests.test_model import needs_gguf


def _killed_by_the_kernel(events, model_dir, pairs, cfg, out_dir, parent, progress, snapshots, retain) -> None:
    events.put(("step", {"step": 1, "of": 9}))
    events.close()
    events.join_thread()  # flushed, as a step reported long before the kill would be (put is asynchronous)
    Path(out_dir).parent.joinpath(f".{Path(out_dir).name}.tmp-{os.getpid()}").mkdir(parents=True)  # mid-save
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does


def _exits(events, *args) -> None:
    os._exit(3)


def _trains_for_ten_minutes(events, model_dir, pairs, cfg, out_dir, *rest) -> None:
    Path(out_dir).parent.joinpath(f".{Path(out_dir).name}.tmp-{os.getpid()}").mkdir(parents=True)  # mid-save
    Path(out_dir).parent.joinpath("child.pid").write_text(str(os.getpid()))
    time.sleep(600)


def _child_pid(folder: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while not (folder / "child.pid").exists():
        assert time.monotonic() < deadline, "the training child never started"
        time.sleep(0.1)
    return int((folder / "child.pid").read_text())


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def _kill_if_left(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@needs_gguf
def test_child_training_returns_the_result_progress_and_errors(tmp_path: Path) -> None:
    from tests.integration_support import prepared_model

    model_dir = prepared_model()
    pairs = _real_pairs(model_dir)
    steps: list[dict] = []
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=1, lora_rank=4, lora_alpha=8, threads=2)
    result = train_adapter_isolated(model_dir, pairs, cfg, tmp_path / "hone-v1", on_step=steps.append,
                                    snapshots={1: tmp_path / "hone-v1-e1"})
    assert result.path == tmp_path / "hone-v1" and (result.path / "adapter_model.safetensors").is_file()
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and result.counts["pairs_used"] == 2
    [snapshot] = result.snapshots  # the earlier epoch's adapter comes back from the child too
    assert snapshot.epoch == 1 and (snapshot.path / "adapter_model.safetensors").is_file()
    assert result.metrics["peak_rss_mb"] > 0  # the child's own peak, reported back

    with pytest.raises(TrainingError, match="max_length=10"):  # the trainer's own error, as raised in the child
        train_adapter_isolated(model_dir, pairs, TrainConfig(max_length=10), tmp_path / "hone-v2")


def test_a_killed_child_fails_with_a_reason_and_leaves_no_partial_adapter(tmp_path: Path) -> None:
    steps: list[dict] = []
    with pytest.raises(TrainingError, match="killed by SIGKILL.*out-of-memory"):
        train_adapter_isolated("m", [], TrainConfig(), tmp_path / "hone-v3", on_step=steps.append,
                               _target=_killed_by_the_kernel)
    assert steps == [{"step": 1, "of": 9}]
    assert not list(tmp_path.iterdir())


def test_other_child_failures_name_what_happened(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="AttributeError: 'str' object has no attribute"):
        train_adapter_isolated("m", ["not a pair"], TrainConfig(), tmp_path / "a")  # raised inside the trainer
    with pytest.raises(TrainingError, match="exited with code 3"):
        train_adapter_isolated("m", [], TrainConfig(), tmp_path / "b", _target=_exits)


def test_a_stopping_learner_kills_its_training_child_at_once(tmp_path: Path) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (_child_pid(tmp_path), stop.set()), daemon=True).start()
    with pytest.raises(TrainingError, match="training stopped: the learner is shutting down"):
        train_adapter_isolated("m", [], TrainConfig(), tmp_path / "hone-v4", stop=stop,
                               _target=_trains_for_ten_minutes)
    pid = _child_pid(tmp_path)
    try:
        assert _exited(pid)  # at return, not ten minutes later
        assert not list(tmp_path.glob(".hone-v4.tmp-*"))  # nothing half-saved left behind
    finally:
        _kill_if_left(pid)


def test_a_training_child_whose_learner_died_exits_on_its_own(tmp_path: Path) -> None:
    """SIGKILL reaches the learner only (an OOM kill, `kill -9`): its child must not train on for nobody."""
    script = ("import sys\n"
              "from learner.train import TrainConfig\n"
              "from learner.train_process import train_adapter_isolated\n"
              "from tests.test_train_process import _trains_for_ten_minutes\n"
              "train_adapter_isolated('m', [], TrainConfig(), sys.argv[1], _target=_trains_for_ten_minutes)\n")
    learner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "hone-v5")],
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        pid = _child_pid(tmp_path)
    finally:
        learner.kill()
        learner.wait()
    try:
        deadline = time.monotonic() + 15
        while not _exited(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _exited(pid)
    finally:
        _kill_if_left(pid)
