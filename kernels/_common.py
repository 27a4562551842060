"""Small helpers shared by the Pallas kernels: platform detection (mesh-aware), compiler params,
block sizes, padding, and the grouped-matmul contract pieces both Pallas grouped matmuls
(:mod:`kernels.pallas_gmm`, :mod:`kernels.pallas_gmm_mgpu`) use (epilogue, its gradient, shape
check), so neither imports the other for them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["on_cpu", "platform", "pick_block", "round_up", "cdiv", "triton_params", "pad_to",
           "GMM_EPILOGUES", "apply_epilogue", "epilogue_grad", "check_gmm_shapes", "attention_args"]


def platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` of the devices the traced program is for: the current
    mesh's device platform when a mesh (or an abstract mesh with a device, e.g. a lowering for
    an H100 from a CPU host) is set — inside ``shard_map`` and ``jax.set_mesh`` — else the
    default backend. The one platform switch of the kernels (:data:`kernels.AUTO`)."""
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    p = dev.platform if dev is not None else jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def on_cpu() -> bool:
    """True when Pallas kernels must run with ``interpret=True`` (no accelerator)."""
    return platform() == "cpu"


GMM_EPILOGUES = (None, "relu2")


def check_gmm_shapes(lhs, rhs, group_sizes, epilogue=None):
    """The grouped-matmul contract ``lhs [M, K]``, ``rhs [E, K, N]``, ``group_sizes [E]``."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"gmm: bad shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    if epilogue not in GMM_EPILOGUES:
        raise ValueError(f"gmm: epilogue must be one of {GMM_EPILOGUES}, got {epilogue!r}")


def attention_args(q, k, q_positions=None, kv_positions=None, q_segment_ids=None,
                   kv_segment_ids=None, kv_valid=None):
    """The attention contract shared by the kernels (``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``,
    ``Hq`` a multiple of ``Hkv``, segment ids for both sides or neither), with the defaults made
    explicit: positions ``0..T-1`` / ``0..S-1``, one segment (ids 0), every key valid. Returns
    ``(q_positions [B, T], kv_positions [B, S], q_segment_ids [B, T], kv_segment_ids [B, S],
    kv_valid [B, S])``."""
    b, t, hq, _ = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads not a multiple of {hkv} kv heads")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: pass both q_segment_ids and kv_segment_ids or neither")
    i32 = jnp.int32
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=i32), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=i32), (b, s))
    if q_segment_ids is None:
        q_segment_ids, kv_segment_ids = jnp.zeros((b, t), i32), jnp.zeros((b, s), i32)
    if kv_valid is None:
        kv_valid = jnp.ones((b, s), bool)
    return q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid


def apply_epilogue(acc, epilogue):
    """``acc`` (no epilogue) or ``relu(acc)²`` (``"relu2"``), on the fp32 accumulator."""
    if epilogue == "relu2":
        r = jnp.maximum(acc, 0.0)
        return r * r
    return acc


def epilogue_grad(dout, pre, epilogue, dtype):
    """Gradient w.r.t. the pre-activation ``pre``: ``dout`` (no epilogue) or ``dout·2·relu(pre)``
    (relu², in fp32), as ``dtype``."""
    if epilogue == "relu2":
        return (dout.astype(jnp.float32) * 2.0 * jnp.maximum(pre.astype(jnp.float32), 0.0)).astype(dtype)
    return dout.astype(dtype)


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
