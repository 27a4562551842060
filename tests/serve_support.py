"""One home for starting a real ``launch/serve.py`` process in tests: the tiny fp32 weights the
served tests push, the environment sharing one persistent compilation cache between the test
servers (content-addressed, so safe across runs: the first server fills it, later ones read
it), and :func:`served`, a started-and-healthy server that is always stopped."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from cascade_jax.rollout.launcher import free_port, wait_healthy
from models import nemotron_h as nh
from tests.runner_support import Child

REPO = str(Path(__file__).resolve().parents[1])
#: the persistent compilation cache of every test server
SERVE_CACHE = os.path.join(tempfile.gettempdir(), "cascade-jax-serve-test-cache")


def tiny_fp32(seed: int):
    """The tiny preset's weights from ``seed``, every leaf fp32."""
    return jax.tree.map(lambda x: x.astype(np.float32), nh.init_params(nh.preset("tiny"), jax.random.key(seed)))


def serve_env(base: Optional[dict] = None) -> dict:
    """``base`` (default this process's environment) on the CPU platform with the shared
    persistent compilation cache (every program cached, however fast it compiled)."""
    return dict(os.environ if base is None else base, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=SERVE_CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@contextlib.contextmanager
def served(checkpoint, flags: Sequence[str] = (), *, log: Path, env: Optional[dict] = None,
           weight_version: str = "0", timeout_s: float = 300, api_key: Optional[str] = None):
    """``launch/serve.py --checkpoint checkpoint *flags`` on a free port (output to ``log``,
    environment :func:`serve_env` of ``env``), yielded once ``/health`` answers as a namespace
    ``url, port, proc, log``. It runs as a :class:`~tests.runner_support.Child` (its own process
    group, SIGINT at its default); the group is terminated (killed after 30 s) on exit."""
    port = free_port()
    proc = Child([sys.executable, "-m", "launch.serve", "--checkpoint", str(checkpoint), "--port", str(port),
                  "--weight-version", weight_version, *flags], serve_env(env), cwd=REPO, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=timeout_s, proc=proc.p, log=log, api_key=api_key)
        yield types.SimpleNamespace(url=url, port=port, proc=proc.p, log=log)
    finally:
        proc.stop(grace=30)
