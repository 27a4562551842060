"""Run a test script in a child process that sees several simulated CPU devices.

JAX fixes the device count when it starts, so multi-device tests run their body in a child
Python (the test module itself, run as a script) with ``JAX_NUM_CPU_DEVICES`` set; the child
prints one JSON object on its last stdout line, which the parent test asserts on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_cpu_devices(script: str, *args: str, devices: int = 8, timeout: float = 900) -> dict:
    """Run ``python script *args`` on ``devices`` simulated CPU devices; return the JSON object
    of its last stdout line (a failed run fails the test with the tail of its stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # a host-platform device count there would fight the one above
    proc = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing; stderr: {proc.stderr[-3000:]}"
    return json.loads(lines[-1])
