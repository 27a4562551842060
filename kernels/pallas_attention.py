"""Flash attention in Pallas: causal GQA with packed segments, forward + backward (custom VJP).

Same contract as :func:`kernels.xla_attention.attention`::

    attention(q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], *, q_positions [B, T],
              kv_positions [B, S], q_segment_ids [B, T], kv_segment_ids [B, S], kv_valid [B, S],
              scale) -> o [B, T, Hq, D]

    visible(t, s) = kv_pos[s] <= q_pos[t]  and  q_seg[t] == kv_seg[s]  and  kv_valid[s]
    o[t, h] = Σ_s softmax_s(scale · q[t, h]·k[s, h // R]  | visible) v[s, h // R]     (R = Hq / Hkv)

(a query with no visible key returns zeros). Query head ``h`` reads KV head ``h // R`` through the
BlockSpec index map — repeats are never materialised.

Forward (grid ``(B, Hq, T/bq)``): online softmax over the KV blocks ``[lo_i, hi_i)`` that can hold
a visible key for query block ``i`` (found from per-block summaries of positions, segment ids and
validity, so causal and packed layouts skip dead blocks), saving ``lse = m + log l`` per query.

Backward (FlashAttention-2 style, two kernels, no atomics), with ``Δ_t = Σ_d dO[t]·O[t]``::

    P = exp(scale·QKᵀ − lse),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − Δ),
    dQ = scale · dS K,         dK = scale · dSᵀ Q

``dq`` kernel: grid ``(B, Hq, T/bq)`` looping KV blocks; ``dkv`` kernel: grid ``(B, Hkv, S/bk)``
looping the R query heads of the group and the query blocks ``[qlo_j, qhi_j)`` — dK/dV of a KV
head are summed over its query heads inside one program.

Context parallelism: :func:`attention_context_parallel` (inside ``shard_map``) all-gathers K/V
and their metadata over the sequence axis and runs the local queries against the full K/V; the
transpose of the all-gather reduce-scatters dK/dV. Any token order works (the masks use the
positions), so a load-balanced (zig-zag) sharding of a causal sequence is the caller's choice.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tuning
from ._common import attention_args, on_cpu, pad_to, pick_block, round_up, pallas_call, triton_params

__all__ = ["attention", "attention_context_parallel", "block_ranges", "zigzag_permutation"]

_BIG = 2 ** 30


# ------------------------------------------------------------------------------------------
# Block ranges from per-block metadata summaries


def _block_summary(pos, seg, valid, blk, for_kv):
    """Per block: (min or max position, min segment, max segment, any valid) over valid rows."""
    b, n = pos.shape
    nb = n // blk
    pos = pos.reshape(b, nb, blk)
    seg = seg.reshape(b, nb, blk)
    valid = valid.reshape(b, nb, blk)
    if for_kv:
        p = jnp.min(jnp.where(valid, pos, _BIG), axis=-1)
    else:
        p = jnp.max(jnp.where(valid, pos, -_BIG), axis=-1)
    smin = jnp.min(jnp.where(valid, seg, _BIG), axis=-1)
    smax = jnp.max(jnp.where(valid, seg, -_BIG), axis=-1)
    return p, smin, smax, jnp.any(valid, axis=-1)


def block_ranges(q_pos, kv_pos, q_seg, kv_seg, q_valid, kv_valid, bq, bk):
    """Relevance of KV block j to query block i (a superset of "holds a visible pair"), reduced to
    contiguous ranges: ``(kv_lo [B, nq], kv_hi [B, nq], q_lo [B, nk], q_hi [B, nk])``."""
    qp, qs0, qs1, qa = _block_summary(q_pos, q_seg, q_valid, bq, False)
    kp, ks0, ks1, ka = _block_summary(kv_pos, kv_seg, kv_valid, bk, True)
    rel = ((kp[:, None, :] <= qp[:, :, None]) & (ks0[:, None, :] <= qs1[:, :, None])
           & (qs0[:, :, None] <= ks1[:, None, :]) & qa[:, :, None] & ka[:, None, :])  # [B, nq, nk]

    def lo_hi(r):  # r [B, X, Y] -> first/last+1 true along Y (0, 0 if none)
        y = r.shape[-1]
        idx = jnp.arange(y, dtype=jnp.int32)
        lo = jnp.min(jnp.where(r, idx, y), axis=-1)
        hi = jnp.max(jnp.where(r, idx + 1, 0), axis=-1)
        return jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)

    kv_lo, kv_hi = lo_hi(rel)
    q_lo, q_hi = lo_hi(jnp.swapaxes(rel, 1, 2))
    return kv_lo, kv_hi, q_lo, q_hi


# ------------------------------------------------------------------------------------------
# Kernels


def _mask(qpos, qseg, kpos, kseg, kval):
    """qpos/qseg [bq], k* [bk] -> bool [bq, bk]."""
    return (kpos[None, :] <= qpos[:, None]) & (kseg[None, :] == qseg[:, None]) & (kval[None, :] != 0)


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                kval_ref, o_ref, lse_ref, *, bk, scale):
    b, i = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]  # [bq, D]
    qpos, qseg = qpos_ref[...], qseg_ref[...]
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        sl = pl.ds(j * bk, bk)
        k = k_ref[sl, :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        mask = _mask(qpos, qseg, kpos_ref[sl], kseg_ref[sl], kval_ref[sl])
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.where(mask, jnp.exp(s - m_use[:, None]), 0.0)
        alpha = jnp.exp(m - m_use)
        l = alpha * l + jnp.sum(p, axis=1)
        v = v_ref[sl, :]
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
               kpos_ref, kseg_ref, kval_ref, dq_ref, *, bk, scale):
    b, i = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qpos, qseg = qpos_ref[...], qseg_ref[...]

    def body(j, dq):
        sl = pl.ds(j * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        mask = _mask(qpos, qseg, kpos_ref[sl], kseg_ref[sl], kval_ref[sl])
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref,
                kpos_ref, kseg_ref, kval_ref, dk_ref, dv_ref, *, bq, rep, scale):
    b, j = pl.program_id(0), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    kpos, kseg, kval = kpos_ref[...], kseg_ref[...], kval_ref[...]
    lo, hi = lo_ref[b, j], hi_ref[b, j]

    def per_head(hh, carry):
        def body(i, carry):
            dk, dv = carry
            sl = pl.ds(i * bq, bq)
            q = q_ref[sl, hh, :]
            do = do_ref[sl, hh, :]
            lse = lse_ref[hh, sl]
            delta = delta_ref[hh, sl]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            mask = _mask(qpos_ref[sl], qseg_ref[sl], kpos, kseg, kval)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return dk, dv

        return jax.lax.fori_loop(lo, hi, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, rep, per_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------
# Launchers


def _query_grid_specs(bq, sp, d, rep):
    """BlockSpecs on the grid ``(B, Hq, T/bq)`` shared by the forward and the dq kernel:
    ``(q_tile, kv, row, meta)`` — a query-block tile (q, o, dO, dq), the full K/V of the head's KV
    group, a per-(head, query-block) row (lse, Δ), and the five metadata specs in kernel order
    (q positions, q segments, kv positions, kv segments, kv validity)."""
    q_meta = pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))
    kv_meta = pl.BlockSpec((None, sp), lambda b_, h, i: (b_, 0))
    return (pl.BlockSpec((None, bq, None, d), lambda b_, h, i: (b_, i, h, 0)),
            pl.BlockSpec((None, sp, None, d), lambda b_, h, i: (b_, 0, h // rep, 0)),
            pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i)),
            [q_meta, q_meta, kv_meta, kv_meta, kv_meta])


def _fwd_call(q, k, v, meta, ranges, cfg):
    bq, bk, scale, interpret = cfg
    b, tp, hq, d = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    qpos, qseg, kpos, kseg, kval = meta
    kv_lo, kv_hi = ranges[0], ranges[1]
    kernel = functools.partial(_fwd_kernel, bk=bk, scale=scale)
    q_tile, kv, row, meta_specs = _query_grid_specs(bq, sp, d, rep)
    return pallas_call(
        kernel,
        grid=(b, hq, tp // bq),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_tile, kv, kv, *meta_specs],
        out_specs=[q_tile, row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(interpret, 4 if d <= 64 else 8, 3),
        cost_estimate=pl.CostEstimate(flops=2 * b * hq * tp * sp * d, transcendentals=b * hq * tp * sp // 2,
                                      bytes_accessed=2 * q.nbytes + k.nbytes + v.nbytes),
        name="flash_attention_fwd",
    )(kv_lo, kv_hi, q, k, v, qpos, qseg, kpos, kseg, kval)


def _bwd_call(q, k, v, do, lse, delta, meta, ranges, cfg):
    bq, bk, scale, interpret = cfg
    b, tp, hq, d = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    qpos, qseg, kpos, kseg, kval = meta
    kv_lo, kv_hi, q_lo, q_hi = ranges
    params = triton_params(interpret, 4 if d <= 64 else 8, 2)
    q_tile, kv, row, meta_specs = _query_grid_specs(bq, sp, d, rep)
    dq = pallas_call(
        functools.partial(_dq_kernel, bk=bk, scale=scale),
        grid=(b, hq, tp // bq),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), q_tile, kv, kv, q_tile, row, row, *meta_specs],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=4 * b * hq * tp * sp * d, transcendentals=b * hq * tp * sp // 2,
                                      bytes_accessed=3 * q.nbytes + k.nbytes + v.nbytes),
        name="flash_attention_dq",
    )(kv_lo, kv_hi, q, k, v, do, lse, delta, qpos, qseg, kpos, kseg, kval)
    dk, dv = pallas_call(
        functools.partial(_dkv_kernel, bq=bq, rep=rep, scale=scale),
        grid=(b, hkv, sp // bk),
        in_specs=[
            pl.BlockSpec(), pl.BlockSpec(),
            pl.BlockSpec((None, tp, rep, d), lambda b_, g, j: (b_, 0, g, 0)),
            pl.BlockSpec((None, bk, None, d), lambda b_, g, j: (b_, j, g, 0)),
            pl.BlockSpec((None, bk, None, d), lambda b_, g, j: (b_, j, g, 0)),
            pl.BlockSpec((None, tp, rep, d), lambda b_, g, j: (b_, 0, g, 0)),
            pl.BlockSpec((None, rep, tp), lambda b_, g, j: (b_, g, 0)),
            pl.BlockSpec((None, rep, tp), lambda b_, g, j: (b_, g, 0)),
            pl.BlockSpec((None, tp), lambda b_, g, j: (b_, 0)),
            pl.BlockSpec((None, tp), lambda b_, g, j: (b_, 0)),
            pl.BlockSpec((None, bk), lambda b_, g, j: (b_, j)),
            pl.BlockSpec((None, bk), lambda b_, g, j: (b_, j)),
            pl.BlockSpec((None, bk), lambda b_, g, j: (b_, j)),
        ],
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda b_, g, j: (b_, j, g, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=params,
        cost_estimate=pl.CostEstimate(flops=6 * b * hq * tp * sp * d, transcendentals=b * hq * tp * sp // 2,
                                      bytes_accessed=3 * q.nbytes + 2 * k.nbytes + 2 * v.nbytes),
        name="flash_attention_dkv",
    )(q_lo, q_hi, q, k, v, do, lse, delta, qpos, qseg, kpos, kseg, kval)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, meta, ranges, cfg):
    return _fwd_call(q, k, v, meta, ranges, cfg)[0]


def _flash_fwd(q, k, v, meta, ranges, cfg):
    o, lse = _fwd_call(q, k, v, meta, ranges, cfg)
    return o, (q, k, v, o, lse, meta, ranges)


def _flash_bwd(cfg, res, do):
    q, k, v, o, lse, meta, ranges = res
    delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    dq, dk, dv = _bwd_call(q, k, v, do, lse, delta, meta, ranges, cfg)
    zeros = jax.tree.map(lambda x: None, (meta, ranges))
    return (dq, dk, dv) + zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None,
              kv_segment_ids=None, kv_valid=None, scale=None, block_q: Optional[int] = None,
              block_k: Optional[int] = None, interpret: Optional[bool] = None):
    """Pallas flash attention (see module docstring). ``block_q``/``block_k``: default from the
    tuning table (``attention`` at ``(t, s, d)``, :func:`kernels.tuning.lookup`), else 128; capped
    by the (padded) sequence lengths; T and S are padded to the blocks internally."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    tuned = tuning.lookup("attention", t=t, s=s, d=d)
    block_q = block_q or tuned.get("block_q", 128)
    block_k = block_k or tuned.get("block_k", 128)
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid = attention_args(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid)
    interpret = on_cpu() if interpret is None else interpret
    scale = d ** -0.5 if scale is None else float(scale)
    i32 = jnp.int32
    tmin = 8 if interpret else 16  # Triton dots need >= 16 rows/cols (a decode query pads to 16)
    bq = pick_block(t, max(block_q, tmin), tmin)
    bk = pick_block(s, max(block_k, tmin), tmin)
    tp, sp = round_up(t, bq), round_up(s, bk)
    qpos = pad_to(q_positions.astype(i32), 1, tp)
    qseg = pad_to(q_segment_ids.astype(i32), 1, tp)
    q_valid = pad_to(jnp.ones((b, t), bool), 1, tp, False)
    kpos = pad_to(kv_positions.astype(i32), 1, sp)
    kseg = pad_to(kv_segment_ids.astype(i32), 1, sp)
    kval = pad_to(kv_valid.astype(bool), 1, sp, False)
    ranges = block_ranges(qpos, kpos, qseg, kseg, q_valid, kval, bq, bk)
    meta = (qpos, qseg, kpos, kseg, kval.astype(i32))
    o = _flash(pad_to(q, 1, tp), pad_to(k, 1, sp), pad_to(v.astype(k.dtype), 1, sp), meta, ranges,
               (bq, bk, scale, interpret))
    return o[:, :t]


