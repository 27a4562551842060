"""Small helpers shared by the Pallas kernels: backend detection, compiler params, block sizes, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["on_cpu", "platform", "pick_block", "round_up", "cdiv", "triton_params", "pad_to"]


def platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` for the default backend."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def on_cpu() -> bool:
    """True when Pallas kernels must run with ``interpret=True`` (no accelerator)."""
    return platform() == "cpu"


def triton_params(interpret: bool, num_warps: int = 4, num_stages: int = 3):
    """Triton compiler params for a compiled GPU launch; ``None`` in interpret mode and on TPU
    (where ``None`` lets Mosaic TPU try its lowering)."""
    if interpret or platform() == "tpu":
        return None
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pad_to(x, axis: int, size: int, value=0):
    """Pad ``axis`` of ``x`` at the end up to ``size`` with ``value`` (no-op if already there)."""
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


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


def match_vma(*xs):
    """Inside ``shard_map`` (``check_vma``), make every operand vary over the union of the mesh
    axes any of them varies over, and return ``(operands, manual_axis_type)`` for the outputs'
    ``ShapeDtypeStruct``. Outside ``shard_map`` the operands come back unchanged."""
    axes = frozenset().union(*(jax.typeof(x).mat.varying for x in xs))
    if axes:
        xs = tuple(x if jax.typeof(x).mat.varying >= axes
                   else jax.lax.pcast(x, tuple(sorted(axes - jax.typeof(x).mat.varying)), to="varying")
                   for x in xs)
    return xs, jax.typeof(xs[0]).mat


def out_struct(shape, dtype, mat):
    """``jax.ShapeDtypeStruct`` carrying the operands' ``manual_axis_type`` (see :func:`match_vma`)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def pallas_call(kernel, *, out_shape, **kw):
    """``pl.pallas_call`` that also works inside ``shard_map`` with ``check_vma`` (operands are
    brought to a common varying-axes set and the outputs declared with it)."""
    from jax.experimental import pallas as pl

    def run(*args):
        args, mat = match_vma(*args)
        shapes = jax.tree.map(lambda s: out_struct(s.shape, s.dtype, mat), out_shape)
        return pl.pallas_call(kernel, out_shape=shapes, **kw)(*args)

    return run
