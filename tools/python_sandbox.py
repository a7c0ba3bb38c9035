"""Run model-written Python in a separate, contained process.

The server never executes the code itself. Each run gets a fresh temporary directory, a
minimal environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = that directory) and a new
``python -I -B -u`` process running ``_sandbox_bootstrap.py``, which, before any user code
runs, stacks as many containment layers as the machine allows and reports which took effect:

* ``netns``: a new, empty network namespace (no interfaces up: nothing is reachable), via
  ``unshare(CLONE_NEWNET)`` as root or ``CLONE_NEWUSER|CLONE_NEWNET`` when unprivileged user
  namespaces are enabled (reported as ``userns`` too);
* ``mountns``: as root, a private mount namespace in which the working directory is a small
  ``noexec`` tmpfs (so disk use is capped and dropped native code cannot be mapped) and
  directories that would hide the Python installation from ``nobody`` (e.g. a 0700 ``/root``
  holding pyenv) are covered by a tmpfs that re-exposes only the installation;
* ``uid-nobody``: as root, drop to uid/gid 65534 with no supplementary groups (root ignores
  RLIMIT_NPROC and file permissions, so this is what makes those mean anything);
* ``rlimits``: CPU seconds, address space, file size, open files, processes (1: no forks, no
  threads), no core dumps;
* ``no-new-privs``: ``PR_SET_NO_NEW_PRIVS`` so nothing executed could gain privileges;
* ``audit-hook``: a ``sys.addaudithook`` guard, present in every mode, that refuses sockets,
  process creation and signals, ctypes/cffi and native extensions from outside the Python
  installation, gc object enumeration, writes outside the working directory, and reads outside
  it except the installation's own files. Audit hooks are not a security boundary on their
  own (PEP 578); they are the last line when the OS layers are unavailable.

Namespaces are optional (refused in e.g. unprivileged Docker); the run goes ahead without
them. Staying root is not: if a root server cannot make the child uid 65534 (Python installed
where nobody can read it and no mount namespace to fix that, or 65534 unmapped in a rootless
container), the run is refused with a ``SandboxError`` naming the cause. Run as a non-root
user, the child keeps that uid, and only the hook, the rlimits and (where allowed) user and
network namespaces stand between the code and whatever that user can read.

The parent enforces wall time and output size: it reads stdout/stderr incrementally, and on
either limit kills the process group. ``isolation`` in the result lists the layers the child
confirmed; an empty list means the bootstrap never got that far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BOOTSTRAP = Path(__file__).with_name("_sandbox_bootstrap.py")
SANDBOX_UID = 65534  # "nobody"
_READ_CHUNK = 4096
_STATUS_MAX_BYTES = 65536
_KILL_GRACE_S = 5.0
_EXCEPTION_MAX_CHARS = 2000


@dataclass
class SandboxLimits:
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512
    output_bytes: int = 16_384  # stdout and stderr together
    disk_mb: int = 16  # largest file, and the whole working directory where a tmpfs is possible
    max_files: int = 256  # files the code may create (bounds disk use without a tmpfs)


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exception: str | None  # "Type: message" of what the code raised, or why it was stopped
    exit_code: int | None  # negative: killed by that signal
    timed_out: bool
    truncated: bool
    duration_s: float
    isolation: list[str] = field(default_factory=list)


async def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run code in a fresh sandboxed process; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    workdir = Path(tempfile.mkdtemp(prefix="hone-py-")).resolve()
    status_read, status_write = os.pipe()
    started = time.monotonic()
    try:
        (workdir / "main.py").write_text(code, encoding="utf-8", errors="surrogatepass")
        config = {
            "workdir": str(workdir),
            "status_fd": status_write,
            "uid": SANDBOX_UID,
            "cpu_s": max(1, int(limits.cpu_s + 0.999)),  # RLIMIT_CPU counts whole seconds
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "disk_bytes": limits.disk_mb * 1024 * 1024,
            "max_files": limits.max_files,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-B", "-u", str(BOOTSTRAP), json.dumps(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=_child_env(workdir),
            start_new_session=True,  # own process group, so a kill reaches everything it started
            pass_fds=(status_write,),
        )
        os.close(status_write)
        status_write = -1
        output = _Output(limits.output_bytes, process)
        timed_out = False
        try:
            await asyncio.wait_for(_drain(process, output), timeout=limits.wall_s)
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            await _kill(process)
        status = _read_status(status_read)
        return _result(process, output, status, limits, timed_out, time.monotonic() - started)
    finally:
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_python_sync(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Blocking wrapper; safe to call from inside a running event loop's thread as well."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_python(code, limits))
    # asyncio.run() refuses to nest, so use a private loop in a helper thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run_python(code, limits)).result()


def format_result(result: SandboxResult) -> str:
    """The text the model sees for one run."""
    parts: list[str] = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    stderr = result.stderr.rstrip("\n")
    if stderr:
        parts.append(f"stderr:\n{stderr}")
    if result.exception and not _mentions(stderr, result.exception):
        parts.append(f"error: {result.exception}")
    if result.truncated:
        parts.append("[output truncated: the code printed too much; print less]")
    if result.timed_out and not result.exception:
        parts.append("[stopped: time limit exceeded]")
    elif result.exit_code not in (0, None) and not (
        result.exception or result.timed_out or result.truncated
    ):
        parts.append(f"[exit code {result.exit_code}]")
    if not parts:
        return (
            "(no output: the code ran without errors but printed nothing; "
            "use print() to show results)"
        )
    return "\n".join(parts)


def _mentions(stderr: str, exception: str) -> bool:
    """Whether the traceback in stderr already ends with this exception (type and message)."""
    last = stderr.rsplit("\n", 1)[-1]
    kind = exception.split(":", 1)[0]
    return last == exception or (bool(kind) and last.split(":", 1)[0] == kind)


# ---- parent-side plumbing ----
class _Output:
    """Collects stdout/stderr under one byte budget; kills the process when it is exceeded."""

    def __init__(self, budget: int, process: asyncio.subprocess.Process) -> None:
        self.budget = budget
        self.process = process
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.truncated = False

    def add(self, name: str, chunk: bytes) -> None:
        """Keep what fits the budget; on the first overflow kill the writer."""
        keep = chunk[: self.budget]
        self.chunks[name].append(keep)
        self.budget -= len(keep)
        if len(keep) < len(chunk) and not self.truncated:
            self.truncated = True
            _killpg(self.process)  # stop the writer now instead of reading what we would drop

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode("utf-8", errors="replace")


async def _drain(process: asyncio.subprocess.Process, output: _Output) -> None:
    async def pump(name: str, stream: asyncio.StreamReader | None) -> None:
        # Read to EOF even past the budget (the writer is dead by then, so that is at most a
        # pipe buffer): asyncio only reports the exit once both pipes are closed.
        if stream is not None:
            while chunk := await stream.read(_READ_CHUNK):
                output.add(name, chunk)

    await asyncio.gather(pump("stdout", process.stdout), pump("stderr", process.stderr))
    await process.wait()


def _killpg(process: asyncio.subprocess.Process) -> None:
    # Only while the leader is unreaped: after that its pid, which is the group id
    # (start_new_session), may be reused. Forks are refused, so no other members can remain.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


async def _kill(process: asyncio.subprocess.Process) -> None:
    _killpg(process)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(process.wait(), timeout=_KILL_GRACE_S)
    # Read what is left to EOF (at most a pipe buffer, the writer is dead): asyncio closes the
    # subprocess transport only once both pipes are closed, and a transport left open is
    # finalized later, possibly after its event loop is gone.
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_discard(stream), timeout=_KILL_GRACE_S)


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(_READ_CHUNK * 16):
        pass


def _read_status(fd: int) -> dict[str, object]:
    """Merge the JSON lines the bootstrap wrote to the status pipe (bounded, non-blocking).

    The user code inherits this pipe and could append lines of its own; the bootstrap writes
    "layers" before any user code runs, so the first "layers" line is the one believed.
    """
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while len(data) < _STATUS_MAX_BYTES and (chunk := os.read(fd, _STATUS_MAX_BYTES)):
            data += chunk
    status: dict[str, object] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                for key, value in record.items():
                    if key not in ("layers", "error") or key not in status:
                        status[key] = value
    return status


def _child_env(workdir: Path) -> dict[str, str]:
    # Nothing is inherited: the server's secrets (API tokens, HONE_ADMIN_TOKEN) stay out.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        # The sandbox gets no threads (RLIMIT_NPROC=1): keep numeric libraries from trying.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


def _result(
    process: asyncio.subprocess.Process,
    output: _Output,
    status: dict[str, object],
    limits: SandboxLimits,
    timed_out: bool,
    duration: float,
) -> SandboxResult:
    code = process.returncode
    exception = status.get("exception")
    exception = str(exception)[:_EXCEPTION_MAX_CHARS] if exception else None
    layers = status.get("layers")
    isolation = [str(layer) for layer in layers] if isinstance(layers, list) else []
    if timed_out:
        exception = f"TimeoutError: wall time limit of {limits.wall_s:g} s exceeded"
    elif code == -signal.SIGXCPU:  # RLIMIT_CPU's soft limit
        timed_out = True
        exception = f"TimeoutError: CPU time limit of {limits.cpu_s:g} s exceeded"
    elif code is not None and code < 0 and not output.truncated and exception is None:
        # SIGKILL we did not send: RLIMIT_CPU's hard limit (SIGXCPU ignored) or the OOM killer.
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        exception = f"killed by signal {name} (CPU or memory limit)"
    elif "error" in status and exception is None:
        exception = f"SandboxError: {status['error']}"
    elif not isolation and exception is None and code != 0:
        exception = "SandboxError: the sandbox failed to start"
    return SandboxResult(
        stdout=output.text("stdout"),
        stderr=output.text("stderr"),
        exception=exception,
        exit_code=code,
        timed_out=timed_out,
        truncated=output.truncated,
        duration_s=round(duration, 3),
        isolation=isolation,
    )
