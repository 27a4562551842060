"""Pallas flash attention (interpret mode on CPU) against the XLA reference.

Ragged edges: T and S not multiples of the blocks, several packed segments per row with positions
restarting per segment, invalid (padding) keys, a query with no visible key (zeros), GQA with
2 query heads per KV head, decode-shaped calls (T = 1 against a longer cache).
Tolerances: fp32 — 2e-5 relative to the largest magnitude (forward and dq/dk/dv); bf16 — 2e-2.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels import pallas_attention, xla_attention
from tests.numerics import rel_err

B, T, HQ, HKV, D = 2, 37, 4, 2, 16


def _packed_meta():
    seg = np.zeros((B, T), np.int32)
    seg[0, 10:] = 1
    seg[0, 25:] = 2
    seg[1, 30:] = 1
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    valid = np.ones((B, T), bool)
    valid[1, 33:] = False
    valid[0, 10] = False  # first token of segment 1 invisible -> query 10 sees nothing
    return dict(q_positions=jnp.asarray(pos), kv_positions=jnp.asarray(pos), q_segment_ids=jnp.asarray(seg),
                kv_segment_ids=jnp.asarray(seg), kv_valid=jnp.asarray(valid))


def _qkv(dtype=jnp.float32, t=T, s=T, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, t, HQ, D)), dtype), jnp.asarray(rng.normal(size=(B, s, HKV, D)), dtype),
            jnp.asarray(rng.normal(size=(B, s, HKV, D)), dtype))




def _fwd_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("packed", [True, False])
def test_attention_matches_reference(packed):
    kw = _packed_meta() if packed else {}
    q, k, v = _qkv()
    out, grads = _fwd_and_grads(lambda q, k, v: pallas_attention.attention(q, k, v, block_q=8, block_k=16, **kw), q, k, v)
    out_r, grads_r = _fwd_and_grads(lambda q, k, v: xla_attention.attention(q, k, v, **kw), q, k, v)
    assert rel_err(out, out_r) < 2e-5
    if packed:
        assert np.all(np.asarray(out)[0, 10] == 0)
    for g, g_r in zip(grads, grads_r):
        assert rel_err(g, g_r) < 2e-5


def test_attention_decode_and_bf16():
    q, k, v = _qkv(jnp.bfloat16, t=1, s=T, seed=1)
    kw = dict(q_positions=jnp.array([[20], [5]], jnp.int32),
              kv_positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    out = jax.jit(lambda q, k, v: pallas_attention.attention(q, k, v, block_k=16, **kw))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert rel_err(out, xla_attention.attention(q, k, v, **kw)) < 2e-2


def test_block_ranges_skip_dead_blocks():
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (1, 64))
    zeros = jnp.zeros((1, 64), jnp.int32)
    ones = jnp.ones((1, 64), bool)
    kv_lo, kv_hi, q_lo, q_hi = pallas_attention.block_ranges(pos, pos, zeros, zeros, ones, ones, 16, 16)
    np.testing.assert_array_equal(kv_hi[0], [1, 2, 3, 4])  # causal: only blocks <= i
    np.testing.assert_array_equal(q_lo[0], [0, 1, 2, 3])
    seg = jnp.asarray([[0] * 32 + [1] * 32], jnp.int32)
    pos2 = jnp.asarray([list(range(32)) * 2], jnp.int32)
    kv_lo, kv_hi, _, _ = pallas_attention.block_ranges(pos2, pos2, seg, seg, ones, ones, 16, 16)
    np.testing.assert_array_equal(kv_lo[0], [0, 0, 2, 2])  # packed: second segment skips the first


def test_zigzag_permutation():
    perm = np.asarray(pallas_attention.zigzag_permutation(16, 2))
    np.testing.assert_array_equal(perm, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
