"""Hardened execution of model-written programs (Python and C++) under bubblewrap.

Model output is hostile input. Every run gets, from Debian's ``bubblewrap`` (``bwrap``):

* fresh **user, PID, network, IPC, UTS and cgroup namespaces** (``--unshare-all``); no network
  interface but a downed loopback, so even ``127.0.0.1`` of the host is unreachable;
* a **non-root uid** (65534) inside, and when the host caller is root, ``bwrap`` itself is started
  as host uid 65534 too: the kernel exempts uid 0 from ``RLIMIT_NPROC``, a non-root host uid is
  what makes the process limit bite (fork bombs) even on a CI machine running as root;
* a **read-only host view** limited to ``/usr`` (plus the ``/bin``, ``/lib*`` links and the
  dynamic-linker cache) on a read-only root, fresh size-capped writable tmpfs at ``/tmp`` (the
  working directory) and ``/dev/shm``, the program at ``/box`` read-only, a private ``/proc``
  and a minimal read-only ``/dev``;
* a **scrubbed environment** (``--clearenv``; only ``PATH``, ``HOME``, ``LANG`` are set);
* **rlimits** set inside the namespace by ``prlimit`` just before the program is exec'd: CPU time,
  address space, file size, open files, process count, no core dumps. ``RLIMIT_NPROC`` counts
  per user namespace, so parallel sandboxes do not share one budget;
* a **wall-clock kill of the whole namespace**: SIGKILL to the namespace's init, which makes the
  kernel kill every process in it; ``--die-with-parent`` covers a dying host process;
* **capped output**: reading stops at ``Limits.output_bytes`` per stream and the run is killed.

Statuses: ``ok`` (exit 0), ``runtime_error``, ``timeout`` (wall clock or CPU), ``memory_limit``,
``output_limit``, ``compile_error``, ``sandbox_error`` (the sandbox itself failed to start).
``reason`` always says what happened in words.

:func:`run_command` runs an arbitrary command with a caller's host directory bound (writable or
read-only) at a chosen mount point and working directory, under the same limits: the agentic
tools (``cascade_jax.agentic.tools``) bind a per-episode copy of a repository writable at
``/repo`` (made writable for the sandbox uid by :func:`sandbox_owned`).

Total memory is bounded by ``processes x memory_bytes`` (address space is a per-process limit;
there is no cgroup here) plus ``2 x tmp_bytes`` (``/tmp`` and ``/dev/shm``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

__all__ = [
    "Limits", "Result", "SandboxUnavailable", "Prepared", "prepare", "run", "run_prepared",
    "available", "DEFAULT_LIMITS", "COMPILE_LIMITS", "LANGUAGES", "SANDBOX_UID", "run_command",
    "python_command", "sandbox_owned",
]

SANDBOX_UID = 65534  # "nobody" on Debian; used inside the namespace and as host uid when root
TMP_PREFIX = "cascade-sbx-"  # host directories holding programs (tests make it unique to track runs)
LANGUAGES = ("python", "cpp")


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or prlimit) is missing, so model-written code cannot be run safely."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    ``cpu_s`` is RLIMIT_CPU (SIGXCPU at the soft limit, SIGKILL one second later); ``wall_s`` is
    the host-side wall clock after which the whole namespace is killed; ``memory_bytes`` is
    RLIMIT_AS per process; ``processes`` is RLIMIT_NPROC inside the namespace (the sandbox's init
    counts as one); ``output_bytes`` caps stdout and stderr each; ``tmp_bytes`` sizes ``/tmp``.
    """

    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 512 << 20
    file_size_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 8
    output_bytes: int = 1 << 20
    tmp_bytes: int = 64 << 20

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"Limits.{f.name}: must be a positive number, got {v!r}")


DEFAULT_LIMITS = Limits()
COMPILE_LIMITS = Limits(wall_s=60.0, cpu_s=45, memory_bytes=2 << 30, file_size_bytes=128 << 20,
                        processes=16, output_bytes=64 << 10, tmp_bytes=512 << 20)


