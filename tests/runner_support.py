"""Helpers for the runner tests: tiny stage configs, ``launch/run.py`` in a subprocess (sharing
one persistent compilation cache per test session, so repeated runs skip XLA compiles), a
session-wide SFT'd tiny checkpoint that the GRPO / resume / MOPD tests start from, and the one
way tests start a long-lived command (:class:`Child`: its own process group, started as from a
terminal, its output drained as it comes, SIGTERM-then-SIGKILL of the group at teardown).

Why "as from a terminal": a command started from a non-interactive shell's background job
(``pytest ... &`` in a script, as long suite runs are started) inherits SIGINT *ignored*
(POSIX: asynchronous lists ignore SIGINT and SIGQUIT), and exec keeps an ignored signal
ignored; Python then installs no ``KeyboardInterrupt`` handler, so every child of such a pytest
outlives a Ctrl-C (the Ctrl-C tests of ``test_newcomer.py`` / ``test_eval_progress.py`` timed
out in the full suite while passing alone in a terminal: the child's ``/proc/<pid>/status``
showed ``SigIgn: ...06``, SIGINT and SIGQUIT). :class:`Child` restores SIGINT's default for the
command it starts, so a test's Ctrl-C is the one a user at a terminal sends."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from cascade_jax.config import merge

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CACHE: dict = {}

#: shapes shared by the runner tests (one compile per program across the session)
ROLLOUT = {"sampling": {"n_samples": 4, "max_prompt_len": 64, "max_response_len": 24, "thinking": True}}


def tiny_stage_model() -> dict:
    """The tiny stages' ``model`` section (one home: ``configs/tiny/base.json``)."""
    return json.loads((ROOT / "configs" / "tiny" / "base.json").read_text())["model"]


def write_config(path: pathlib.Path, objective: str, run_dir: pathlib.Path, *, steps: int,
                 domains=("structured_output",), **sections) -> pathlib.Path:
    """A tiny-preset stage config at ``path``; ``sections`` laid over the defaults
    (:func:`cascade_jax.config.merge`: mappings key by key, e.g. ``rollout={"sampling": {...}}``)."""
    cfg = {
        "model": {"preset": "tiny", "dtype": "float32"},
        "optimizer": {"lr": 2e-3, "grad_clip": 1.0},
        "rollout": copy.deepcopy(ROLLOUT),
        "data": {"domains": list(domains), "batch_prompts": 4, "batch_rows": 8, "seq_len": 256,
                 "tiny_rows_per_domain": 256},
        "stage": {"name": f"test_{objective}", "objective": objective, "steps": steps},
        "eval": {"every": -1, "prompts": 8, "k": 2},
        "run": {"out_dir": str(run_dir)},
    }
    path.write_text(json.dumps(merge(cfg, sections), indent=1))
    return path


#: environment variable naming the session's compilation cache (set by ``tests/conftest.py``)
CACHE_ENV = "CASCADE_TEST_JIT_CACHE"
#: environment variable naming the test run's directory, shared by its xdist workers
SESSION_ENV = "CASCADE_TEST_SESSION_DIR"


def cache_dir(tmp_path_factory) -> pathlib.Path:
    """The session's persistent compilation cache (``tests/conftest.py``'s, else a new one)."""
    if "jax_cache" not in _CACHE:
        shared = os.environ.get(CACHE_ENV)
        _CACHE["jax_cache"] = pathlib.Path(shared) if shared else tmp_path_factory.mktemp("jax_cache")
    return _CACHE["jax_cache"]