# ------------------------------------------------------------------------------------------
# Context parallelism


def attention_context_parallel(q, k, v, *, axis_name: str, q_positions, kv_positions,
                               q_segment_ids=None, kv_segment_ids=None, kv_valid=None, scale=None,
                               attention_fn=None, **kw):
    """Call inside ``shard_map`` with the sequence axis (dim 1) sharded over ``axis_name``.

    Each shard holds its queries and its slice of K/V; K/V and their positions, segment ids and
    validity are all-gathered (tiled) over ``axis_name`` and the local queries attend the full
    sequence. Positions must be global (they define causality); gradients flow back through the
    all-gather (its transpose is a reduce-scatter of dK/dV). ``attention_fn`` defaults to this
    module's Pallas kernel; any function with the attention signature works.
    """
    attention_fn = attention_fn or attention
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, axis=1, tiled=True)
    kg, vg = gather(k), gather(v)
    kpos = gather(kv_positions)
    kseg = None if kv_segment_ids is None else gather(kv_segment_ids)
    kval = None if kv_valid is None else gather(kv_valid)
    return attention_fn(q, kg, vg, q_positions=q_positions, kv_positions=kpos,
                        q_segment_ids=q_segment_ids, kv_segment_ids=kseg, kv_valid=kval,
                        scale=scale, **kw)


def zigzag_permutation(seq_len: int, num_shards: int):
    """Token order that balances causal work over ``num_shards`` contiguous shards: the sequence is
    cut into ``2·num_shards`` chunks and shard ``i`` gets chunks ``i`` and ``2·num_shards−1−i``.
    Returns ``perm [seq_len]`` (apply with ``x[:, perm]``; positions travel with the tokens)."""
    if seq_len % (2 * num_shards):
        raise ValueError(f"zigzag: seq_len {seq_len} not a multiple of 2·{num_shards}")
    c = seq_len // (2 * num_shards)
    chunks = jnp.arange(seq_len).reshape(2 * num_shards, c)
    order = [i for s in range(num_shards) for i in (s, 2 * num_shards - 1 - s)]
    return chunks[jnp.array(order)].reshape(-1)