@dataclasses.dataclass(frozen=True)
class Result:
    """Outcome of one sandboxed run. ``exit_code`` is ``None`` when the host killed the run,
    128+N when the program died of signal N. ``memory_bytes`` is the peak resident set size."""

    status: str
    stdout: str
    stderr: str
    exit_code: Optional[int]
    time_s: float
    memory_bytes: int
    reason: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------
# Host tools


def _which(tool: str) -> Optional[str]:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")


def available() -> bool:
    """True when ``bwrap`` and ``prlimit`` are installed."""
    return _which("bwrap") is not None and _which("prlimit") is not None


def _require_tools() -> tuple[str, str]:
    bwrap, prlimit = _which("bwrap"), _which("prlimit")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (`bwrap`) is not installed, so model-written code cannot be run safely; "
            "install Debian's `bubblewrap` package (launch/setup_env.sh does this)")
    if prlimit is None:
        raise SandboxUnavailable("`prlimit` (util-linux) is not installed; the sandbox needs it "
                                 "to set resource limits inside the namespace")
    return bwrap, prlimit


def _python_interpreter() -> str:
    """Interpreter for Python programs: ``$CASCADE_SANDBOX_PYTHON``, else the system ``python3``
    (readable by the unprivileged sandbox uid), else this process's own interpreter."""
    env = os.environ.get("CASCADE_SANDBOX_PYTHON")
    if env:
        return env
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        p = os.path.join(d, "python3")
        if os.access(p, os.X_OK):
            return os.path.realpath(p)
    return os.path.realpath(sys.executable)


def _cxx_compiler() -> str:
    return os.environ.get("CASCADE_SANDBOX_CXX") or _which("g++") or "g++"


# --------------------------------------------------------------------------------------------
# Preparing a program


@dataclasses.dataclass
class Prepared:
    """A program ready to run many times (C++ already compiled). Use as a context manager or call
    :meth:`close` to delete its directory. ``error`` is a compile_error/sandbox_error ``Result``
    when preparation failed (then every run returns it)."""

    language: str
    directory: str
    argv: tuple[str, ...]
    error: Optional[Result] = None
    extra_ro: tuple[str, ...] = ()  # host directories bound read-only (an interpreter outside /usr)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_uid() -> Optional[int]:
    """Host uid ``bwrap`` runs as: drop root to SANDBOX_UID, otherwise keep the caller's uid."""
    return SANDBOX_UID if os.geteuid() == 0 else None


def prepare(program: str, *, language: str, compile_limits: Limits = COMPILE_LIMITS) -> Prepared:
    """Write ``program`` into a fresh directory and, for C++, compile it inside the sandbox."""
    if language not in LANGUAGES:
        raise ValueError(f"language: must be one of {LANGUAGES}, got {language!r}")
    if not isinstance(program, str):
        raise TypeError(f"program: expected str, got {type(program).__name__}")
    _require_tools()
    d = tempfile.mkdtemp(prefix=TMP_PREFIX)
    os.chmod(d, 0o755)
    uid = _host_uid()
    if uid is not None:
        os.chown(d, uid, uid)
    name = "prog.py" if language == "python" else "prog.cpp"
    with open(os.path.join(d, name), "w", encoding="utf-8") as f:
        f.write(program)
    os.chmod(os.path.join(d, name), 0o644)
    if language == "python":
        interp, extra = python_command()
        return Prepared(language, d, (*interp, "-I", "-S", "-B", "/box/prog.py"), extra_ro=extra)
    compile_argv = (_cxx_compiler(), "-O2", "-std=gnu++17", "-pipe", "-o", "/box/prog",
                    "/box/prog.cpp")
    res = _execute(d, compile_argv, b"", compile_limits, writable_box=True)
    prepared = Prepared(language, d, ("/box/prog",))
    if res.status != "ok":
        status = "sandbox_error" if res.status == "sandbox_error" else "compile_error"
        errors = [ln.strip() for ln in res.stderr.splitlines() if "error" in ln]
        detail = errors[0][:300] if errors else res.reason
        prepared.error = dataclasses.replace(
            res, status=status, reason=f"compilation failed ({res.status}): {detail}")
    return prepared


