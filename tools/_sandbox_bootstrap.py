"""Child side of tools.python_sandbox: contain this process, then run the model's code.

Executed as ``python -I -B -u _sandbox_bootstrap.py CONFIG_JSON`` in a fresh working directory
holding ``main.py``. Self-contained on purpose (standard library only, nothing from hone): it
runs before any containment exists and must not depend on importable project code.

Order matters. Namespaces and mounts need root (or a user namespace), so they come first; then
resource limits; then the uid drop, after which nothing can be undone; then the audit hook,
installed from a function so that no frame or global the user code can reach refers to it.
"""

from __future__ import annotations

import ast
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import types

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_MOVE = 0x2, 0x4, 0x8, 0x1000, 0x2000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = 38, 4
OPEN_FILES = 64
PUBLIC_DATA = ("/usr/share/zoneinfo",)
MAX_MESSAGE = 2000

BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend",  # arbitrary native calls
    "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",  # unaudited fork/exec
    "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
    "_dbm", "_gdbm", "pwd", "grp", "spwd",  # read files from C, past the "open" event
})
_DENIED = {
    "network access is not allowed": ("socket.",),
    "starting processes is not allowed": (
        "subprocess.", "os.system", "os.exec", "os.fork", "os.posix_spawn", "os.spawn", "pty.",
    ),
    "sending signals is not allowed": ("os.kill",),
    "loading native code is not allowed": (
        "ctypes.", "sqlite3.enable_load_extension", "sqlite3.load_extension",
    ),
    "inspecting the garbage collector is not allowed": ("gc.get_",),
    "changing resource limits is not allowed": ("resource.setrlimit", "resource.prlimit"),
    "changing directory is not allowed": ("os.chdir", "os.chroot"),
    "creating links or device files is not allowed": ("os.link", "os.symlink", "os.mknod"),
    "this is not allowed": ("syslog.", "webbrowser."),
}
# (audit event prefix, why it is refused)
DENIED_EVENTS = tuple((prefix, why) for why, prefixes in _DENIED.items() for prefix in prefixes)
# Path-modifying events -> position of their dir_fd argument (None: the event has none).
PATH_WRITE_EVENTS = {
    "os.mkdir": 2, "os.rmdir": 1, "os.remove": 1, "os.chmod": 2, "os.chown": 3, "os.utime": 3,
    "os.mkfifo": 2, "os.truncate": None, "os.setxattr": None, "os.removexattr": None,
    "os.chflags": None, "os.lchflags": None,
}
PATH_READ_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"})


def main() -> None:
    config = json.loads(sys.argv[1])
    del sys.argv[1:]
    workdir: str = config["workdir"]
    status_fd: int = config["status_fd"]
    script = os.path.join(workdir, "main.py")
    with open(script, encoding="utf-8", errors="surrogatepass") as f:
        source = f.read()
    os.remove(script)  # the code runs from memory; the directory starts out empty
    try:
        layers = contain(config)
    except Exception as exc:  # a layer we rely on failed: refuse to run rather than run weaker
        report(status_fd, {"error": f"containment failed: {exc!r}"[:MAX_MESSAGE]})
        os._exit(70)
    report(status_fd, {"layers": layers})
    sys.exit(run_user_code(source, status_fd))


def contain(config: dict) -> list[str]:
    workdir, uid = config["workdir"], config["uid"]
    is_root = os.geteuid() == 0
    libc = load_libc()
    layers = unshare(libc, is_root)
    mountns = "mountns" in layers
    if mountns:
        mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing below leaks to the host
        expose_python(libc, workdir)
    if is_root and not uid_mapped(uid):
        raise RuntimeError(f"uid {uid} is not mapped in this user namespace (rootless "
                           "container?); map it or run hone as a non-root user")
    if is_root and (blocked := unreachable_python()):
        # Staying root would leave the audit hook as the only barrier: refuse instead.
        raise RuntimeError(f"{blocked} hides the Python installation from uid {uid}; install "
                           "Python somewhere world-readable or run hone as a non-root user")
    owner = uid if is_root else os.getuid()
    if mountns:
        options = f"size={config['disk_bytes']},nr_inodes={config['max_files'] + 16},mode=0700"
        mount(libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"{options},uid={owner},gid={owner}")
        os.chdir(workdir)  # enter the tmpfs that now covers the directory
    elif is_root:
        os.chown(workdir, owner, owner)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes raise OSError instead
    cpu = config["cpu_s"]
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (config["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (config["disk_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (OPEN_FILES,) * 2),
        (resource.RLIMIT_NPROC, (1, 1)),  # counts threads too: this process is all it gets
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)
    layers.append("rlimits")

    if is_root:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("uid drop did not take effect")
        layers.append("uid-nobody")
    if libc is not None:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # other sandboxes under the same uid can't ptrace
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
            layers.append("no-new-privs")
    for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED_MODULES]:
        del sys.modules[name]  # re-importing them goes through the audit hook
    install_guard(workdir, read_roots(), config["max_files"])
    layers.append("audit-hook")
    return layers


