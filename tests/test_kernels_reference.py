"""The XLA reference kernels against independent NumPy definitions.

* gmm: a per-expert loop ``out[rows_e] = lhs[rows_e] @ rhs[e]``; tgmm and both gradients by the same
  loop (``dlhs[rows_e] = dout[rows_e] @ rhs[e]ᵀ``, ``drhs[e] = lhs[rows_e]ᵀ @ dout[rows_e]``).
* attention: dense masked softmax in float64 with the visibility rule
  ``kv_pos <= q_pos & same segment & kv_valid`` and query head ``j`` reading KV head ``j // R``.
* ssd: the sequential recurrence ``S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t ⊗ B_t``, ``y_t = S_t·C_t``,
  with ``S_{t-1}`` dropped at segment starts.

Tolerances (fp32 inputs): 1e-4 absolute on O(1)-scaled outputs (relative for gradients).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels import xla_attention, xla_gmm, xla_ssd


def _gmm_np(lhs, rhs, gs):
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
    off = 0
    for e, g in enumerate(gs):
        out[off:off + g] = lhs[off:off + g].astype(np.float64) @ rhs[e]
        off += g
    return out


def _tgmm_np(lhs, dout, gs):
    out = np.zeros((len(gs), lhs.shape[1], dout.shape[1]), np.float64)
    off = 0
    for e, g in enumerate(gs):
        out[e] = lhs[off:off + g].T.astype(np.float64) @ dout[off:off + g]
        off += g
    return out


@pytest.mark.parametrize("gs", [[0, 3, 20, 0, 12, 7], [42, 0, 0, 0, 0, 0], [0] * 6])
def test_xla_gmm_matches_per_expert_loop(gs):
    rng = np.random.default_rng(0)
    m, k, n = 45, 12, 10
    gs = np.array(gs, np.int32)
    lhs = rng.normal(size=(m, k)).astype(np.float32)
    rhs = rng.normal(size=(len(gs), k, n)).astype(np.float32)
    dout = rng.normal(size=(m, n)).astype(np.float32)
    out = xla_gmm.gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(gs), tile=8)
    np.testing.assert_allclose(out, _gmm_np(lhs, rhs, gs), atol=1e-4, rtol=1e-5)
    _, vjp = jax.vjp(lambda a, b: xla_gmm.gmm(a, b, jnp.asarray(gs), tile=8), jnp.asarray(lhs), jnp.asarray(rhs))
    dl, dr = vjp(jnp.asarray(dout))
    used = int(gs.sum())
    dout_used = dout.copy()
    dout_used[used:] = 0
    np.testing.assert_allclose(dl, _gmm_np(dout_used, np.swapaxes(rhs, 1, 2), gs), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(dr, _tgmm_np(lhs, dout, gs), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(xla_gmm.tgmm(jnp.asarray(lhs), jnp.asarray(dout), jnp.asarray(gs), tile=8),
                               _tgmm_np(lhs, dout, gs), atol=1e-4, rtol=1e-5)


def _attention_np(q, k, v, qpos, kpos, qseg, kseg, kval):
    b, t, hq, d = q.shape
    r = hq // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for bi in range(b):
        vis = (kpos[bi][None, :] <= qpos[bi][:, None]) & (qseg[bi][:, None] == kseg[bi][None, :]) & kval[bi][None, :]
        for h in range(hq):
            s = q[bi, :, h].astype(np.float64) @ k[bi, :, h // r].T.astype(np.float64) / np.sqrt(d)
            s = np.where(vis, s, -np.inf)
            for ti in range(t):
                if vis[ti].any():
                    p = np.exp(s[ti] - s[ti].max())
                    out[bi, ti, h] = (p / p.sum()) @ v[bi, :, h // r]
    return out


def test_xla_attention_matches_dense_masked_softmax():
    rng = np.random.default_rng(1)
    b, t, hq, hkv, d = 2, 19, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    seg = np.zeros((b, t), np.int32)
    seg[0, 7:] = 1
    seg[0, 12:] = 2
    pos = np.concatenate([np.arange(7), np.arange(5), np.arange(7)])[None].repeat(b, 0).astype(np.int32)
    pos[1] = np.arange(t)
    seg[1] = 0
    kval = np.ones((b, t), bool)
    kval[1, 15:] = False
    kval[0, 0] = False  # query 0 of row 0 sees nothing -> zeros
    got = xla_attention.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(pos),
                                  kv_positions=jnp.asarray(pos), q_segment_ids=jnp.asarray(seg),
                                  kv_segment_ids=jnp.asarray(seg), kv_valid=jnp.asarray(kval))
    np.testing.assert_allclose(got, _attention_np(q, k, v, pos, pos, seg, seg, kval), atol=1e-5)


def _ssd_np(x, dt, A, Bm, Cm, seg, s0):
    b, t, h, p = x.shape
    g = Bm.shape[2]
    r = h // g
    y = np.zeros(x.shape, np.float64)
    s = s0.astype(np.float64).copy()
    for bi in range(b):
        for ti in range(t):
            if ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
                s[bi] = 0.0
            for hi in range(h):
                decay = np.exp(dt[bi, ti, hi] * A[hi])
                s[bi, hi] = decay * s[bi, hi] + np.outer(dt[bi, ti, hi] * x[bi, ti, hi], Bm[bi, ti, hi // r])
                y[bi, ti, hi] = s[bi, hi] @ Cm[bi, ti, hi // r]
    return y, s


def test_xla_ssd_matches_sequential_recurrence():
    rng = np.random.default_rng(2)
    b, t, h, p, g, n = 2, 21, 4, 3, 2, 5
    x = rng.normal(size=(b, t, h, p)).astype(np.float32)
    dt = rng.uniform(0.05, 0.8, size=(b, t, h)).astype(np.float32)
    dt[1, 18:] = 0.0  # padding: state unchanged
    A = -rng.uniform(0.3, 2.0, size=(h,)).astype(np.float32)
    Bm = rng.normal(size=(b, t, g, n)).astype(np.float32)
    Cm = rng.normal(size=(b, t, g, n)).astype(np.float32)
    seg = np.zeros((b, t), np.int32)
    seg[0, 5:] = 1
    seg[0, 6:] = 2
    seg[1, 13:] = 7
    s0 = rng.normal(size=(b, h, p, n)).astype(np.float32)
    y, fin = xla_ssd.ssd(*(jnp.asarray(a) for a in (x, dt, A, Bm, Cm)), chunk_size=8,
                         segment_ids=jnp.asarray(seg), initial_state=jnp.asarray(s0))
    y_ref, fin_ref = _ssd_np(x, dt, A, Bm, Cm, seg, s0)
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fin, fin_ref, atol=1e-4, rtol=1e-4)
