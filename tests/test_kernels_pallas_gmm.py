"""Pallas grouped matmul (interpret mode on CPU) against the XLA reference.

Shapes have ragged edges: empty groups (first, middle, last), groups smaller than the row tile,
M not a multiple of the tile, rows past ``sum(group_sizes)``, K and N not multiples of the
blocks. Both launch layouts (``gpu``: group loop per tile; ``tpu``: megablox visit schedule) run.
Tolerances: fp32 — 1e-5 relative to the largest magnitude (forward and gradients); bf16 — 2e-2.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kernels import moe_dispatch, pallas_gmm, xla_gmm
from tests.numerics import rel_err

BLOCKS = dict(block_m=16, block_k=8, block_n=16)
CASES = {
    "ragged": [0, 3, 20, 0, 12, 7],  # sum 42 < M = 45
    "all_in_one": [0, 0, 45, 0, 0, 0],
    "tiny_groups": [1, 2, 1, 0, 1, 40],
    "all_empty": [0, 0, 0, 0, 0, 0],
}


def _data(dtype=jnp.float32, m=45, k=24, n=40, e=6, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(e, k, n)) / np.sqrt(k), dtype)
    return lhs, rhs




@pytest.mark.parametrize("variant,case", [("gpu", c) for c in CASES] + [("tpu", "ragged"), ("tpu", "all_empty")])
def test_gmm_forward_and_grads(variant, case):
    lhs, rhs = _data()
    gs = jnp.asarray(CASES[case], jnp.int32)

    def loss(fn):
        return lambda a, b: jnp.sum(jnp.sin(fn(a, b)) * jnp.arange(a.shape[0])[:, None] / a.shape[0])

    ours = lambda a, b: pallas_gmm.gmm(a, b, gs, variant=variant, **BLOCKS)
    ref = lambda a, b: xla_gmm.gmm(a, b, gs, tile=8)
    out, grads = jax.jit(lambda a, b: (ours(a, b), jax.grad(loss(ours), (0, 1))(a, b)))(lhs, rhs)
    out_r, grads_r = jax.jit(lambda a, b: (ref(a, b), jax.grad(loss(ref), (0, 1))(a, b)))(lhs, rhs)
    assert rel_err(out, out_r) < 1e-5
    used = int(np.sum(CASES[case]))
    assert np.all(np.asarray(out)[used:] == 0)
    for g, g_r in zip(grads, grads_r):
        assert rel_err(g, g_r) < 1e-5


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_gmm_relu2_epilogue(variant):
    lhs, rhs = _data(seed=1)
    gs = jnp.asarray(CASES["ragged"], jnp.int32)
    ours = lambda a, b: pallas_gmm.gmm(a, b, gs, variant=variant, epilogue="relu2", **BLOCKS)
    ref = lambda a, b: jnp.maximum(xla_gmm.gmm(a, b, gs, tile=8), 0.0) ** 2
    loss = lambda fn: (lambda a, b: jnp.sum(jnp.sin(fn(a, b))))
    out, grads = jax.jit(lambda a, b: (ours(a, b), jax.grad(loss(ours), (0, 1))(a, b)))(lhs, rhs)
    out_r, grads_r = jax.jit(lambda a, b: (ref(a, b), jax.grad(loss(ref), (0, 1))(a, b)))(lhs, rhs)
    assert rel_err(out, out_r) < 1e-5
    for g, g_r in zip(grads, grads_r):
        assert rel_err(g, g_r) < 1e-5


def test_gmm_bf16_and_tgmm():
    lhs, rhs = _data(jnp.bfloat16, seed=2)
    gs = jnp.asarray(CASES["tiny_groups"], jnp.int32)
    out = jax.jit(lambda a, b: pallas_gmm.gmm(a, b, gs, **BLOCKS))(lhs, rhs)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, xla_gmm.gmm(lhs, rhs, gs, tile=8)) < 2e-2
    dout = _data(jnp.bfloat16, n=40, k=40, seed=3)[0]
    for variant in ("gpu", "tpu"):
        w = jax.jit(lambda a, d: pallas_gmm.tgmm(a, d, gs, variant=variant, **BLOCKS))(lhs, dout)
        assert w.shape == (6, 24, 40)
        assert rel_err(w, xla_gmm.tgmm(lhs, dout, gs, tile=8)) < 2e-2


def test_visit_schedule_covers_every_row_once():
    for sizes in ([0, 3, 20, 0, 12, 7], [0] * 6, [45, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 45]):
        gs = jnp.asarray(sizes, jnp.int32)
        tids, gids, valid = (np.asarray(a) for a in pallas_gmm.visit_schedule(gs, 3, 16))
        assert np.all(np.diff(tids) >= 0) and np.all(np.diff(gids) >= 0)
        assert set(tids) == {0, 1, 2}  # every output tile visited (zeros written)
        assert set(gids[~valid].tolist()) | set(gids[valid].tolist()) == set(range(6)) or sum(sizes) == 0
        covered = np.zeros(48, int)
        starts = np.cumsum(sizes) - np.asarray(sizes)
        for t, g, ok in zip(tids, gids, valid):
            if ok:
                rows = np.arange(t * 16, t * 16 + 16)
                covered[rows[(rows >= starts[g]) & (rows < starts[g] + sizes[g])]] += 1
        assert np.all(covered[:sum(sizes)] == 1) and np.all(covered[sum(sizes):] == 0)


def test_moe_dispatch_roundtrip_and_padding():
    rng = np.random.default_rng(4)
    n, k, e, h = 11, 3, 5, 6
    ids = jnp.asarray(np.stack([rng.choice(e - 1, k, replace=False) for _ in range(n)]), jnp.int32)  # expert 4 empty
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    order, gs = moe_dispatch.sort_by_expert(ids, e)
    assert int(gs.sum()) == n * k and int(gs[4]) == 0
    xs = moe_dispatch.permute(x, order, k)
    assert np.all(np.diff(np.asarray(ids.reshape(-1)[order])) >= 0)
    np.testing.assert_allclose(moe_dispatch.unpermute(xs, order, w), x * w.sum(1, keepdims=True), rtol=1e-6)
    dest, pgs, rows = moe_dispatch.padded_layout(gs, n * k, 8)
    assert np.all(np.asarray(pgs) % 8 == 0) and rows % 8 == 0 and int(pgs.sum()) <= rows
    padded = jnp.zeros((rows, h)).at[dest].set(xs, mode="drop")
    rhs = jnp.asarray(rng.normal(size=(e, h, 4)), jnp.float32)
    a = pallas_gmm.gmm(padded, rhs, pgs, block_m=8, block_k=8, block_n=8)[dest]
    np.testing.assert_allclose(a, xla_gmm.gmm(xs, rhs, gs, tile=8), rtol=1e-5, atol=1e-5)
    assert moe_dispatch.pad_columns(jnp.zeros((2, 3, 1856)), 128).shape == (2, 3, 1920)