def unshare(libc, is_root: bool) -> list[str]:
    """Enter new namespaces where permitted (Docker without privileges permits none)."""
    if libc is None:
        return []
    if is_root and libc.unshare(CLONE_NEWNS | CLONE_NEWNET) == 0:
        return ["netns", "mountns"]
    if is_root and libc.unshare(CLONE_NEWNET) == 0:
        return ["netns"]
    if not is_root and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return ["userns", "netns"]
    return []


def load_libc():  # -> ctypes.CDLL | None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    return libc


def mount(libc, source, target, fstype, flags, data=None) -> None:
    def enc(text):
        return text.encode() if text is not None else None

    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def uid_mapped(uid: int) -> bool:
    """Whether uid exists in this process's user namespace (always, outside containers)."""
    try:
        with open("/proc/self/uid_map") as f:
            ranges = [[int(n) for n in line.split()] for line in f if line.strip()]
    except OSError:
        return True  # no /proc: assume the ordinary, unnamespaced case
    return any(inside <= uid < inside + count for inside, _, count in ranges)


def python_paths() -> list[str]:
    return [os.path.realpath(p) for p in sys.path if p and os.path.exists(p)]


def blocking_dir(path: str) -> str | None:
    """The first directory on the way to (and including) path that 'others' cannot enter."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.isdir(current) and not os.stat(current).st_mode & 0o001:
            return current
    return None


def unreachable_python() -> str | None:
    for path in python_paths():
        if block := blocking_dir(path):
            return block
    return None


def expose_python(libc, workdir: str) -> None:
    """Cover each directory hiding the Python installation from uid nobody (e.g. a 0700 /root
    holding pyenv) with a tmpfs that contains nothing but the installation's own subtree."""
    hidden: dict[str, set[str]] = {}
    for path in python_paths():
        block = blocking_dir(path)
        if block and block != path:  # a closed directory inside the installation can't be fixed
            hidden.setdefault(block, set()).add(path[len(block):].strip("/").split("/")[0])
    for count, (block, children) in enumerate(hidden.items()):
        staged = []
        for index, child in enumerate(sorted(children)):
            stage = os.path.join(workdir, f".stage-{count}-{index}")
            os.mkdir(stage, 0o700)
            mount(libc, os.path.join(block, child), stage, None, MS_BIND | MS_REC)
            staged.append((child, stage))
        mount(libc, "tmpfs", block, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for child, stage in staged:
            os.mkdir(os.path.join(block, child), 0o755)
            mount(libc, stage, os.path.join(block, child), None, MS_MOVE)
            os.rmdir(stage)


def read_roots() -> tuple[str, ...]:
    """Where reads outside the working directory are allowed: the import path and public
    system data the standard library reads (zoneinfo), nothing more."""
    public = [os.path.realpath(p) for p in PUBLIC_DATA if os.path.isdir(p)]
    return tuple(p for p in python_paths() + public if p != "/")


def install_guard(workdir: str, roots: tuple[str, ...], max_files: int) -> None:
    # Everything the hook uses is bound here, as closure variables: user code can rebind
    # builtins and module attributes (os.path.realpath, isinstance, ...) but not these.
    lstat, readlink, stat_fn = os.lstat, os.readlink, os.stat
    from stat import S_ISDIR, S_ISLNK

    str_type, bytes_type, int_type, type_of, len_of = str, bytes, int, type, len
    denied, unavailable = PermissionError, ImportError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    create_flag = os.O_CREAT
    devices = frozenset({"/dev/null", "/dev/urandom", "/dev/random"})
    denied_events, blocked = DENIED_EVENTS, BLOCKED_MODULES
    denied_prefixes = tuple(prefix for prefix, _ in DENIED_EVENTS)
    # Private copies: the module globals are reachable from user code through frames.
    write_events, read_events = dict(PATH_WRITE_EVENTS), frozenset(PATH_READ_EVENTS)
    created = [0]

    def text(path) -> str:
        kind = type_of(path)
        if kind is str_type:
            return path
        if kind is bytes_type:
            return path.decode("utf-8", "surrogateescape")
        raise denied("sandbox: only plain string paths are allowed")

    def resolve(path: str) -> str:
        """Absolute path with '.', '..' and symlinks resolved (like os.path.realpath)."""
        pending = (path if path.startswith("/") else workdir + "/" + path).split("/")[::-1]
        parts: list[str] = []
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            candidate = "/" + "/".join(parts + [part])
            try:
                is_link = S_ISLNK(lstat(candidate).st_mode)
            except OSError:
                is_link = False
            if not is_link:
                parts.append(part)
                continue
            hops += 1
            if hops > 40:
                raise denied("sandbox: too many symbolic links")
            target = readlink(candidate)
            if target.startswith("/"):
                parts = []
            pending.extend(target.split("/")[::-1])
        return "/" + "/".join(parts)

    def under(path: str, root: str) -> bool:
        return path == root or path.startswith(root + "/")

    def in_roots(path: str) -> bool:
        for root in roots:
            if under(path, root):
                return True
        return False

    def check_write(path, creating: bool = False) -> None:
        if type_of(path) is int_type:
            return
        shown = text(path)
        real = resolve(shown)
        if real in devices:
            return
        if not under(real, workdir):
            raise denied(f"sandbox: writing {shown!r} is not allowed; "
                         "use relative paths inside the working directory")
        if creating:
            try:
                lstat(real)
            except OSError:
                created[0] += 1
                if created[0] > max_files:
                    raise denied(f"sandbox: too many files created (limit {max_files})") from None

    def check_read(path, may_be_dir: bool = True) -> None:
        if path is None or type_of(path) is int_type:
            return
        shown = text(path)
        real = resolve(shown)
        if under(real, workdir) or real in devices:
            return
        if in_roots(real):
            try:
                is_dir = S_ISDIR(stat_fn(real).st_mode)
            except OSError:
                is_dir = False
            # A directory fd outside the working directory would make dir_fd-relative opens
            # escape the path check, so only files may be opened there.
            if may_be_dir or not is_dir:
                return
        raise denied(f"sandbox: reading {shown!r} is not allowed; "
                     "only files in the working directory can be read")

    def check_dir_fd(path, dir_fd) -> None:
        # dir_fd-relative paths are resolved against the working directory above, which is
        # only right for a single name component.
        if dir_fd is None or dir_fd == -1:
            return
        name = text(path) if type_of(path) is not int_type else ""
        if "/" in name or name in ("", ".", ".."):
            raise denied("sandbox: dir_fd is only allowed with a plain file name")

    def hook(event: str, args: tuple) -> None:
        if event.startswith(denied_prefixes):
            for prefix, message in denied_events:
                if event.startswith(prefix):
                    raise denied(f"sandbox: {message} ({event})")
        if event == "open":
            path, mode, flags = args
            if type_of(flags) is int_type and flags & write_flags or (
                type_of(mode) is str_type and ("w" in mode or "a" in mode or "x" in mode
                                               or "+" in mode)
            ):
                check_write(path, creating=type_of(flags) is int_type and bool(flags & create_flag))
            else:
                check_read(path, may_be_dir=False)
        elif event == "import":
            name, filename = args[0], args[1]
            if type_of(name) is str_type and name.split(".")[0] in blocked:
                # ImportError, not PermissionError: libraries (numpy imports ctypes) treat a
                # missing optional module as normal and carry on without it.
                raise unavailable(f"sandbox: importing {name} is not allowed")
            if filename is not None and not in_roots(resolve(text(filename))):
                raise denied("sandbox: loading native extensions from outside the Python "
                             "installation is not allowed")
        elif event in write_events:
            check_write(args[0])
            position = write_events[event]
            if position is not None and position < len_of(args):
                check_dir_fd(args[0], args[position])
        elif event == "os.rename":
            check_write(args[0])
            check_write(args[1])
            check_dir_fd(args[0], args[2])
            check_dir_fd(args[1], args[3])
        elif event in read_events:
            check_read(args[0])
        elif event == "sqlite3.connect":
            database = args[0]
            if type_of(database) is str_type and database.startswith("file:"):
                raise denied("sandbox: sqlite URIs are not allowed")
            if database not in (":memory:", b":memory:", ""):
                check_write(database, creating=True)

    sys.addaudithook(hook)


def run_user_code(source: str, status_fd: int) -> int:
    """Run the code as __main__; echo a final bare expression like the REPL does."""
    filename = "main.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("__main__")
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    try:
        tree = ast.parse(source, filename)
        tail = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            tail = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec", dont_inherit=True), module.__dict__)
        if tail is not None:
            value = eval(compile(tail, filename, "eval", dont_inherit=True), module.__dict__)
            if value is not None:
                print(repr(value))
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # the model's bug: report it, don't crash the bootstrap
        report(status_fd, {"exception": describe(exc)})
        try:
            if isinstance(exc, SyntaxError):  # raised by ast.parse: its frames are noise
                lines = traceback.format_exception_only(type(exc), exc)
            else:
                lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            # Frames of this file (run_user_code, the audit hook) are noise to the model.
            own = f'  File "{__file__}"'
            sys.stderr.write("".join(x for x in lines if not x.startswith(own))[-MAX_MESSAGE * 2:])
        except BaseException:
            pass
        return 1


def describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable>"
    name = type(exc).__name__
    return (f"{name}: {message}" if message else name)[:MAX_MESSAGE]


def report(status_fd: int, record: dict) -> None:
    try:
        os.write(status_fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


if __name__ == "__main__":
    main()
