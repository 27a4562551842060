"""Grouped matmul for Hopper GPUs in Pallas Mosaic GPU (wgmma + TMA pipelines), tile-aligned layout.

Same contract and VJP as :func:`kernels.pallas_gmm.gmm`. Rows are first scattered into a
*tile-aligned* layout in which every group starts on a multiple of ``block_m`` (see
:func:`kernels.moe_dispatch.padded_layout`), so every row tile belongs to exactly one expert and
the kernel never masks: program ``(i, j)`` of grid ``(tiles, N/bn)`` reads ``g = tile_group[i]``
(``-1`` for unused tiles, which are skipped), pipelines ``K/bk`` steps of
``acc += lhs[i·bm:(i+1)·bm, k-block] @ rhs[g][k-block, j-block]`` through shared memory
(``wgmma``), applies the optional relu² epilogue on the fp32 accumulator and stores the tile with
TMA. The input gradient is the same kernel with ``rhs[g]`` read transposed in shared memory;
the weight gradient (transposed grouped matmul) uses the Triton-lowered kernel of
:mod:`kernels.pallas_gmm` (resetting a wgmma accumulator at group boundaries inside one pipeline
did not run under the Mosaic GPU interpreter of this JAX version, so it stays on Triton).

Callers that build the tile-aligned layout themselves (fusing it into the token permutation)
can call :func:`gmm_aligned` directly and skip the scatter/gather copies.

Constraints: ``K % block_k == 0`` and ``N % block_n == 0`` after the wrapper's zero-padding;
bf16/fp16 operands. Verified on CPU with the Mosaic GPU interpreter and by lowering for an H100;
not yet run on the device.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import pallas_gmm  # its Triton-layout weight gradient (one-way: pallas_gmm never imports this)
from . import tuning
from ._common import apply_epilogue, check_gmm_shapes, epilogue_grad, pad_to, round_up
from .moe_dispatch import padded_layout

__all__ = ["gmm", "gmm_aligned", "aligned_tiles", "tuned_blocks"]


def aligned_tiles(group_sizes, num_rows: int, block_m: int):
    """Tile-aligned layout: ``(dest [num_rows], tile_group [rows_p / bm], rows_p)``; rows of group
    ``g`` go to ``dest``, tile ``i`` belongs to ``tile_group[i]`` or to none (``-1``)."""
    dest, padded, rows_p = padded_layout(group_sizes, num_rows, block_m)
    pends = jnp.cumsum(padded)
    starts = jnp.arange(rows_p // block_m, dtype=jnp.int32) * block_m
    g = jnp.searchsorted(pends, starts, side="right").astype(jnp.int32)
    return dest, jnp.where(starts < pends[-1], g, -1).astype(jnp.int32), rows_p


def _mgpu_params():
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def gmm_aligned(lhs_p, rhs, tile_group, *, block_m: int, block_k: int = 64, block_n: int = 128,
                transpose_rhs: bool = False, epilogue: Optional[str] = None, max_concurrent_steps: int = 4):
    """``lhs_p [rows_p, K]`` in tile-aligned layout × ``rhs [E, K, N]`` (``[E, N, K]`` if
    ``transpose_rhs``) -> ``[rows_p, N]`` (and the relu² output if ``epilogue``). Unused tiles
    (``tile_group = -1``) are left unwritten."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    rows_p, k = lhs_p.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm, bk, bn = block_m, block_k, block_n
    if rows_p % bm or k % bk or n % bn:
        raise ValueError(f"gmm_aligned: shapes ({rows_p}, {k}, {n}) not multiples of blocks ({bm}, {bk}, {bn})")
    n_out = 1 if epilogue is None else 2

    def body(tg_gmem, lhs_gmem, rhs_gmem, *out_gmems):
        i = jax.lax.axis_index("m")
        j = jax.lax.axis_index("n")
        g = tg_gmem[i]

        @pl.when(g >= 0)
        def _():
            def acc_scope(acc_ref):
                rhs_spec = (plgpu.BlockSpec((bn, bk), lambda kk: (j, kk)) if transpose_rhs
                            else plgpu.BlockSpec((bk, bn), lambda kk: (kk, j)))

                def step(_, a_smem, b_smem):
                    plgpu.wgmma(acc_ref, a_smem, b_smem.T if transpose_rhs else b_smem)

                plgpu.emit_pipeline(
                    step, grid=(k // bk,),
                    in_specs=[plgpu.BlockSpec((bm, bk), lambda kk: (i, kk)), rhs_spec],
                    max_concurrent_steps=max_concurrent_steps,
                )(lhs_gmem, rhs_gmem.at[g])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
            vals = [acc] if epilogue is None else [acc, apply_epilogue(acc, epilogue)]

            def store(*smems):
                for smem, val in zip(smems, vals):
                    smem[...] = val.astype(smem.dtype)
                plgpu.commit_smem()
                for smem, out in zip(smems, out_gmems):
                    plgpu.copy_smem_to_gmem(smem, out.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(store, *[plgpu.SMEM((bm, bn), o.dtype) for o in out_gmems])

    out_type = [jax.ShapeDtypeStruct((rows_p, n), lhs_p.dtype)] * n_out
    return plgpu.kernel(body, out_type=out_type, grid=(rows_p // bm, n // bn), grid_names=("m", "n"),
                        compiler_params=_mgpu_params())(tile_group, lhs_p, rhs)


def _pick_bn(n):
    for b in (128, 64):
        if n % b == 0:
            return b
    return 64


def _call(lhs, rhs, group_sizes, cfg, *, transpose_rhs=False, epilogue=None):
    bm, bk = cfg
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    kp, np_ = round_up(k, bk), round_up(n, 64)
    bn = _pick_bn(np_)
    lhs = pad_to(lhs, 1, kp)
    rhs = (pad_to(pad_to(rhs, 1, np_), 2, kp) if transpose_rhs
           else pad_to(pad_to(rhs, 1, kp), 2, np_))
    dest, tile_group, rows_p = aligned_tiles(group_sizes, m, bm)
    lhs_p = jnp.zeros((rows_p, kp), lhs.dtype).at[dest].set(lhs, mode="drop")
    outs = gmm_aligned(lhs_p, rhs, tile_group, block_m=bm, block_k=bk, block_n=bn,
                       transpose_rhs=transpose_rhs, epilogue=epilogue)
    return [o.at[dest].get(mode="fill", fill_value=0)[:, :n] for o in outs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, cfg, epilogue):
    return _call(lhs, rhs, group_sizes, cfg, epilogue=epilogue)[-1]


def _gmm_fwd(lhs, rhs, group_sizes, cfg, epilogue):
    outs = _call(lhs, rhs, group_sizes, cfg, epilogue=epilogue)
    return outs[-1], (lhs, rhs, group_sizes, outs[0] if epilogue is not None else None)


def _gmm_bwd(cfg, epilogue, res, dout):
    lhs, rhs, group_sizes, pre = res
    dh = epilogue_grad(dout, pre, epilogue, lhs.dtype)
    dlhs = _call(dh, rhs, group_sizes, cfg, transpose_rhs=True)[0]
    drhs = pallas_gmm.tgmm(lhs, dh, group_sizes, variant="gpu")  # Triton (interpret on CPU)
    return dlhs, drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tuned_blocks(m: int, k: int, n: int, block_m: Optional[int] = None, block_k: Optional[int] = None):
    """``(block_m, block_k)``: the given ones, else the tuning table's ``gmm_mosaic`` entry at
    ``(m, k, n)`` on this device (:func:`kernels.tuning.lookup`), else ``block_m`` 64 (less
    padding per expert) up to 32K rows and 128 above, ``block_k`` 64."""
    t = tuning.lookup("gmm_mosaic", m=m, k=k, n=n)
    return (block_m or t.get("block_m", 64 if m <= 32768 else 128), block_k or t.get("block_k", 64))


def gmm(lhs, rhs, group_sizes, *, epilogue: Optional[str] = None, block_m: Optional[int] = None,
        block_k: Optional[int] = None):
    """Mosaic GPU grouped matmul ``[M, K] × [E, K, N] -> [M, N]`` (contract of
    :func:`kernels.xla_gmm.gmm`); blocks from :func:`tuned_blocks`."""
    check_gmm_shapes(lhs, rhs, group_sizes, epilogue)
    bm, bk = tuned_blocks(lhs.shape[0], lhs.shape[1], rhs.shape[2], block_m, block_k)
    return _gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), (bm, bk), epilogue)
