"""Causal GQA attention with packed segment ids: XLA reference (what CPU runs).

``attention(q [B, T, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], *, q_positions [B, T],
kv_positions [B, S], q_segment_ids [B, T], kv_segment_ids [B, S], kv_valid [B, S]) -> [B, T, Hq, D]``

Query ``t`` attends key ``s`` iff ``kv_positions[s] <= q_positions[t]`` (causal),
the segment ids are equal, and ``kv_valid[s]``. Query head ``j`` uses KV head ``j // (Hq/Hkv)``
(consecutive repeats) without materialising the repeats. Scores are fp32, softmax in fp32, the
probabilities are cast to ``v.dtype`` before the value product (as the transformers reference).
A query with no visible key returns zeros.

This full-score form materialises fp32 scores ``[B, Hq, T, S]``; ``kernels.attention(impl="xla")``
runs it below ``kernels.XLA_BLOCKWISE_MIN_KEYS`` keys and the blockwise online-softmax form
(:mod:`kernels.xla_flash_attention`, same contract) from there on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention", "attention_mask"]


def attention_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, kv_valid=None):
    """Boolean ``[B, T, S]`` visibility mask."""
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def attention(q, k, v, *, q_positions=None, kv_positions=None, q_segment_ids=None,
              kv_segment_ids=None, kv_valid=None, scale=None):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads not a multiple of {hkv} kv heads")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: pass both q_segment_ids and kv_segment_ids or neither")
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, kv_valid)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)
