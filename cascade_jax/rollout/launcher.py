"""Start rollout servers as child processes, wait for them to be healthy, restart crashed ones.

The command is an argv template; ``{host}``, ``{port}``, ``{checkpoint}`` and
``{weight_version}`` are filled per server (and, after :meth:`Launcher.set_checkpoint`, a
restarted server loads the latest pushed weights instead of the initial ones)::

    Launcher(sglang_command("/ckpt/v000000"), n=2).start()      # SGLang (GPU machines)
    Launcher(serve_command("/ckpt/v000000"), n=2).start()       # the JAX rollout server

A restarted server comes back on the same port, so clients keep their URLs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx

from .types import RolloutError

__all__ = ["free_port", "sglang_command", "serve_command", "router_command", "wait_healthy",
           "Launcher"]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``);
    a group that is already gone is not an error."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sglang_command(model_path: str = "{checkpoint}", *, python: str = sys.executable, tp_size: int = 1,
                   mem_fraction_static: Optional[float] = None, extra: Sequence[str] = ()) -> list:
    """``python -m sglang.launch_server`` with the RL flags: token ids in and out
    (``--skip-tokenizer-init``), no radix cache (no stale prefix state after a weight update) and
    the initial ``--weight-version``. Hybrid-model cache knobs (e.g. an fp32 Mamba state) go in
    ``extra``: check their names against ``--help`` of the pinned SGLang. ``python`` is the
    interpreter of the SGLang environment (never the trainer's)."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "{host}",
           "--port", "{port}", "--tp-size", str(tp_size), "--skip-tokenizer-init",
           "--disable-radix-cache", "--weight-version", "{weight_version}"]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    return cmd + list(extra)


def serve_command(checkpoint: str = "{checkpoint}", *, python: str = sys.executable,
                  extra: Sequence[str] = ()) -> list:
    """The JAX rollout server (``launch/serve.py``) with the same placeholders."""
    return [python, "-m", "launch.serve", "--checkpoint", checkpoint, "--host", "{host}", "--port", "{port}",
            "--weight-version", "{weight_version}"] + list(extra)