def run_prepared(prepared: Prepared, stdin: str = "", limits: Optional[Limits] = None) -> Result:
    """Run an already prepared program once with ``stdin``."""
    if prepared.error is not None:
        return prepared.error
    return _execute(prepared.directory, prepared.argv, stdin.encode("utf-8"),
                    limits or DEFAULT_LIMITS, writable_box=False, extra_ro=prepared.extra_ro)


def run(program: str, *, language: str, stdin: str = "", limits: Optional[Limits] = None) -> Result:
    """Run ``program`` (``language`` in ``"python"``, ``"cpp"``) once in the sandbox.

    >>> run("print(input()[::-1])", language="python", stdin="abc").stdout
    'cba\\n'
    """
    with prepare(program, language=language) as p:
        return run_prepared(p, stdin, limits)


def python_command() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(argv prefix, extra read-only binds)`` that run the sandbox's Python interpreter
    (:func:`_python_interpreter`; an interpreter outside ``/usr`` has its prefix bound)."""
    interp = _python_interpreter()
    extra: tuple[str, ...] = ()
    if not interp.startswith("/usr/"):
        prefix = os.path.dirname(os.path.dirname(interp))  # .../bin/python3 -> ...
        if prefix in ("", "/"):
            raise SandboxUnavailable(f"refusing to expose {prefix!r} for interpreter {interp}")
        extra = (prefix,)
    return (interp,), extra


def sandbox_owned(path: str) -> None:
    """Give ``path`` (recursively) to the uid the sandbox writes as, so a writable bind of it is
    writable inside: :data:`SANDBOX_UID` when the caller is root, else nothing to do."""
    uid = _host_uid()
    if uid is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def run_command(argv: tuple[str, ...], *, directory: str, writable: bool = True,
                mount: str = "/box", chdir: Optional[str] = None, stdin: str = "",
                limits: Optional[Limits] = None, extra_ro: tuple[str, ...] = (),
                ro_binds: tuple = ()) -> Result:
    """Run ``argv`` in the sandbox with the host ``directory`` bound at ``mount`` (writable when
    ``writable``: the caller's per-run copy, see :func:`sandbox_owned`), working directory
    ``chdir`` (default ``mount``); everything else as :func:`run` (limits, namespaces, statuses).
    ``extra_ro``: more host directories bound read-only at the same path (outside ``/tmp``);
    ``ro_binds``: ``((host directory, mount point), ...)`` bound read-only after ``/tmp``."""
    if not argv:
        raise ValueError("argv: empty command")
    reserved = ("/", "/usr", "/tmp", "/proc", "/dev")
    for at in (mount, *[at for _, at in ro_binds]):
        if not at.startswith("/") or at in reserved:
            raise ValueError(f"mount: must be a fresh absolute path, got {at!r}")
    if not os.path.isdir(directory):
        raise ValueError(f"directory: {directory!r} is not a directory")
    _require_tools()
    return _execute(os.path.realpath(directory), tuple(argv), stdin.encode("utf-8"),
                    limits or DEFAULT_LIMITS, writable_box=writable, extra_ro=tuple(extra_ro),
                    mount=mount, chdir=chdir or mount, ro_binds=tuple(ro_binds))


# --------------------------------------------------------------------------------------------
# Execution


def _mounts(extra_ro: tuple[str, ...]) -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in ("/etc/ld.so.cache", "/etc/alternatives"):
        args += ["--ro-bind-try", path, path]
    for path in extra_ro:
        args += ["--ro-bind", path, path]
    return args


def _bwrap_argv(box: str, argv: tuple[str, ...], limits: Limits, status_fd: int,
                writable_box: bool, extra_ro: tuple[str, ...], mount: str = "/box",
                chdir: str = "/tmp", ro_binds: tuple = ()) -> list[str]:
    bwrap, prlimit = _require_tools()
    cpu = int(limits.cpu_s)
    cmd = [
        bwrap, *_mounts(extra_ro),
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(int(limits.tmp_bytes)), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", str(int(limits.tmp_bytes)), "--tmpfs", "/tmp",
        "--bind" if writable_box else "--ro-bind", box, mount,
        *[a for host, at in ro_binds for a in ("--ro-bind", host, at)],
        "--remount-ro", "/", "--chdir", chdir,
        "--unshare-all", "--unshare-user", "--disable-userns",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--hostname", "sandbox", "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--setenv", "TMPDIR", "/tmp",
        "--json-status-fd", str(status_fd),
        "--",
        prlimit, f"--cpu={cpu}:{cpu + 1}", f"--as={int(limits.memory_bytes)}",
        f"--fsize={int(limits.file_size_bytes)}", f"--nofile={int(limits.open_files)}",
        f"--nproc={int(limits.processes)}", "--core=0", "--",
        *argv,
    ]
    return cmd


_SUBREAPER_SET = False


def _become_subreaper() -> None:
    """Make this process a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``).

    bwrap's monitor process exits as soon as the namespace's init reports the program's exit
    status, without reaping that init; as a subreaper we inherit the init, reap it ourselves (so
    no zombie or live process outlives :func:`run`) and read its rusage, which holds the peak
    memory of the program. Process-wide and idempotent."""
    global _SUBREAPER_SET
    if _SUBREAPER_SET:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SandboxUnavailable(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
    _SUBREAPER_SET = True


def _reap_init(child_pid: Optional[int], timeout_s: float = 5.0):
    """Wait until the namespace's init (host pid ``child_pid``, now our child) has exited, which
    happens only after every process of its PID namespace is gone; return its rusage."""
    if child_pid is None:
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, _, ru = os.wait4(child_pid, os.WNOHANG)
        except ChildProcessError:
            return None  # already reaped (should not happen: we are its subreaper)
        if pid:
            return ru
        if time.monotonic() > deadline:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return os.wait4(child_pid, 0)[2]
        time.sleep(0.001)


def _kill_namespace(proc: subprocess.Popen, child_pid: Optional[int]) -> None:
    """SIGKILL the namespace's init (the kernel then kills everything in the PID namespace) and
    bwrap's own process group."""
    if child_pid is not None:
        try:
            os.kill(child_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(code: int, stderr: str, limits: Limits, cpu_s: float) -> tuple[str, str]:
    if code == 0:
        return "ok", "exited normally"
    if code > 128:
        sig = code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s - 0.05):
            return "timeout", f"CPU time limit of {limits.cpu_s}s exceeded ({name})"
        if sig == signal.SIGXFSZ:
            return "runtime_error", f"file size limit of {limits.file_size_bytes} bytes exceeded"
        if "bad_alloc" in stderr:
            return "memory_limit", f"out of memory (address-space limit {limits.memory_bytes} bytes)"
        return "runtime_error", f"killed by {name}"
    if "MemoryError" in stderr or "bad_alloc" in stderr or "Cannot allocate memory" in stderr:
        return "memory_limit", f"out of memory (address-space limit {limits.memory_bytes} bytes)"
    tail = stderr.strip().splitlines()[-1][:200] if stderr.strip() else "no stderr"
    return "runtime_error", f"exit code {code}: {tail}"


