"""Grouped matmul over expert-sorted rows in Pallas: forward, input gradient, weight gradient.

Same contract as :func:`kernels.xla_gmm.gmm`::

    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> out [M, N]
    out[r] = lhs[r] @ rhs[e(r)]     for off_e <= r < off_e + group_sizes[e]   (off = exclusive cumsum)
    out[r] = 0                      for r >= sum(group_sizes)

with fp32 accumulation and the output in ``lhs.dtype``. Optionally the relu² epilogue
``out = relu(lhs @ rhs)²`` is fused (computed on the fp32 accumulator). The VJP (``jax.custom_vjp``)::

    d lhs[r]  = dh[r] @ rhs[e(r)]ᵀ             (the same grouped kernel with rhs transposed in-kernel)
    d rhs[e]  = lhs[rows_e]ᵀ @ dh[rows_e]     (transposed grouped matmul, "tgmm")
    dh        = dout                       (no epilogue)   |   dout · 2·relu(h)   (relu², h = pre-activation)

Two launch layouts here share the math (a third, Mosaic GPU, lives in
:mod:`kernels.pallas_gmm_mgpu`; which one ``impl="pallas"`` runs on a platform is decided in
one place, :func:`kernels.pallas_gmm_variant` over :data:`kernels.AUTO`):

* ``variant="gpu"`` (Triton-style Pallas; what CPU runs under ``interpret=True``): grid
  ``(M/tm, N/tn)``; program ``(t, j)`` loops over the (usually one or two) groups overlapping row
  tile ``t`` and over K in ``tk`` steps, and writes its ``[tm, tn]`` tile once (rows no group owns
  are zero). The weight gradient uses grid ``(K/tk, N/tn, E)``; program ``(i, j, e)`` loops over
  the row tiles of group ``e`` (an empty group writes zeros). No atomics, no races.
* ``variant="tpu"`` (Mosaic TPU, megablox-style): grid ``(N/tn, V, K/tk)`` over a precomputed
  visit schedule of (row tile, group) pairs delivered by scalar prefetch, so the BlockSpec index
  maps DMA exactly the lhs tile and expert weights of each visit; consecutive visits to the same
  output tile keep it resident and each writes only its group's rows.

Ragged edges: M, K and N are zero-padded to the block multiples when they are not multiples
already (Nemotron's 2688/1856 with tk/tn = 128/64 need no padding); empty groups and groups
smaller than a tile are handled by the row masks.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tuning
from ._common import (apply_epilogue, check_gmm_shapes, epilogue_grad, on_cpu, pad_to, pallas_call,
                      pick_block, round_up, triton_params)
from .xla_gmm import group_offsets

__all__ = ["gmm", "tgmm", "tuned_blocks", "group_offsets", "tile_group_ranges", "visit_schedule"]

# ------------------------------------------------------------------------------------------
# Group metadata


def tile_group_ranges(group_sizes, num_tiles: int, tm: int):
    """For each row tile ``t`` the half-open range ``[g_lo[t], g_hi[t])`` of groups whose rows
    intersect ``[t·tm, (t+1)·tm)`` (empty groups included harmlessly; masks drop them)."""
    starts, ends = group_offsets(group_sizes)
    tile_lo = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    # first group with end > tile_lo ; last group with start < tile_hi
    g_lo = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)
    g_hi = jnp.searchsorted(starts, tile_lo + tm, side="left").astype(jnp.int32)
    return g_lo, jnp.maximum(g_hi, g_lo)


def visit_schedule(group_sizes, num_tiles: int, tm: int):
    """Megablox-style schedule ``(tile_ids [V], group_ids [V], valid [V])``, ``V = tiles + E``.

    Every group gets at least one visit (empty groups one masked visit, so the weight gradient
    writes their zeros); then the tiles past ``sum(group_sizes)`` get masked visits (so the
    forward writes their zeros). Tile ids are non-decreasing and group ids non-decreasing.
    """
    e = group_sizes.shape[0]
    v = num_tiles + e
    sizes = group_sizes.astype(jnp.int32)
    starts, ends = group_offsets(sizes)
    first = jnp.minimum(starts // tm, num_tiles - 1)
    last = jnp.where(sizes > 0, (jnp.maximum(ends, 1) - 1) // tm, first)
    n_vis = last - first + 1
    cum = jnp.cumsum(n_vis)
    idx = jnp.arange(v, dtype=jnp.int32)
    gid = jnp.minimum(jnp.searchsorted(cum, idx, side="right"), e - 1).astype(jnp.int32)
    tid_group = first[gid] + idx - (cum[gid] - n_vis[gid])
    total = ends[-1]
    covered_last = jnp.where(total > 0, (total - 1) // tm, -1)
    tid_trail = jnp.minimum(covered_last + 1 + idx - cum[-1], num_tiles - 1)
    in_groups = idx < cum[-1]
    tid = jnp.where(in_groups, tid_group, tid_trail).astype(jnp.int32)
    valid = in_groups & (sizes[gid] > 0)
    return tid, gid, valid


# ------------------------------------------------------------------------------------------
# Kernels: GPU layout (also what interpret mode runs on CPU)


def _gpu_gmm_kernel(glo_ref, ghi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, *out_refs,
                    tm, tk, tn, nk, transpose_rhs, epilogue):
    t = pl.program_id(0)
    j = pl.program_id(1)
    rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def per_group(g, out):
        def per_k(kk, acc):
            x = lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)]
            if transpose_rhs:  # rhs [E, N, K]
                w = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
                return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
            w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, nk, per_k, jnp.zeros((tm, tn), jnp.float32))
        mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        return jnp.where(mask, acc, out)

    out = jax.lax.fori_loop(glo_ref[t], ghi_ref[t], per_group, jnp.zeros((tm, tn), jnp.float32))
    if epilogue is None:
        out_refs[0][...] = out.astype(out_refs[0].dtype)
    else:
        out_refs[0][...] = out.astype(out_refs[0].dtype)  # pre-activation (kept for the VJP)
        out_refs[1][...] = apply_epilogue(out, epilogue).astype(out_refs[1].dtype)


def _gpu_tgmm_kernel(starts_ref, ends_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn):
    i = pl.program_id(0)
    j = pl.program_id(1)
    g = pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    t0 = start // tm
    t1 = jnp.where(end > start, (end - 1) // tm + 1, t0)

    def per_tile(t, acc):
        rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mask = (rows >= start) & (rows < end)
        x = lhs_ref[pl.ds(t * tm, tm), pl.ds(i * tk, tk)]
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
        dy = dout_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)]
        return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(t0, t1, per_tile, jnp.zeros((tk, tn), jnp.float32))
    out_ref[g, pl.ds(i * tk, tk), pl.ds(j * tn, tn)] = acc.astype(out_ref.dtype)


def _gpu_gmm(lhs, rhs, group_sizes, *, tm, tk, tn, transpose_rhs, epilogue, out_dtype, interpret):
    mp, kp = lhs.shape
    np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    num_tiles, nn, nk = mp // tm, np_ // tn, kp // tk
    starts, ends = group_offsets(group_sizes)
    g_lo, g_hi = tile_group_ranges(group_sizes, num_tiles, tm)
    n_out = 1 if epilogue is None else 2
    kernel = functools.partial(_gpu_gmm_kernel, tm=tm, tk=tk, tn=tn, nk=nk,
                               transpose_rhs=transpose_rhs, epilogue=epilogue)
    flops = 2 * mp * kp * np_
    out_shape = [jax.ShapeDtypeStruct((mp, np_), out_dtype)] * n_out
    outs = pallas_call(
        kernel,
        grid=(num_tiles, nn),
        in_specs=[pl.BlockSpec()] * 6,
        out_specs=[pl.BlockSpec((tm, tn), lambda t, j: (t, j))] * n_out,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=triton_params(interpret),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=0,
            bytes_accessed=lhs.nbytes * nn + rhs.nbytes + n_out * mp * np_ * jnp.dtype(out_dtype).itemsize),
        name="gmm_gpu",
    )(g_lo, g_hi, starts, ends, lhs, rhs)
    return outs


def _gpu_tgmm(lhs, dout, group_sizes, *, tm, tk, tn, out_dtype, interpret):
    mp, kp = lhs.shape
    np_ = dout.shape[1]
    e = group_sizes.shape[0]
    starts, ends = group_offsets(group_sizes)
    kernel = functools.partial(_gpu_tgmm_kernel, tm=tm, tk=tk, tn=tn)
    return pallas_call(
        kernel,
        grid=(kp // tk, np_ // tn, e),
        in_specs=[pl.BlockSpec()] * 4,
        out_specs=pl.BlockSpec(),  # whole array: each program stores its own [tk, tn] tile of drhs[g]
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
        interpret=interpret,
        compiler_params=triton_params(interpret),
        cost_estimate=pl.CostEstimate(flops=2 * mp * kp * np_, transcendentals=0,
                                      bytes_accessed=lhs.nbytes + dout.nbytes + e * kp * np_ * 2),
        name="tgmm_gpu",
    )(starts, ends, lhs, dout)


# ------------------------------------------------------------------------------------------
# Kernels: TPU layout (megablox-style scalar-prefetch schedule)


def _tpu_gmm_kernel(tids_ref, gids_ref, valid_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, *refs,
                    tm, nk, transpose_rhs, epilogue):
    out_refs, acc_ref = refs[:-1], refs[-1]
    v = pl.program_id(1)
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = lhs_ref[...]
    w = rhs_ref[...]
    if transpose_rhs:
        acc_ref[...] += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)
    else:
        acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(kk == nk - 1)
    def _():
        t, g = tids_ref[v], gids_ref[v]
        first = (v == 0) | (tids_ref[jnp.maximum(v - 1, 0)] != t)
        rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mask = (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (valid_ref[v] != 0)
        acc = acc_ref[...]
        vals = [acc] if epilogue is None else [acc, apply_epilogue(acc, epilogue)]
        for ref, val in zip(out_refs, vals):
            prev = jnp.where(first, jnp.zeros(ref.shape, ref.dtype), ref[...])
            ref[...] = jnp.where(mask, val.astype(ref.dtype), prev)


def _tpu_tgmm_kernel(tids_ref, gids_ref, valid_ref, starts_ref, ends_ref, lhs_ref, dout_ref,
                     out_ref, acc_ref, *, tm, nv):
    v = pl.program_id(2)
    g = gids_ref[v]
    first = (v == 0) | (gids_ref[jnp.maximum(v - 1, 0)] != g)
    last = (v == nv - 1) | (gids_ref[jnp.minimum(v + 1, nv - 1)] != g)

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    t = tids_ref[v]
    x = lhs_ref[...]
    rows = t * tm + jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
    mask = (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (valid_ref[v] != 0)
    x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    acc_ref[...] += jax.lax.dot_general(x, dout_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tpu_gmm(lhs, rhs, group_sizes, *, tm, tk, tn, transpose_rhs, epilogue, out_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu
    mp, kp = lhs.shape
    np_ = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    num_tiles, nn, nk = mp // tm, np_ // tn, kp // tk
    tids, gids, valid = visit_schedule(group_sizes, num_tiles, tm)
    starts, ends = group_offsets(group_sizes)
    nv = tids.shape[0]
    n_out = 1 if epilogue is None else 2
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, tids, gids, *_: (gids[v], j, kk))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, tids, gids, *_: (gids[v], kk, j))
    kernel = functools.partial(_tpu_gmm_kernel, tm=tm, nk=nk, transpose_rhs=transpose_rhs,
                               epilogue=epilogue)
    return pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(nn, nv, nk),
            in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, tids, *_: (tids[v], kk)), rhs_spec],
            out_specs=[pl.BlockSpec((tm, tn), lambda j, v, kk, tids, *_: (tids[v], j))] * n_out,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((mp, np_), out_dtype)] * n_out,
        interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * mp * kp * np_, transcendentals=0,
                                      bytes_accessed=lhs.nbytes * nn + rhs.nbytes + n_out * mp * np_ * 2),
        name="gmm_tpu",
    )(tids, gids, valid.astype(jnp.int32), starts, ends, lhs, rhs)


def _tpu_tgmm(lhs, dout, group_sizes, *, tm, tk, tn, out_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu
    mp, kp = lhs.shape
    np_ = dout.shape[1]
    e = group_sizes.shape[0]
    tids, gids, valid = visit_schedule(group_sizes, mp // tm, tm)
    starts, ends = group_offsets(group_sizes)
    nv = tids.shape[0]
    kernel = functools.partial(_tpu_tgmm_kernel, tm=tm, nv=nv)
    return pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(kp // tk, np_ // tn, nv),
            in_specs=[pl.BlockSpec((tm, tk), lambda i, j, v, tids, *_: (tids[v], i)),
                      pl.BlockSpec((tm, tn), lambda i, j, v, tids, *_: (tids[v], j))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, v, tids, gids, *_: (gids[v], i, j)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * mp * kp * np_, transcendentals=0,
                                      bytes_accessed=lhs.nbytes + dout.nbytes + e * kp * np_ * 2),
        name="tgmm_tpu",
    )(tids, gids, valid.astype(jnp.int32), starts, ends, lhs, dout)


# ------------------------------------------------------------------------------------------
# Padding wrappers and the custom VJP


def _blocks(m, k, n, block_m, block_k, block_n, variant, interpret):
    """Row/contraction/column tiles. Compiled Mosaic TPU needs lane dims (tk, tn) that are
    multiples of 128 (so N = 1856 is padded to 1920 there); GPU and interpret mode take any
    power of two (1856 = 29·64 runs with 64-wide column tiles unpadded); compiled Triton dots need
    every tile dim >= 16."""
    lane_min = 128 if (variant == "tpu" and not interpret) else (8 if interpret else 16)
    tm = pick_block(m, max(block_m, 8 if interpret else 16), 8 if interpret else 16)
    tk = pick_block(k, max(block_k, lane_min), lane_min)
    tn = pick_block(n, max(block_n, lane_min), lane_min)
    return tm, tk, tn


def _gmm_call(lhs, rhs, group_sizes, cfg, *, transpose_rhs=False, epilogue=None, out_dtype=None):
    """Pads, launches and crops. ``rhs`` is ``[E, K, N]`` (or ``[E, N, K]`` if transposed)."""
    variant, bm, bk, bn, interpret = cfg
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _blocks(m, k, n, bm, bk, bn, variant, interpret)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
    if transpose_rhs:
        rhs_p = pad_to(pad_to(rhs, 1, np_), 2, kp)
    else:
        rhs_p = pad_to(pad_to(rhs, 1, kp), 2, np_)
    fn = _tpu_gmm if variant == "tpu" else _gpu_gmm
    outs = fn(lhs_p, rhs_p, group_sizes, tm=tm, tk=tk, tn=tn, transpose_rhs=transpose_rhs,
              epilogue=epilogue, out_dtype=out_dtype or lhs.dtype, interpret=interpret)
    return [o[:m, :n] for o in outs]


def _tgmm_call(lhs, dout, group_sizes, cfg, out_dtype):
    variant, bm, bk, bn, interpret = cfg
    m, k = lhs.shape
    n = dout.shape[1]
    tm, tk, tn = _blocks(m, k, n, bm, bk, bn, variant, interpret)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    lhs_p = pad_to(pad_to(lhs, 0, mp), 1, kp)
    dout_p = pad_to(pad_to(dout, 0, mp), 1, np_)
    fn = _tpu_tgmm if variant == "tpu" else _gpu_tgmm
    out = fn(lhs_p, dout_p, group_sizes, tm=tm, tk=tk, tn=tn, out_dtype=out_dtype, interpret=interpret)
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, cfg, epilogue):
    outs = _gmm_call(lhs, rhs, group_sizes, cfg, epilogue=epilogue)
    return outs[-1]


def _gmm_fwd(lhs, rhs, group_sizes, cfg, epilogue):
    outs = _gmm_call(lhs, rhs, group_sizes, cfg, epilogue=epilogue)
    pre = outs[0] if epilogue is not None else None
    return outs[-1], (lhs, rhs, group_sizes, pre)


def _gmm_bwd(cfg, epilogue, res, dout):
    lhs, rhs, group_sizes, pre = res
    dh = epilogue_grad(dout, pre, epilogue, lhs.dtype)
    dlhs = _gmm_call(dh, rhs, group_sizes, cfg, transpose_rhs=True, out_dtype=lhs.dtype)[0]
    drhs = _tgmm_call(lhs, dh, group_sizes, cfg, rhs.dtype)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


_VARIANTS = ("gpu", "tpu")


def _variant(variant: Optional[str]) -> str:
    """``variant`` or, when None, the platform's layout from the kernel switch
    (:func:`kernels.pallas_gmm_variant`; never ``"mosaic"`` here)."""
    if variant is None:
        from . import pallas_gmm_variant  # the package's switch (kernels/__init__.py)
        variant = pallas_gmm_variant()
    if variant not in _VARIANTS:
        raise ValueError(f"pallas_gmm: variant must be one of {_VARIANTS}, got {variant!r} (the Mosaic GPU "
                         f"kernel is kernels.pallas_gmm_mgpu, reached through kernels.grouped_matmul)")
    return variant


def tuned_blocks(variant: str, m: int, k: int, n: int, block_m=None, block_k=None, block_n=None):
    """``(block_m, block_k, block_n)``: the given ones, else the tuning table's entry for
    ``gmm_<variant>`` at ``(m, k, n)`` on this device (:func:`kernels.tuning.lookup`), else 128."""
    t = tuning.lookup("gmm_triton" if variant == "gpu" else "gmm_tpu", m=m, k=k, n=n)
    return (block_m or t.get("block_m", 128), block_k or t.get("block_k", 128),
            block_n or t.get("block_n", 128))


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, epilogue: Optional[str] = None,
        variant: Optional[str] = None, block_m: Optional[int] = None, block_k: Optional[int] = None,
        block_n: Optional[int] = None, interpret: Optional[bool] = None) -> jax.Array:
    """Grouped matmul ``[M, K] × [E, K, N] -> [M, N]`` (see module docstring).

    ``epilogue``: ``None`` or ``"relu2"`` (``relu(·)²`` fused on the fp32 accumulator).
    ``variant``: ``"gpu"`` (Triton lowering; what interpret mode runs) | ``"tpu"`` (Mosaic TPU);
    default: the platform's, from :func:`kernels.pallas_gmm_variant`.
    ``block_*``: default from the tuning table, else 128 (:func:`tuned_blocks`); the backward
    uses the forward's blocks.
    ``interpret``: default ``True`` exactly when running on CPU.
    """
    check_gmm_shapes(lhs, rhs, group_sizes, epilogue)
    variant = _variant(variant)
    interpret = on_cpu() if interpret is None else interpret
    block_m, block_k, block_n = tuned_blocks(variant, lhs.shape[0], lhs.shape[1], rhs.shape[2],
                                             block_m, block_k, block_n)
    cfg = (variant, block_m, block_k, block_n, interpret)
    return _gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), cfg, epilogue)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, variant: Optional[str] = None,
         block_m: Optional[int] = None, block_k: Optional[int] = None, block_n: Optional[int] = None,
         interpret: Optional[bool] = None) -> jax.Array:
    """``out[e] = lhs[rows_e]ᵀ @ dout[rows_e]`` -> ``[E, K, N]`` (fp32 accumulation, ``lhs.dtype``);
    blocks as in :func:`gmm` (the table entry of the forward shape ``(M, K, N)``)."""
    variant = _variant(variant)
    interpret = on_cpu() if interpret is None else interpret
    block_m, block_k, block_n = tuned_blocks(variant, lhs.shape[0], lhs.shape[1], dout.shape[1],
                                             block_m, block_k, block_n)
    cfg = (variant, block_m, block_k, block_n, interpret)
    return _tgmm_call(lhs, dout, group_sizes.astype(jnp.int32), cfg, lhs.dtype)
