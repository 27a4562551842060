"""Calls the transformers oracle (``tests/oracle/hf_oracle.py``) in its own Python environment.

The oracle interpreter is ``$CASCADE_ORACLE_PYTHON`` if set, else ``.oracle-venv/bin/python`` in
the repository root (``bash launch/setup_env.sh --oracle`` builds it). A missing oracle FAILS the
test (it is part of CI acceptance and never skipped).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLE_SCRIPT = REPO / "tests" / "oracle" / "hf_oracle.py"


def oracle_python() -> str:
    env = os.environ.get("CASCADE_ORACLE_PYTHON")
    path = Path(env) if env else REPO / ".oracle-venv" / "bin" / "python"
    if not (path.exists() and os.access(path, os.X_OK)):
        pytest.fail(
            f"transformers oracle interpreter not found at {path} "
            f"({'from $CASCADE_ORACLE_PYTHON' if env else 'default location'}). "
            "Build it with `bash launch/setup_env.sh --oracle` or point $CASCADE_ORACLE_PYTHON at a "
            "Python 3.11 with the packages of requirements-oracle.txt.", pytrace=False)
    return str(path)


def run_oracle(jobs: list[dict], workdir, timeout: float = 300.0) -> None:
    """Runs a list of oracle jobs (see ``hf_oracle.py``) in ONE subprocess; fails the test with
    the oracle's stderr on error."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_file = workdir / f"jobs-{os.getpid()}-{len(list(workdir.iterdir()))}.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ)
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([oracle_python(), str(ORACLE_SCRIPT), "batch", "--jobs", str(jobs_file)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(workdir))
    if proc.returncode != 0:
        pytest.fail(f"transformers oracle failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}",
                    pytrace=False)
