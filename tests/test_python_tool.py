"""The python tool: real sandboxed subprocesses, normal use, and attacks that must be contained."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tools.python_sandbox import (
    SandboxLimits,
    SandboxResult,
    format_result,
    run_python,
    run_python_sync,
)

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
FAST = SandboxLimits(cpu_s=1, wall_s=4, memory_mb=256, output_bytes=4096, disk_mb=4)


def run(code: str, limits: SandboxLimits = FAST) -> SandboxResult:
    return run_python_sync(code, limits)


def _can_unshare_network() -> bool:
    """Whether this machine lets a process enter a new network namespace (probed in a child)."""
    flags = "0x40000000" if IS_ROOT else "0x50000000"  # CLONE_NEWNET (| CLONE_NEWUSER)
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


def _sandbox_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"_sandbox_bootstrap" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ---- normal use ----
def test_libraries_with_optional_native_parts_still_import() -> None:
    # numpy imports ctypes only if it can: a blocked import must look like a missing module.
    result = run("import numpy as np\nprint(np.arange(10).sum(), np.linalg.inv(np.eye(2)))")
    assert result.exception is None, result.stderr
    assert result.stdout.startswith("45 [[1. 0.]")


def test_prints_and_common_imports_work() -> None:
    result = run(
        "import math, fractions, statistics, itertools, collections, datetime, json, re, decimal\n"
        "print(math.factorial(10), fractions.Fraction(1, 3) + fractions.Fraction(1, 6))\n"
        "print(statistics.median([3, 1, 2]), list(itertools.accumulate([1, 2, 3])))\n"
        "print(collections.Counter('aab').most_common(1), json.dumps({'a': [1, 2]}))\n"
        "print(datetime.datetime.strptime('2024-02-29', '%Y-%m-%d').strftime('%A'))\n"
        "print(re.findall(r'\\d+', 'a1b22'), decimal.Decimal('0.1') + decimal.Decimal('0.2'))\n"
    )
    assert result.exception is None, result.stderr
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "3628800 1/2",
        "2 [1, 3, 6]",
        "[('a', 2)] {\"a\": [1, 2]}",
        "Thursday",
        "['1', '22'] 0.3",
    ]
    assert format_result(result) == result.stdout.rstrip("\n")


def test_last_expression_is_echoed_like_a_repl() -> None:
    assert run("x = 6\nx * 7").stdout == "42\n"
    assert run("print('once')").stdout == "once\n"  # print() returns None: nothing extra


def test_no_output_hint() -> None:
    result = run("x = 1")
    assert result.stdout == "" and result.exception is None
    assert "printed nothing" in format_result(result) and "print()" in format_result(result)


def test_exception_is_reported_with_type_and_message() -> None:
    result = run("def f(d):\n    return d['missing']\nf({})")
    assert result.exception == "KeyError: 'missing'"
    assert result.exit_code == 1
    assert 'File "main.py", line 2, in f' in result.stderr
    assert "_sandbox_bootstrap" not in result.stderr  # no runner frames shown to the model
    text = format_result(result)
    assert "KeyError: 'missing'" in text and text.count("KeyError") == 1


def test_syntax_error() -> None:
    result = run("print('a'\nx = ")
    assert result.exception is not None and result.exception.startswith("SyntaxError:")
    assert "main.py" in result.stderr


def test_exit_code_and_unicode() -> None:
    result = run("print('héllo ✓')\nraise SystemExit(3)")
    assert result.stdout == "héllo ✓\n"
    assert result.exit_code == 3 and result.exception is None
    assert "[exit code 3]" in format_result(result)


def test_each_run_gets_a_fresh_directory_that_is_removed() -> None:
    first = run("import os\nopen('note.txt', 'w').write('hi')\nprint(os.getcwd())")
    workdir = Path(first.stdout.strip())
    assert first.exception is None
    assert not workdir.exists()
    second = run("import os\nprint(os.listdir('.'))")
    assert second.stdout == "[]\n"


def test_files_inside_the_working_directory_work() -> None:
    code = (
        "import os, json\n"
        "os.makedirs('data/sub')\n"
        "json.dump({'a': 1}, open('data/sub/x.json', 'w'))\n"
        "print(json.load(open('data/sub/x.json')), sorted(os.listdir('data')))\n"
        "os.remove('data/sub/x.json')\n"
    )
    result = run(code)
    assert result.stdout == "{'a': 1} ['sub']\n", result.stderr


# ---- which containment layers are active, each checked on its own ----
def test_isolation_layers_are_reported_and_real() -> None:
    code = (
        "import os, resource\n"
        "print(os.getuid(), os.getgid(), os.getgroups())\n"
        "print(resource.getrlimit(resource.RLIMIT_NPROC), resource.getrlimit(resource.RLIMIT_AS))\n"
        "print(os.readlink('/proc/self/ns/net'))\n"
        "st = os.statvfs('.')\n"
        "print(st.f_blocks * st.f_frsize)\n"
    )
    result = run(code)
    assert result.exception is None, result.stderr
    ids, limits, netns, disk = result.stdout.splitlines()
    assert "audit-hook" in result.isolation and "rlimits" in result.isolation
    assert limits == f"(1, 1) ({256 * 2**20}, {256 * 2**20})"
    if IS_ROOT:
        assert "uid-nobody" in result.isolation
        assert ids == "65534 65534 []"
    has_netns = _can_unshare_network()
    assert ("netns" in result.isolation) == has_netns
    if has_netns:
        assert netns != os.readlink("/proc/self/ns/net")
    if "mountns" in result.isolation:
        assert int(disk) == FAST.disk_mb * 2**20  # the working directory is the capped tmpfs


# ---- files ----
@pytest.mark.parametrize(
    "code",
    [
        "print(open('/etc/passwd').read())",
        "print(open('../../../../etc/passwd').read())",
        "import os\nprint(os.read(os.open('/etc/passwd', os.O_RDONLY), 100))",
        "import pathlib\nprint(pathlib.Path('/etc/passwd').read_text())",
        "import shutil\nshutil.copy('/etc/passwd', 'copy')\nprint(open('copy').read())",
        "import os\nos.symlink('/etc/passwd', 'link')\nprint(open('link').read())",
        "import os\nprint(os.listdir('/etc'))",
        "print(open('/proc/self/environ').read())",
    ],
)
def test_cannot_read_outside_the_working_directory(code: str) -> None:
    result = run(code)
    assert result.exception is not None and "PermissionError" in result.exception
    assert "root:" not in result.stdout and "passwd" not in result.stdout


def test_cannot_read_the_servers_files() -> None:
    for target in (Path(__file__), REPO / "pyproject.toml", REPO / "tools" / "storage.py"):
        result = run(f"print(open({str(target)!r}).read())")
        assert result.exception is not None and "not allowed" in result.exception
        assert result.stdout == ""


@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('x')",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
        "import pathlib\npathlib.Path({path!r}).write_text('x')",
        "import os\nos.mkdir({path!r})",
        "import os\nopen('f', 'w').close()\nos.rename('f', {path!r})",
    ],
)
def test_cannot_write_outside_the_working_directory(template: str) -> None:
    # /tmp is world-writable, so file permissions alone would not stop this write.
    target = Path(tempfile.gettempdir()) / f"hone-sandbox-escape-{uuid.uuid4().hex}"
    try:
        result = run(template.format(path=str(target)))
        assert result.exception is not None and "not allowed" in result.exception
        assert not target.exists()
    finally:
        if target.is_dir():
            target.rmdir()
        elif target.exists():
            target.unlink()


def test_disk_use_is_capped() -> None:
    result = run("open('big', 'wb').write(b'x' * (8 * 2**20))")
    assert result.exception is not None and "OSError" in result.exception


def test_native_code_cannot_be_loaded() -> None:
    code = (
        "import importlib.machinery, importlib.util, math, shutil\n"
        "shutil.copy(math.__file__, 'evil.so')\n"
        "loader = importlib.machinery.ExtensionFileLoader('math', 'evil.so')\n"
        "spec = importlib.util.spec_from_loader('math', loader)\n"
        "importlib.util.module_from_spec(spec)\n"
    )
    result = run(code)
    assert result.exception is not None and "native extensions" in result.exception
    for code in ("import ctypes", "import _ctypes", "import cffi", "import gc\ngc.get_objects()"):
        assert "not allowed" in (run(code).exception or ""), code


def test_guard_survives_tampering_with_globals_and_builtins() -> None:
    code = (
        "import sys, builtins, os.path\n"
        "g = sys._getframe(1).f_globals\n"
        "g['PATH_WRITE_EVENTS'].clear(); g['DENIED_EVENTS'] = ()\n"
        "builtins.type = lambda x: str; builtins.len = lambda x: 0\n"
        "os.path.realpath = lambda p, **k: os.getcwd()\n"
        "print(open('/etc/passwd').read())\n"
    )
    result = run(code)
    assert result.exception is not None and "not allowed" in result.exception
    assert "root:" not in result.stdout


# ---- network ----
def test_cannot_connect_to_a_local_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        for code in (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "print('connected')",
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'x', ('127.0.0.1', {port}))\nprint('sent')",
            "import urllib.request\nprint(urllib.request.urlopen('http://example.com').read())",
        ):
            result = run(code)
            assert result.exception is not None, result.stdout
            assert "connected" not in result.stdout and "sent" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected


# ---- processes ----
@pytest.mark.parametrize(
    "code",
    [
        "import os\nwhile True:\n    os.fork()",
        "import subprocess\nsubprocess.run(['echo', 'escaped'])",
        "import os\nos.system('echo escaped')",
        "import os\nos.execv('/bin/echo', ['echo', 'escaped'])",
        "import os\nos.posix_spawn('/bin/echo', ['echo', 'escaped'], {})",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import pty\npty.spawn('/bin/sh')",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    ],
)
def test_cannot_start_processes_or_signal(code: str) -> None:
    result = run(code)
    assert result.exception is not None
    assert "escaped" not in result.stdout
    assert result.duration_s < 3
    assert _sandbox_processes() == []


def test_threads_are_refused() -> None:
    result = run("import threading\nthreading.Thread(target=print).start()")
    if "uid-nobody" not in result.isolation:
        pytest.skip("RLIMIT_NPROC is only certain to bind for the dedicated sandbox uid")
    assert result.exception == "RuntimeError: can't start new thread"


# ---- resources ----
@pytest.mark.parametrize(
    "code",
    [
        "x = bytearray(10**10)",
        "x = 'a' * 10**10",
        "x = []\nwhile True:\n    x.append(bytearray(10**6))",
    ],
)
def test_memory_bombs_fail_with_memory_error(code: str) -> None:
    result = run(code)
    assert result.exception is not None and result.exception.startswith("MemoryError")
    assert result.duration_s < 3


def test_cpu_bound_loop_hits_the_cpu_limit() -> None:
    result = run("print('started')\nwhile True:\n    pass", SandboxLimits(cpu_s=1, wall_s=10))
    assert result.timed_out
    assert result.exception is not None and "CPU time limit" in result.exception
    assert result.stdout == "started\n"  # output before the kill is kept (unbuffered child)
    assert result.duration_s < 5


def test_sleeping_code_hits_the_wall_limit() -> None:
    start = time.monotonic()
    result = run("import time\nprint('waiting')\ntime.sleep(60)", SandboxLimits(wall_s=1.5))
    assert time.monotonic() - start < 4
    assert result.timed_out and result.exit_code is not None and result.exit_code < 0
    assert result.exception is not None and "wall time limit of 1.5 s" in result.exception
    assert result.stdout == "waiting\n"
    assert "time limit" in format_result(result)
    assert _sandbox_processes() == []


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    print('x' * 100)",
        "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)",
        "print('z' * 10**7)",
    ],
)
def test_output_flood_is_truncated_promptly(code: str) -> None:
    result = run(code, SandboxLimits(cpu_s=5, wall_s=10, output_bytes=2048))
    assert result.truncated and not result.timed_out
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= 2048
    assert result.duration_s < 3
    assert "truncated" in format_result(result)


# ---- secrets ----
def test_parent_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hone-admin-s3cr3t-7f1c"
    monkeypatch.setenv("HONE_ADMIN_TOKEN", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        "try:\n"
        "    print(open(f'/proc/{os.getppid()}/environ').read())\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    result = run(code)
    assert secret not in result.stdout + result.stderr
    assert "HONE_ADMIN_TOKEN" not in result.stdout
    assert result.stdout.splitlines()[-1] == "PermissionError"


# ---- async behaviour ----
async def test_runs_do_not_block_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    results = await asyncio.gather(
        *(run_python("import time\ntime.sleep(1)\nprint('done')", FAST) for _ in range(2))
    )
    elapsed = time.monotonic() - start
    task.cancel()
    assert [r.stdout for r in results] == ["done\n", "done\n"]
    assert elapsed < 1.9  # the two runs overlapped
    assert ticks >= 10  # and the loop kept running meanwhile


async def test_sync_wrapper_works_inside_a_running_loop() -> None:
    assert run_python_sync("print(1 + 1)", FAST).stdout == "2\n"


# ---- the text the model sees ----
def _result(**changes: object) -> SandboxResult:
    base = dict(stdout="", stderr="", exception=None, exit_code=0, timed_out=False,
                truncated=False, duration_s=0.1, isolation=[])
    base.update(changes)
    return SandboxResult(**base)  # type: ignore[arg-type]


def test_format_result() -> None:
    assert format_result(_result(stdout="42\n")) == "42"
    assert "print()" in format_result(_result())
    text = format_result(_result(stdout="partial\n", exception="TimeoutError: wall time limit "
                                 "of 2 s exceeded", timed_out=True, exit_code=-9))
    assert text == "partial\nerror: TimeoutError: wall time limit of 2 s exceeded"
    text = format_result(_result(stderr="Traceback ...\nValueError: bad", exception="ValueError: "
                                 "bad", exit_code=1))
    assert text == "stderr:\nTraceback ...\nValueError: bad"
    text = format_result(_result(stdout="x" * 10, truncated=True, exit_code=-9))
    assert text == "xxxxxxxxxx\n[output truncated: the code printed too much; print less]"
    assert format_result(_result(exit_code=2)) == "[exit code 2]"
