"""Small helpers shared by the Pallas kernels: backend detection and block-size choice."""

from __future__ import annotations

import jax

__all__ = ["on_cpu", "platform", "pick_block", "round_up", "cdiv"]


def platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for the default backend."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def on_cpu() -> bool:
    """True when Pallas kernels must run with ``interpret=True`` (no accelerator)."""
    return platform() == "cpu"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pick_block(dim: int, preferred: int, minimum: int = 8) -> int:
    """Largest power-of-two block ``<= preferred`` dividing ``dim`` (``>= minimum``); if none
    divides, ``min(preferred, next power of two >= dim)`` and the caller pads ``dim``."""
    b = preferred
    while b >= minimum:
        if dim % b == 0:
            return b
        b //= 2
    p = minimum
    while p < dim and p < preferred:
        p *= 2
    return p
