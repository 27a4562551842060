"""The blockwise (online-softmax) XLA attention against the full-score XLA reference.

:func:`kernels.xla_flash_attention.attention` must equal :func:`kernels.xla_attention.attention`
(itself checked against a float64 NumPy definition in ``test_kernels_reference.py``) on the
same inputs: GQA, packed segments, padded keys (``kv_valid``), a query with no visible key, and
``T``, ``S`` not multiples of the block sizes (which are small here so that many blocks run).

Tolerances: fp32 outputs and gradients (q, k, v) within 1e-5 relative to the largest entry
(the forms differ only in summation order and where the normalisation happens); bf16 inputs
within 2e-2 of that scale (the reference rounds the normalised probabilities to bf16, the
blockwise form the unnormalised ones).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels import xla_attention, xla_flash_attention


def _inputs(rng, b, t, s, hq, hkv, d, dtype):
    q = rng.normal(size=(b, t, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    # packed rows: keys are the last s - t context tokens followed by the t query tokens
    kv_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    q_pos = kv_pos[:, s - t:].copy()
    kv_seg = np.zeros((b, s), np.int32)
    kv_seg[:, s // 3:] = 1
    kv_seg[:, (2 * s) // 3:] = 2
    kv_seg[1:, :] = 0  # other rows: one document
    q_seg = kv_seg[:, s - t:].copy()
    kv_valid = np.ones((b, s), bool)
    kv_valid[0, -3:] = False  # right padding
    kv_valid[0, s - t] = False  # the first query of row 0 has no visible key (itself invalid; segment ...)
    q_seg[0, 0] = 7  # ... and a segment of its own
    kw = dict(q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos),
              q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg), kv_valid=jnp.asarray(kv_valid))
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), kw


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("b,t,s,hq,hkv,d,bq,bk", [
    (2, 37, 37, 4, 2, 8, 8, 16),    # self-attention, T = S not multiples of the blocks
    (2, 21, 50, 6, 3, 16, 16, 7),   # queries after a context, GQA 2
    (1, 13, 29, 4, 1, 8, 64, 64),   # blocks larger than T, S (one block each), MQA
])
def test_flash_matches_reference_fp32(b, t, s, hq, hkv, d, bq, bk):
    rng = np.random.default_rng(t * s)
    q, k, v, kw = _inputs(rng, b, t, s, hq, hkv, d, jnp.float32)
    ref = lambda q, k, v: xla_attention.attention(q, k, v, **kw)
    fla = lambda q, k, v: xla_flash_attention.attention(q, k, v, block_q=bq, block_k=bk, **kw)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    out, vjp = jax.vjp(jax.jit(fla), q, k, v)
    assert _rel(out, out_ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)  # no visible key -> zeros
    assert np.all(np.asarray(out_ref[0, 0]) == 0.0)
    dout = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    for name, g, g_ref in zip("qkv", vjp(dout), vjp_ref(dout)):
        assert _rel(g, g_ref) < 1e-5, name
    # the unsegmented, unpadded defaults too
    o1 = xla_flash_attention.attention(q, k[:, :t], v[:, :t], block_q=bq, block_k=bk)
    assert _rel(o1, xla_attention.attention(q, k[:, :t], v[:, :t])) < 1e-5


def test_flash_matches_reference_bf16():
    rng = np.random.default_rng(3)
    q, k, v, kw = _inputs(rng, 2, 40, 56, 4, 2, 16, jnp.bfloat16)
    ref = lambda q, k, v: xla_attention.attention(q, k, v, **kw)
    fla = lambda q, k, v: xla_flash_attention.attention(q, k, v, block_q=16, block_k=8, **kw)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    out, vjp = jax.vjp(fla, q, k, v)
    assert out.dtype == jnp.bfloat16 and _rel(out, out_ref) < 2e-2
    dout = jnp.asarray(rng.normal(size=out.shape), jnp.bfloat16)
    for name, g, g_ref in zip("qkv", vjp(dout), vjp_ref(dout)):
        assert g.dtype == jnp.bfloat16 and _rel(g, g_ref) < 2e-2, name


def test_blockwise_memory_is_not_quadratic():
    """The compiled blockwise forward+backward at S = 4096 keeps no [T, S] buffer: its temporary
    memory is far below one fp32 score matrix (the full-score reference needs several)."""
    b, t, h, d = 1, 4096, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    scores = b * h * t * t * 4

    def temp(f):
        loss = lambda q, k, v: jnp.sum(f(q, k, v))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    flash = temp(lambda q, k, v: xla_flash_attention.attention(q, k, v, block_q=256, block_k=256))
    full = temp(xla_attention.attention)
    assert full > scores and flash < scores / 8, (flash, full, scores)


def test_dispatch_uses_blockwise_from_the_threshold():
    """``kernels.attention(impl="xla")`` runs the full-score form below
    ``kernels.XLA_BLOCKWISE_MIN_KEYS`` keys and the blockwise form from it on."""
    n = kernels.XLA_BLOCKWISE_MIN_KEYS
    assert kernels.xla_attention_form(n - 1) == "full" and kernels.xla_attention_form(n) == "blockwise"
    x = jax.ShapeDtypeStruct((1, n, 1, 8), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q: kernels.attention(q, q, q, impl="xla"))(x))
    assert "scan" in jaxpr and "custom_vjp" in jaxpr
    y = jax.ShapeDtypeStruct((1, 64, 1, 8), jnp.float32)
    assert "scan" not in str(jax.make_jaxpr(lambda q: kernels.attention(q, q, q, impl="xla"))(y))
