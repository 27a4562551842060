"""Scan over repeated layer groups (``ModelConfig.scan_layers``) against the layer loop: the
forward (hidden states and routed experts), with and without remat, and the gradients of every
parameter, on a tiny fp32 model whose pattern repeats. Tolerances relative to each quantity's
largest magnitude: forward 1e-6 (the same ops in the same order; XLA may fuse the scanned body
differently), gradients 1e-5 (the scan's backward sums the stacked weights' cotangents in
another order; measured ~2e-6). Also the group split itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import nemotron_h as nh
from models.nemotron_h.layer_scan import layer_groups

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

TOL = 1e-6
GRAD_TOL = 1e-5
CFG = nh.preset("tiny", pattern="ME*ME*-", vocab_size=64, n_group=1, topk_group=1)  # (ME*)x2, -


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_layer_groups_cover_the_pattern_with_fewer_bodies():
    nano = nh.preset("nano-30b-a3b").pattern
    groups = layer_groups(nano)
    assert "".join(u * r for _, u, r in groups) == nano
    assert [s for s, _, _ in groups] == list(np.cumsum([0] + [len(u) * r for _, u, r in groups])[:-1])
    assert sum(len(u) for _, u, _ in groups) == 14  # 52 layers -> 14 compiled layer bodies
    assert layer_groups("MEMEME") == ((0, "ME", 3),)
    assert layer_groups("M*-") == ((0, "M", 1), (1, "*", 1), (2, "-", 1))


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_scan_forward_and_grads_equal_the_loop(remat):
    assert any(r > 1 for _, _, r in layer_groups(CFG.pattern))
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 2, 0), jnp.int32)
    loop = dataclasses.replace(CFG, remat=remat)
    scan = dataclasses.replace(loop, scan_layers=True)

    def run(cfg):
        def loss(p):
            h, ids = nh.hidden_states(p, tokens, cfg, segment_ids=seg, return_routed_experts=True)
            return jnp.sum(jnp.sin(h)), (h, ids)
        (_, (h, ids)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return h, ids, g

    h0, ids0, g0 = run(loop)
    h1, ids1, g1 = run(scan)
    assert rel(h1, h0) < TOL
    np.testing.assert_array_equal(ids1, ids0)
    assert ids0.shape == (2, 24, CFG.pattern.count("E"), CFG.num_experts_per_tok)
    worst = max(rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
    assert worst < GRAD_TOL, worst


def test_scan_replays_given_experts():
    params = nh.init_params(CFG, jax.random.key(1), dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (1, 12)), jnp.int32)
    _, ids = nh.hidden_states(params, tokens, CFG, return_routed_experts=True)
    given = (ids + 1) % CFG.n_routed_experts  # other experts than the router would pick
    scan = dataclasses.replace(CFG, scan_layers=True)
    h0, u0 = nh.hidden_states(params, tokens, CFG, routed_experts=given, return_routed_experts=True)
    h1, u1 = nh.hidden_states(params, tokens, scan, routed_experts=given, return_routed_experts=True)
    np.testing.assert_array_equal(u1, given)
    np.testing.assert_array_equal(u0, given)
    assert rel(h1, h0) < TOL