def cli_env(tmp_path_factory=None, **extra) -> dict:
    """The environment of a launch script in a test: CPU, this checkout first on the path and,
    with ``tmp_path_factory``, the session's persistent compilation cache (every program cached,
    however fast it compiled); ``extra`` added (e.g. ``CASCADE_FAULT``)."""
    env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": str(ROOT)}
    if tmp_path_factory is not None:
        env.update({"JAX_COMPILATION_CACHE_DIR": str(cache_dir(tmp_path_factory)),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    env.update(extra)
    return env


def launch_cmd(script: str, *args) -> list:
    """``[python, launch/<script>, *args]``."""
    return [sys.executable, str(ROOT / "launch" / script), *map(str, args)]


def run_cli(tmp_path_factory, *args, fault=None, timeout=600) -> subprocess.CompletedProcess:
    """``python launch/run.py *args`` on CPU with the session's compilation cache;
    ``fault="<point>@<step>"`` makes the run kill itself there (SIGKILL)."""
    env = cli_env(tmp_path_factory, **({"CASCADE_FAULT": fault} if fault else {}))
    return subprocess.run(launch_cmd("run.py", "--no-progress", *args),
                          capture_output=True, text=True, timeout=timeout, env=env)


def sft_run(tmp_path_factory) -> pathlib.Path:
    """A tiny model SFT'd for 60 steps on structured_output + math, built once per test run: in
    the run's shared directory (``SESSION_ENV``) under a file lock, so ``pytest -n N`` workers
    build it once between them."""
    reuse = os.environ.get("CASCADE_TEST_SFT_RUN")  # a finished run of this fixture (dev speed-up)
    if reuse and "sft" not in _CACHE:
        _CACHE["sft"] = pathlib.Path(reuse)
    if "sft" in _CACHE:
        return _CACHE["sft"]
    shared = os.environ.get(SESSION_ENV)
    d = pathlib.Path(shared) / "sft" if shared else tmp_path_factory.mktemp("sft")
    d.mkdir(parents=True, exist_ok=True)
    with open(d.parent / "sft.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (d / "DONE").exists():
            shutil.rmtree(d / "run", ignore_errors=True)  # a worker that failed half-way
            cfg = write_config(d / "sft.json", "sft", d / "run", steps=60,
                               domains=("structured_output", "math"),
                               optimizer={"lr": 3e-3, "warmup_steps": 5, "b2": 0.98},
                               run={"export_every": 20})  # exports/step_20, step_40; hub = 60
            r = run_cli(tmp_path_factory, f"--config={cfg}")
            assert r.returncode == 0, r.stderr[-3000:]
            (d / "DONE").touch()
    _CACHE["sft"] = d / "run"
    return _CACHE["sft"]


def mask_spans(mask) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of ones in ``mask`` (a loss mask: one span per model turn)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0.0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(run_dir: pathlib.Path, step: int) -> tuple:
    """``({path: array}, data state)`` of the orbax checkpoint at ``step`` of ``run_dir`` (params,
    optimizer state, step, rng; and the data iterators' state)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints",
                               item_names=("state", "data", "meta")) as m:
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      data=ocp.args.JsonRestore()))
    leaves = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}, out["data"]


def assert_same_state(ref_dir: pathlib.Path, got_dir: pathlib.Path, step: int) -> dict:
    """The checkpoint at ``step`` of ``got_dir`` equals ``ref_dir``'s bit for bit (every array of
    the train state and the data iterators' state); returns ``ref_dir``'s arrays."""
    a, ad = checkpoint_state(ref_dir, step)
    b, bd = checkpoint_state(got_dir, step)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert ad == bd
    return a


# --------------------------------------------------------------------------------------------
# Long-lived commands (launch scripts, servers, routers, multi-process jobs)


@contextlib.contextmanager
def _as_from_a_terminal():
    """While a child is spawned, SIGINT is not ignored here (an ignored signal stays ignored
    across exec; a handled one is reset to its default), so the child starts as a command typed
    at a terminal does (see the module doc). Only the main thread may change handlers; the
    suite spawns from it."""
    ignored = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class Child:
    """``cmd`` running in its own process group (so teardown reaches whatever it starts), with
    SIGINT at its default (:func:`_as_from_a_terminal`), and its output drained as it comes so a
    full pipe can never block it: with ``log`` stdout and stderr go to that file, else a thread
    per stream collects the lines (:attr:`out`, :attr:`lines` for stderr). ``env=None``: this
    process's environment. Use as a context manager or call :meth:`stop` in a ``finally``:
    SIGTERM to the group, ``grace`` seconds, then SIGKILL -- also when the test failed."""

    def __init__(self, cmd: Sequence, env: Optional[dict], *, cwd=None,
                 log: Optional[pathlib.Path] = None):
        self.cmd, self.log = [str(c) for c in cmd], log
        self.out: list = []
        self.lines: list = []
        self._threads: list = []
        with _as_from_a_terminal():
            if log is not None:
                with open(log, "ab") as f:
                    self.p = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                              cwd=cwd, process_group=0)
            else:
                self.p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=cwd, process_group=0)
        if log is None:
            for stream, into in ((self.p.stdout, self.out), (self.p.stderr, self.lines)):
                t = threading.Thread(target=self._drain, args=(stream, into), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _drain(stream, into: list) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self, n: int = 3000) -> str:
        """The end of its stderr (or its log)."""
        if self.log is not None:
            return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""
        return "\n".join(self.lines)[-n:]

    def wait_for(self, what: Union[str, Callable[[], bool]], timeout: float = 600) -> None:
        """Until a stderr line contains ``what`` (or ``what()`` holds); fails with the output's
        end if the command exits first or ``timeout`` passes."""
        held = what if callable(what) else (lambda: any(what in l for l in list(self.lines)))
        t0 = time.monotonic()
        while not held():
            assert self.p.poll() is None, (what, self.p.returncode, self.text())
            assert time.monotonic() - t0 < timeout, (what, f"not seen in {timeout:.0f} s", self.text())
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        """Its exit code, once it and the output threads are done (``TimeoutExpired`` after
        ``timeout``)."""
        code = self.p.wait(timeout=timeout)
        for t in self._threads:
            t.join(10)
        return code

    def signal_and_wait(self, sig: int, timeout: float = 300) -> int:
        """Send ``sig`` to the command and wait for its exit code."""
        self.p.send_signal(sig)
        return self.wait(timeout)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to its process group, up to ``grace`` s, then SIGKILL; no-op once it and its
        group are gone."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:  # the group is empty
                break
            try:
                self.p.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader is gone; leftovers of its group get SIGKILL
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
            break
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
