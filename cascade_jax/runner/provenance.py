"""``provenance.json``: what produced a run dir (code, environment, devices, command).

Fields: ``git`` (``commit``, ``dirty``; ``None`` outside a git checkout, e.g. a pip install),
``packages`` (versions of the libraries that decide numerics and I/O), ``python``, ``platform``,
``seeds`` (``run.seed``, ``data.shuffle_seed``), ``devices`` (backend, kinds, counts, process
index/count), ``mesh`` (axis → size), ``argv`` (the command line) and ``time`` (UTC, ISO 8601).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import pathlib
import platform
import subprocess
import sys
from typing import Optional, Sequence

__all__ = ["collect", "git_state"]

PACKAGES = ("cascade-jax", "jax", "jaxlib", "numpy", "optax", "orbax-checkpoint", "grain",
            "safetensors", "tokenizers", "tensorboardX", "tqdm")


def git_state(path: pathlib.Path) -> Optional[dict]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``path``, or ``None``."""
    try:
        top = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=30)
        return {"commit": top.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(config, *, mesh=None, argv: Optional[Sequence[str]] = None) -> dict:
    """The provenance record of a run with ``config`` (a ``Config``) on this process."""
    import jax

    devs = jax.devices()
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
        "git": git_state(pathlib.Path(__file__).resolve().parent),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "seeds": {"run.seed": config.run.seed, "data.shuffle_seed": config.data.shuffle_seed},
        "devices": {
            "backend": jax.default_backend(),
            "kinds": sorted({d.device_kind for d in devs}),
            "count": len(devs),
            "local_count": jax.local_device_count(),
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
        },
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }
