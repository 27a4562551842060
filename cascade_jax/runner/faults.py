"""Fault injection for the resume tests (the loop and the stage's weight sync call it)."""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]


def fault_point(point: str, step: int) -> None:
    """Fault injection for the resume tests: with ``CASCADE_FAULT=<point>@<step>`` in the
    environment the process kills itself (SIGKILL, no cleanup) when it reaches ``point``
    (``train``: after the update; ``save``: right after an async checkpoint save started, its
    write still in flight; ``sync``: inside the weight sync) at ``step``."""
    if os.environ.get("CASCADE_FAULT") == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
