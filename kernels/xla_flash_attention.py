"""Blockwise (online-softmax) causal GQA attention with packed segment ids, in plain XLA.

Same contract as :func:`kernels.xla_attention.attention` (visibility ``kv_pos <= q_pos`` & same
segment & ``kv_valid``; query head ``j`` reads KV head ``j // (Hq/Hkv)``; fp32 scores and softmax;
a query with no visible key returns zeros), but the scores are never materialised whole: queries
are cut in blocks of ``block_q`` (``lax.map``) and, per query block, an ``lax.scan`` over key
blocks of ``block_k`` keeps the running maximum ``m``, normaliser ``l`` and fp32 accumulator
``acc`` (the online softmax)::

    s_j   = scale · q k_jᵀ  (masked entries -inf)          [Bq, Bk] per head, fp32
    m'    = max(m, rowmax s_j),  α = exp(m - m'),  p_j = exp(s_j - m')
    l'    = α·l + rowsum p_j
    acc'  = α·acc + cast(p_j, v.dtype) · v_j                (fp32 accumulation)
    out   = acc / l   (0 where l = 0),   lse = m + log l

so live memory is O(Bq·Bk) scores plus O(T·D) outputs, not O(T·S).

Gradients: a ``custom_vjp`` with the flash-attention backward, recomputing each score block from
the saved ``lse`` (``p = exp(s - lse)``, exactly the normalised softmax) and
``Δ = rowsum(dO ∘ out)``::

    dv_j += pᵀ dO,   dp = dO v_jᵀ,   ds = p ∘ (dp - Δ),   dq += scale · ds k_j,   dk_j += scale · dsᵀ q

(an outer scan over key blocks carrying ``dq`` in fp32, an inner scan over query blocks carrying
``dk_j, dv_j``).

Rounding versus the full-score reference: identical math, but (1) the reference casts the
*normalised* probabilities to ``v.dtype`` before the value product, this form casts the
*unnormalised* ``exp(s - m_running)`` and divides by ``l`` in fp32 afterwards, with per-block
rescaling by ``α``; (2) sums run blockwise. In fp32 the two agree to ~1e-6 relative; with bf16
``v`` they differ at bf16 rounding (~1e-2 relative on outputs). The backward uses the output
rounded to ``q.dtype`` in ``Δ`` (the reference's autodiff uses the fp32 product), which again only
matters below fp32.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from ._common import attention_args, pad_to

__all__ = ["attention"]


def _mask(qpos, qseg, kpos, kseg, kval):
    """``[B, Bq, Bk]`` visibility of one (query block, key block) pair."""
    m = kpos[:, None, :] <= qpos[:, :, None]
    m &= qseg[:, :, None] == kseg[:, None, :]
    return m & kval[:, None, :]


def _blocks(x, n, axis=1):
    """``[B, n·blk, ...] -> [n, B, blk, ...]``."""
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x):
    """``[n, B, blk, ...] -> [B, n·blk, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _fwd_impl(scale, nq, nk, q, k, v, qpos, qseg, kpos, kseg, kval):
    """Padded, grouped inputs ``q [B, T, Hkv, G, D]``, ``k, v [B, S, Hkv, D]`` ->
    ``(out [B, T, Hkv, G, D] in q.dtype, lse [B, T, Hkv, G] fp32)``."""
    kb = (_blocks(k, nk), _blocks(v, nk), _blocks(kpos, nk), _blocks(kseg, nk), _blocks(kval, nk))

    def q_block(xs):
        qi, qpos_i, qseg_i = xs
        b, bq, hkv, g, d = qi.shape

        def step(carry, kv):
            m, l, acc = carry
            kj, vj, kpos_j, kseg_j, kval_j = kv
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
            vis = _mask(qpos_i, qseg_i, kpos_j, kseg_j, kval_j)[:, None, None]
            s = jnp.where(vis, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj,
                                                      preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, kb)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        # [B, Hkv, G, Bq, (D)] -> [B, Bq, Hkv, G, (D)]
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), jnp.moveaxis(lse, 3, 1)

    out, lse = jax.lax.map(q_block, (_blocks(q, nq), _blocks(qpos, nq), _blocks(qseg, nq)))
    return _unblocks(out), _unblocks(lse)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale, nq, nk, q, k, v, qpos, qseg, kpos, kseg, kval):
    return _fwd_impl(scale, nq, nk, q, k, v, qpos, qseg, kpos, kseg, kval)[0]


def _flash_fwd(scale, nq, nk, q, k, v, qpos, qseg, kpos, kseg, kval):
    out, lse = _fwd_impl(scale, nq, nk, q, k, v, qpos, qseg, kpos, kseg, kval)
    return out, (q, k, v, qpos, qseg, kpos, kseg, kval, out, lse)


def _flash_bwd(scale, nq, nk, res, dout):
    q, k, v, qpos, qseg, kpos, kseg, kval, out, lse = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, Hkv, G]
    qb = (_blocks(q, nq), _blocks(dout, nq), _blocks(lse, nq), _blocks(delta, nq),
          _blocks(qpos, nq), _blocks(qseg, nq))
    kb = (_blocks(k, nk), _blocks(v, nk), _blocks(kpos, nk), _blocks(kseg, nk), _blocks(kval, nk))

    def k_block(dq, kv):
        kj, vj, kpos_j, kseg_j, kval_j = kv

        def q_step(carry, xs):
            dk, dv = carry
            qi, do_i, lse_i, delta_i, qpos_i, qseg_i = xs
            s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
            vis = _mask(qpos_i, qseg_i, kpos_j, kseg_j, kval_j)[:, None, None]
            lse_t = jnp.moveaxis(lse_i, 1, 3)[..., None]  # [B, Hkv, G, Bq, 1]
            p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lse_t), 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - jnp.moveaxis(delta_i, 1, 3)[..., None]) * scale
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj.astype(jnp.float32))
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi.astype(jnp.float32))
            return (dk, dv), dq_i

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv), dq_blocks = jax.lax.scan(q_step, (zeros, zeros), qb)
        return dq + dq_blocks, (dk, dv)

    dq0 = jnp.zeros(qb[0].shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(k_block, dq0, kb)
    return (_unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype),
            None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None,
              kv_segment_ids=None, kv_valid=None, scale=None, block_q: int = 512, block_k: int = 512):
    """``q [B, T, Hq, D]``, ``k, v [B, S, Hkv, D]`` -> ``[B, T, Hq, D]``; arguments as
    :func:`kernels.xla_attention.attention`. ``block_q`` / ``block_k``: query / key block sizes
    (clipped to ``T`` / ``S``; ``T``, ``S`` are padded up to a multiple, padded keys invisible)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid = attention_args(
        q, k, q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"attention: block_q={block_q} and block_k={block_k} must be >= 1")
    scale = d ** -0.5 if scale is None else scale
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = math.ceil(t / bq), math.ceil(s / bk)
    tp, sp = nq * bq, nk * bk
    qg = pad_to(q.reshape(b, t, hkv, hq // hkv, d), 1, tp, 0)
    out = _flash(float(scale), nq, nk, qg, pad_to(k, 1, sp, 0), pad_to(v, 1, sp, 0),
                 pad_to(q_positions.astype(jnp.int32), 1, tp, 0), pad_to(q_segment_ids.astype(jnp.int32), 1, tp, 0),
                 pad_to(kv_positions.astype(jnp.int32), 1, sp, 0), pad_to(kv_segment_ids.astype(jnp.int32), 1, sp, 0),
                 pad_to(kv_valid.astype(bool), 1, sp, False))
    return out[:, :t].reshape(b, t, hq, d)
