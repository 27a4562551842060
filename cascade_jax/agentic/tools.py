"""Sandboxed tools over a per-episode writable copy of a repository.

A :class:`Workspace` is one episode's copy of a repository snapshot (a host directory made with
``shutil.copytree(symlinks=True)`` from the trusted snapshot and handed to the sandbox uid). Every
tool call runs inside the bubblewrap sandbox of :mod:`cascade_jax.rewards.sandbox` with the copy
bound writable at ``/repo`` (the working directory), nothing else of the host visible but ``/usr``
and the read-only tool scripts, no network, and the call's :class:`~cascade_jax.rewards.sandbox.
Limits` (CPU seconds, address space per process, process count, wall clock, output bytes, file
size). The tools:

===================  ============================================================================
``run_shell(cmd)``   ``/bin/sh -c cmd`` in ``/repo``
``run_python(code)`` ``python3 -B -`` with ``code`` on stdin, in ``/repo`` (the repository importable)
``view(path)``       the file with line numbers (or a directory listing), optional line range
``create(path, t)``  write a new file (or overwrite one)
``str_replace``      replace the one occurrence of ``old`` by ``new`` in a file; zero or several
                     occurrences are an error observation (nothing is written)
``run_tests(ids)``   run pytest-style test ids ``path/to/test_x.py::test_name`` with the runner
                     script, returning ``{id: "passed" | "failed" | "error"}``
===================  ============================================================================

The viewer and editor run in the sandbox too (a tool script reading its JSON arguments on
stdin), so a symlink planted in the copy cannot make the host read or write its own files; the
host only ever copies the trusted snapshot in, measures the copy's size with ``lstat`` (no
file is opened) and deletes it (``shutil.rmtree`` does not follow links).

Containment becomes observations, never exceptions: every tool returns a :class:`ToolResult`
whose ``text`` is what the model reads (exit status, the sandbox's reason for a kill, stdout and
stderr, truncated to ``max_observation_chars``). Disk: a single file is capped by
``file_size_bytes``; the copy as a whole is measured after every call and a copy larger than
``workspace_bytes`` is reported in the observation and marks the workspace ``over_quota`` (the
SWE environment then ends the episode with reward 0). Within one call the disk written is bounded
by the call's wall clock, not by a quota (bubblewrap has no per-bind quota; a container runtime
would be needed).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import threading
from typing import Mapping, Optional, Sequence

from cascade_jax.rewards import sandbox

__all__ = ["ToolLimits", "ToolResult", "Workspace", "TOOL_LIMITS", "REPO_MOUNT"]

REPO_MOUNT = "/repo"
SCRIPTS_MOUNT = "/scripts"  # the editor and test-runner scripts, read-only

#: per-call limits of the agent's tools: a repository's tests may need a few processes
TOOL_LIMITS = sandbox.Limits(wall_s=10.0, cpu_s=5, memory_bytes=512 << 20,
                             file_size_bytes=8 << 20, open_files=64, processes=16,
                             output_bytes=64 << 10, tmp_bytes=32 << 20)


@dataclasses.dataclass(frozen=True)
class ToolLimits:
    """``call``: sandbox limits of one tool call; ``workspace_bytes``: most bytes the copy may
    hold after a call; ``max_observation_chars``: most characters of one observation."""

    call: sandbox.Limits = TOOL_LIMITS
    workspace_bytes: int = 32 << 20
    max_observation_chars: int = 4000

    def __post_init__(self):
        for name in ("workspace_bytes", "max_observation_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ToolLimits.{name}: must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """``ok``: the tool did what was asked; ``text``: the observation for the model;
    ``status``: the sandbox status (``ok``, ``timeout``, ``memory_limit``, ...) or ``error`` for
    a refused request; ``time_s``: wall time of the call; ``data``: structured output
    (``run_tests``: the per-test outcomes)."""

    ok: bool
    text: str
    status: str
    time_s: float = 0.0
    data: Optional[dict] = None


# --------------------------------------------------------------------------------------------
# Tool scripts (run inside the sandbox with the sandbox's Python)

_EDITOR = r'''
import json, os, sys
a = json.loads(sys.stdin.read())
root = os.path.realpath("/repo")
def resolve(p):
    p = p if os.path.isabs(p) else os.path.join(root, p)
    r = os.path.realpath(p)
    if r != root and not r.startswith(root + "/"):
        sys.exit("error: path %r is outside /repo" % a.get("path"))
    return r
cmd, path = a["command"], resolve(a["path"])
if cmd == "view":
    if os.path.isdir(path):
        for d, dirs, files in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            depth = d[len(path):].count("/")
            if depth > 2:
                dirs[:] = []
                continue
            for f in sorted(files):
                print(os.path.relpath(os.path.join(d, f), root))
        sys.exit(0)
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    lo, hi = a.get("view_range") or (1, len(lines))
    hi = len(lines) if hi == -1 else hi
    for i in range(max(lo, 1), min(hi, len(lines)) + 1):
        print("%6d\t%s" % (i, lines[i - 1]))
elif cmd == "create":
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w", encoding="utf-8").write(a["file_text"])
    print("created %s" % os.path.relpath(path, root))
elif cmd == "str_replace":
    text = open(path, encoding="utf-8").read()
    n = text.count(a["old_str"])
    if n != 1:
        sys.exit("error: old_str occurs %d times in %s (must occur exactly once)"
                 % (n, os.path.relpath(path, root)))
    open(path, "w", encoding="utf-8").write(text.replace(a["old_str"], a["new_str"], 1))
    print("edited %s" % os.path.relpath(path, root))
else:
    sys.exit("error: unknown command %r (view, create, str_replace)" % cmd)
'''

_RUNNER = r'''
import importlib.util, json, os, sys, traceback
req = json.loads(sys.stdin.readline())
sys.path.insert(0, "/repo")
os.chdir("/repo")
out, mods = {}, {}
for tid in req["tests"]:
    path, _, name = tid.partition("::")
    try:
        if path not in mods:
            spec = importlib.util.spec_from_file_location("t%d" % len(mods), os.path.join("/repo", path))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods[path] = mod
        getattr(mods[path], name)()
        out[tid] = "passed"
    except AssertionError:
        out[tid] = "failed"
        traceback.print_exc()
    except BaseException:
        out[tid] = "error"
        traceback.print_exc()
sys.stdout.write("\n" + req["nonce"] + json.dumps(out) + "\n")
'''

_SCRIPTS_LOCK = threading.Lock()
_SCRIPTS: Optional[str] = None


@atexit.register
def _remove_scripts() -> None:
    if _SCRIPTS is not None:
        shutil.rmtree(_SCRIPTS, ignore_errors=True)


def _scripts_dir() -> str:
    """A host directory (made once per process, world-readable, removed at exit) holding the
    tool scripts."""
    global _SCRIPTS
    with _SCRIPTS_LOCK:
        if _SCRIPTS is None or not os.path.isdir(_SCRIPTS):
            d = tempfile.mkdtemp(prefix="cascade-agentic-scripts-")
            for name, text in (("editor.py", _EDITOR), ("runtests.py", _RUNNER)):
                with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(os.path.join(d, name), 0o644)
            os.chmod(d, 0o755)
            _SCRIPTS = d
        return _SCRIPTS


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 3 // 4
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters truncated] ...\n{text[-tail:]}"


def _tree_bytes(root: str) -> int:
    """Bytes under ``root`` by ``lstat`` (links and special files are not followed or opened)."""
    total = 0
    for d, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(d, name)).st_size
            except OSError:
                pass
    return total


class Workspace:
    """One episode's writable copy of ``snapshot`` (a host directory; never modified).

    Use as a context manager or call :meth:`close`. Thread-safe per call (one episode's calls
    are sequential; different workspaces run in parallel)."""

    def __init__(self, snapshot: str, limits: ToolLimits = ToolLimits()):
        if not os.path.isdir(snapshot):
            raise ValueError(f"snapshot: {snapshot!r} is not a directory")
        self.limits = limits
        self.over_quota = False
        self._base = tempfile.mkdtemp(prefix=sandbox.TMP_PREFIX + "ws-")
        os.chmod(self._base, 0o755)
        self.path = os.path.join(self._base, "repo")
        shutil.copytree(snapshot, self.path, symlinks=True)
        sandbox.sandbox_owned(self.path)
        self._python, self._extra_ro = sandbox.python_command()

    # ---- lifecycle
    def close(self) -> None:
        shutil.rmtree(self._base, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- execution
    def _run(self, argv: Sequence[str], stdin: str = "", limits: Optional[sandbox.Limits] = None):
        res = sandbox.run_command(tuple(argv), directory=self.path, writable=True,
                                  mount=REPO_MOUNT, stdin=stdin, limits=limits or self.limits.call,
                                  extra_ro=self._extra_ro,
                                  ro_binds=((_scripts_dir(), SCRIPTS_MOUNT),))
        size = _tree_bytes(self.path)
        if size > self.limits.workspace_bytes:
            self.over_quota = True
        return res, size

    def _observe(self, res, size: int, show_ok_status: bool = True) -> ToolResult:
        parts = []
        if res.status != "ok" or show_ok_status:
            code = "" if res.exit_code is None else f" (exit code {res.exit_code})"
            parts.append(f"[{res.status}{code}: {res.reason}]")
        if res.stdout:
            parts.append(res.stdout.rstrip("\n"))
        if res.stderr:
            parts.append("[stderr]\n" + res.stderr.rstrip("\n"))
        if size > self.limits.workspace_bytes:
            parts.append(f"[error: the repository copy holds {size} bytes, over its quota of "
                         f"{self.limits.workspace_bytes} bytes]")
        text = _truncate("\n".join(parts), self.limits.max_observation_chars)
        ok = res.status == "ok" and size <= self.limits.workspace_bytes
        return ToolResult(ok, text, res.status, res.time_s)

    def run_shell(self, command: str) -> ToolResult:
        """``/bin/sh -c command`` in the copy."""
        if not isinstance(command, str) or not command.strip():
            return ToolResult(False, "[error: empty command]", "error")
        return self._observe(*self._run(("/bin/sh", "-c", command)))

    def run_python(self, code: str) -> ToolResult:
        """``code`` run by the sandbox's Python (stdin), working directory the copy."""
        if not isinstance(code, str):
            return ToolResult(False, "[error: code must be a string]", "error")
        return self._observe(*self._run((*self._python, "-B", "-"), stdin=code))

    def _editor(self, args: Mapping) -> ToolResult:
        script = SCRIPTS_MOUNT + "/editor.py"
        res, size = self._run((*self._python, "-I", "-B", script), stdin=json.dumps(dict(args)))
        obs = self._observe(res, size, show_ok_status=False)
        if res.status == "runtime_error" and res.stderr.strip().splitlines()[-1:] and \
                res.stderr.strip().splitlines()[-1].startswith("error:"):
            obs = dataclasses.replace(obs, text=_truncate(res.stderr.strip().splitlines()[-1],
                                                          self.limits.max_observation_chars))
        return obs

    def view(self, path: str, view_range: Optional[Sequence[int]] = None) -> ToolResult:
        """The file at ``path`` (relative to the copy's root) with line numbers, or a listing."""
        args = {"command": "view", "path": str(path)}
        if view_range is not None:
            if (len(view_range) != 2 or not all(isinstance(v, int) for v in view_range)):
                return ToolResult(False, "[error: view_range must be two integers [start, end]]",
                                  "error")
            args["view_range"] = list(view_range)
        return self._editor(args)

    def create(self, path: str, file_text: str) -> ToolResult:
        return self._editor({"command": "create", "path": str(path), "file_text": str(file_text)})

    def str_replace(self, path: str, old_str: str, new_str: str) -> ToolResult:
        if not old_str:
            return ToolResult(False, "[error: old_str must not be empty]", "error")
        return self._editor({"command": "str_replace", "path": str(path), "old_str": str(old_str),
                             "new_str": str(new_str)})

    def apply_patch(self, patch: str) -> ToolResult:
        """Apply a unified diff (``patch -p1``, run in the sandbox) to the copy."""
        return self._observe(*self._run(("/usr/bin/patch", "-p1", "--batch", "--forward"),
                                        stdin=patch))

    def write_files(self, files: Mapping[str, str]) -> ToolResult:
        """Write (overwrite) files given as ``{relative path: text}``, in the sandbox."""
        for path, text in files.items():
            r = self.create(path, text)
            if not r.ok:
                return r
        return ToolResult(True, f"wrote {len(files)} file(s)", "ok")

    def run_tests(self, test_ids: Sequence[str],
                  limits: Optional[sandbox.Limits] = None) -> ToolResult:
        """Run pytest-style ids ``file.py::function`` in the copy; ``data`` maps each id to
        ``passed`` / ``failed`` / ``error`` (every id ``error`` when the run was killed or its
        report cannot be found)."""
        ids = [str(t) for t in test_ids]
        bad = [t for t in ids if "::" not in t]
        if bad:
            return ToolResult(False, f"[error: test id {bad[0]!r} is not 'path::function']",
                              "error")
        nonce = secrets.token_hex(16)
        script = SCRIPTS_MOUNT + "/runtests.py"
        res, size = self._run((*self._python, "-I", "-B", script),
                              stdin=json.dumps({"nonce": nonce, "tests": ids}) + "\n",
                              limits=limits)
        outcome = {t: "error" for t in ids}
        for line in res.stdout.splitlines():
            if line.startswith(nonce):
                try:
                    got = json.loads(line[len(nonce):])
                except ValueError:
                    continue
                outcome.update({t: got[t] for t in ids if got.get(t) in ("passed", "failed", "error")})
        shown = "\n".join(ln for ln in res.stdout.splitlines() if not ln.startswith(nonce))
        obs = self._observe(dataclasses.replace(res, stdout=shown.strip("\n")), size)
        summary = ", ".join(f"{t}: {o}" for t, o in outcome.items())
        text = _truncate(summary + "\n" + obs.text,
                         self.limits.max_observation_chars)
        return ToolResult(obs.ok and all(o == "passed" for o in outcome.values()), text,
                          res.status, res.time_s, {"tests": outcome})