def router_command(worker_urls: Sequence[str], *, port: int, host: str = "127.0.0.1",
                   prometheus_port: Optional[int] = None, api_key: Optional[str] = None,
                   health_check_interval_s: int = 5, python: str = sys.executable) -> list:
    """``sglang-router`` (round robin) in front of ``worker_urls``. A second router on one
    machine needs its own ``prometheus_port``."""
    cmd = [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
           "--worker-urls", *worker_urls, "--policy", "round_robin",
           "--health-check-interval-secs", str(health_check_interval_s)]
    if prometheus_port is not None:
        cmd += ["--prometheus-port", str(prometheus_port)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def wait_healthy(url: str, *, timeout_s: float, api_key: Optional[str] = None,
                 proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None,
                 path: str = "/health") -> None:
    """Poll ``GET url+path`` until 200; :class:`RolloutError` on timeout or if ``proc`` exits
    (with the end of its ``log``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RolloutError(f"server {url} exited with code {proc.returncode} before it was healthy:\n{tail}")
        try:
            if httpx.get(url + path, headers=headers, timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RolloutError(f"server {url} not healthy after {timeout_s:.0f} s")
        time.sleep(0.25)


class Launcher:
    """``n`` servers from one command template; a monitor thread restarts any that exit.

    Args:
      command: argv template (see module doc); ``--api-key K`` is appended when ``api_key`` is set.
      n: number of servers, on free ports (or ``ports``).
      checkpoint, weight_version: initial values of the placeholders.
      health_timeout_s: how long a (re)started server may take to answer ``/health``.
      restart: restart servers that exit; at most ``max_restarts`` times in all.
      log_dir: each server's stdout+stderr goes to ``log_dir/server-{port}.log``.
    """

    def __init__(self, command: Sequence[str], *, n: int = 1, ports: Optional[Sequence[int]] = None,
                 host: str = "127.0.0.1", checkpoint: str = "", weight_version: str = "default",
                 api_key: Optional[str] = None, health_timeout_s: float = 600.0, restart: bool = True,
                 max_restarts: int = 10, poll_s: float = 0.5, log_dir: Optional[str] = None,
                 env: Optional[dict] = None):
        self.command = list(command)
        self.ports = list(ports) if ports is not None else [free_port() for _ in range(n)]
        self.host = host
        self.values = {"checkpoint": checkpoint, "weight_version": weight_version}
        self.api_key = api_key
        self.health_timeout_s = health_timeout_s
        self.restart = restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.poll_s = poll_s
        self.log_dir = Path(log_dir) if log_dir else Path(os.environ.get("TMPDIR", "/tmp"))
        self.env = env
        self.procs: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        self.errors: list = []

    @property
    def urls(self) -> list:
        return [f"http://{self.host}:{p}" for p in self.ports]

    def log_path(self, port: int) -> Path:
        return self.log_dir / f"server-{port}.log"

    def argv(self, port: int) -> list:
        vals = dict(self.values, host=self.host, port=port)
        cmd = [a.format(**vals) for a in self.command]
        return cmd + (["--api-key", self.api_key] if self.api_key else [])

    def set_checkpoint(self, checkpoint: str, weight_version: str) -> None:
        """What a server restarted from now on loads (the last pushed version)."""
        with self._lock:
            self.values = {"checkpoint": checkpoint, "weight_version": weight_version}

    def _spawn(self, port: int) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(port), "ab")
        try:
            return subprocess.Popen(self.argv(port), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        finally:
            log.close()

    def start(self, sequential: bool = False) -> list:
        """Start every server, wait until all are healthy (or raise), start the monitor.
        ``sequential`` starts each only once the previous one is healthy (the first then fills
        a shared compilation cache the others read)."""
        try:
            for p in self.ports:
                with self._lock:
                    self.procs[p] = self._spawn(p)
                if not sequential:
                    continue
                wait_healthy(f"http://{self.host}:{p}", timeout_s=self.health_timeout_s, api_key=self.api_key,
                             proc=self.procs[p], log=self.log_path(p))
            for p in self.ports:
                wait_healthy(f"http://{self.host}:{p}", timeout_s=self.health_timeout_s, api_key=self.api_key,
                             proc=self.procs[p], log=self.log_path(p))
        except BaseException:
            self.stop()
            raise
        if self.restart:
            self._monitor = threading.Thread(target=self._watch, name="launcher-monitor", daemon=True)
            self._monitor.start()
        return self.urls

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            for p in self.ports:
                with self._lock:
                    proc = self.procs.get(p)
                    if self._stop.is_set() or proc is None or proc.poll() is None:
                        continue
                    if self.restarts >= self.max_restarts:
                        self.errors.append(f"server on port {p} exited ({proc.returncode}); restart budget spent")
                        self.procs[p] = None
                        continue
                    self.restarts += 1
                    _signal_group(proc, signal.SIGKILL)  # the dead server's orphaned workers
                    self.procs[p] = new = self._spawn(p)
                try:
                    wait_healthy(f"http://{self.host}:{p}", timeout_s=self.health_timeout_s, api_key=self.api_key,
                                 proc=new, log=self.log_path(p))
                except RolloutError as e:
                    self.errors.append(str(e))

    def kill(self, index: int, sig: int = 9) -> None:
        """Send ``sig`` to server ``index`` (tests: a crash)."""
        proc = self.procs[self.ports[index]]
        os.kill(proc.pid, sig)

    def stop(self) -> None:
        """Terminate every server's whole process group (SIGTERM, then SIGKILL after 10 s) and the
        monitor. Each server leads its own session, so the workers it started (SGLang's
        scheduler and detokenizer processes, a tokenizer pool) go with it."""
        self._stop.set()  # the monitor spawns nothing after this (checked under the lock)
        with self._lock:
            procs = [p for p in self.procs.values() if p is not None]
            for proc in procs:
                _signal_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # stragglers of the group, or a hung leader
            proc.wait(10)
        if self._monitor is not None:
            self._monitor.join(timeout=30)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