def _execute(box: str, argv: tuple[str, ...], stdin: bytes, limits: Limits,
             writable_box: bool, extra_ro: tuple[str, ...] = (), mount: str = "/box",
             chdir: str = "/tmp", ro_binds: tuple = ()) -> Result:
    _become_subreaper()
    status_r, status_w = os.pipe()
    stdin_file = tempfile.TemporaryFile()
    stdin_file.write(stdin)
    stdin_file.seek(0)
    uid = _host_uid()
    cmd = _bwrap_argv(box, argv, limits, status_w, writable_box, extra_ro, mount, chdir, ro_binds)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(status_w,), env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
            user=uid, group=uid, extra_groups=[] if uid is not None else None, cwd="/")
    except OSError as e:
        os.close(status_r)
        os.close(status_w)
        stdin_file.close()
        return Result("sandbox_error", "", "", None, 0.0, 0, f"could not start bwrap: {e}")
    os.close(status_w)
    stdin_file.close()

    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    status_buf = bytearray()
    killed_for: Optional[str] = None
    child_pid: Optional[int] = None
    deadline = start + limits.wall_s
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    os.set_blocking(status_r, False)
    sel.register(status_r, selectors.EVENT_READ)
    open_streams = 2
    try:
        while open_streams > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if fd == status_r:
                    if chunk:
                        status_buf += chunk
                        if child_pid is None:
                            child_pid = _parse_child_pid(status_buf)
                    else:
                        sel.unregister(fd)
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_streams -= 1
                    continue
                buf = out[fd]
                room = limits.output_bytes - len(buf)
                buf += chunk[:max(room, 0)]
                if len(chunk) > room:
                    killed_for = "output_limit"
                    break
            if killed_for:
                break
        if killed_for:
            _kill_namespace(proc, child_pid)
        # wait for bwrap (it exits once the namespace's init is gone); bounded by the wall clock
        wait_deadline = max(deadline, time.monotonic()) + 5.0
        while True:
            pid, wstatus, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and killed_for is None:
                killed_for = "timeout"
                _kill_namespace(proc, child_pid)
            if time.monotonic() > wait_deadline:
                _kill_namespace(proc, child_pid)
                pid, wstatus, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        proc.returncode = os.waitstatus_to_exitcode(wstatus)
        status_buf += _drain(status_r)  # bwrap has exited: everything it wrote is in the pipe
        if child_pid is None:
            child_pid = _parse_child_pid(status_buf)
        init_rusage = _reap_init(child_pid)
        if init_rusage is not None:
            # bwrap's own ru_maxrss inherits this (possibly large) process's RSS across
            # fork+exec; the namespace init's rusage covers exactly the sandboxed program
            rusage = init_rusage
    finally:
        sel.close()
        os.close(status_r)
        proc.stdout.close()
        proc.stderr.close()
    elapsed = time.monotonic() - start
    stdout_b, stderr_b = _outputs(out)
    stdout, stderr = stdout_b.decode("utf-8", "replace"), stderr_b.decode("utf-8", "replace")
    mem = int(rusage.ru_maxrss) * 1024
    cpu_s = rusage.ru_utime + rusage.ru_stime
    exit_code = _parse_exit_code(status_buf)
    if killed_for is None and (child_pid is None or (
            exit_code == 1 and stderr.startswith("bwrap: ") and not stdout)):
        return Result("sandbox_error", stdout, stderr, proc.returncode, elapsed, mem,
                      f"bwrap failed to set up the sandbox (exit {proc.returncode}): "
                      f"{stderr.strip()[-300:]}")
    if killed_for == "timeout":
        return Result("timeout", stdout, stderr, None, elapsed, mem,
                      f"wall-clock limit of {limits.wall_s}s exceeded; namespace killed")
    if killed_for == "output_limit":
        return Result("output_limit", stdout, stderr, None, elapsed, mem,
                      f"output exceeded {limits.output_bytes} bytes on one stream; namespace killed")
    code = exit_code if exit_code is not None else proc.returncode
    status, reason = _classify(code, stderr, limits, cpu_s)
    return Result(status, stdout, stderr, code, elapsed, mem, reason)


def _drain(fd: int) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def _outputs(out: dict) -> tuple[bytes, bytes]:
    bufs = list(out.values())
    return bytes(bufs[0]), bytes(bufs[1])


def _json_docs(buf: bytes) -> list[dict]:
    docs, dec, text, i = [], json.JSONDecoder(), buf.decode("utf-8", "replace"), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return docs
        try:
            doc, i = dec.raw_decode(text, i)
        except ValueError:
            return docs
        docs.append(doc)


def _parse_child_pid(buf: bytes) -> Optional[int]:
    for doc in _json_docs(buf):
        if "child-pid" in doc:
            return int(doc["child-pid"])
    return None


def _parse_exit_code(buf: bytes) -> Optional[int]:
    for doc in _json_docs(buf):
        if "exit-code" in doc:
            return int(doc["exit-code"])
    return None
