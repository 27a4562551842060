"""Test support for the rewards suite: process-leak checks and a rule-based SGLang stand-in."""

from __future__ import annotations

import contextlib
import os
import uuid

from cascade_jax.rewards import sandbox


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def processes_mounting(marker: str) -> list[int]:
    """Pids of live processes whose mount table mentions ``marker`` (a sandbox's host dir)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and marker in _read(f"/proc/{name}/mountinfo"):
            pids.append(int(name))
    return pids


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid`` (zombies included)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append((int(name), fields[0]))
    return out


@contextlib.contextmanager
def tracked_sandbox(monkeypatch):
    """Give this test's sandbox directories a unique prefix; on exit, assert that no process of
    this test's sandboxes is alive and that the test process has no new bwrap children/zombies."""
    marker = f"cascade-sbx-t{uuid.uuid4().hex[:12]}-"
    monkeypatch.setattr(sandbox, "TMP_PREFIX", marker)
    before = {p for p, _ in children_of(os.getpid())}
    yield marker
    left = processes_mounting(marker)
    assert not left, f"sandbox processes left behind: {left}"
    new = [c for c in children_of(os.getpid()) if c[0] not in before
           and "bwrap" in _read(f"/proc/{c[0]}/comm")]
    assert not new, f"child processes left behind (pid, state): {new}"


@contextlib.contextmanager
def sglang_stub(*flags: str):
    """Start the rule-based SGLang stand-in (a separate HTTP server process on 127.0.0.1) and
    yield its base URL; the process is terminated on exit."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "tests.rewards.sglang_stub", *flags], cwd=root,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def byte_tokenizer(text: str) -> list[int]:
    """Trivial tokenizer for tests: UTF-8 bytes."""
    return list(text.encode("utf-8"))


def byte_detokenizer(ids) -> str:
    return bytes(ids).decode("utf-8")
