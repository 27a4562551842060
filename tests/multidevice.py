"""Run a test script in a child process that sees several simulated CPU devices.

JAX fixes the device count when it starts, so multi-device tests run their body in a child
Python (the test module itself run as a script, or a launcher such as ``launch/plan.py``) with
``JAX_NUM_CPU_DEVICES`` set; the child prints one JSON object on its last stdout line, which
the parent test asserts on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(devices: Optional[int] = 8) -> dict:
    """The environment of a child Python: CPU platform, the repository importable, ``devices``
    simulated CPU devices (``None``: no count set, for a child that sets its own, like
    ``launch/plan.py``)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # a host-platform device count there would fight the one below
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def run_child(script: str, *args, devices: Optional[int] = 8,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """``python script *args`` in :func:`child_env` (``devices``); the finished process, for a
    test that expects it to fail."""
    return subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)],
                          env=child_env(devices), capture_output=True, text=True, timeout=timeout)


def run_on_cpu_devices(script: str, *args, devices: Optional[int] = 8, timeout: float = 900) -> dict:
    """Run ``python script *args`` on ``devices`` simulated CPU devices; return the JSON object
    of its last stdout line (a failed run fails the test with the tail of its stderr)."""
    proc = run_child(script, *args, devices=devices, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr: {proc.stderr[-3000:]}"
    return json.loads(lines[-1])
