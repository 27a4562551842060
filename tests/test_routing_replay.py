"""MoE routing replay (R3) in the model: the forward returns the experts it used per token and
MoE layer, and replays given ones with gate weights recomputed from the current router.

References: a numpy router for the replayed gate weights; the model's own unreplayed path for
"replaying your own choice changes nothing" (bitwise); central finite differences for the
router gradient through the recomputed gates (fp32, rel. error < 2e-2 on a directional
derivative whose step is 0.1 of the gate scale)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import nemotron_h as nh
from models.nemotron_h import model as nhm

B, T = 2, 24


@pytest.fixture(scope="module")
def tiny():
    cfg = nh.preset("tiny")
    params = jax.jit(nh.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, jnp.int32)
    return cfg, params, tokens


def _fwd(cfg):
    return jax.jit(lambda p, t, r: nh.forward(p, t, cfg, routed_experts=r, return_routed_experts=True))


def _moved_router(cfg, params, scale=3.0, seed=7):
    """Params whose router weights moved by ``scale`` times their own spread."""
    key = jax.random.key(seed)
    layers = list(params["layers"])
    for i, kind in enumerate(cfg.pattern):
        if kind == "E":
            key, sub = jax.random.split(key)
            g = layers[i]["mixer"]["gate"]
            mixer = dict(layers[i]["mixer"], gate=g + scale * jnp.std(g) * jax.random.normal(sub, g.shape))
            layers[i] = dict(layers[i], mixer=mixer)
    return dict(params, layers=layers)


def test_returned_experts_and_default_path_unchanged(tiny):
    cfg, params, tokens = tiny
    logits = jax.jit(nh.forward, static_argnums=2)(params, tokens, cfg)
    logits2, experts = jax.jit(lambda p, t: nh.forward(p, t, cfg, return_routed_experts=True))(params, tokens)
    np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))
    L, K = nh.num_moe_layers(cfg), cfg.num_experts_per_tok
    assert experts.shape == (B, T, L, K) and experts.dtype == jnp.int32 and L == cfg.pattern.count("E")
    e = np.asarray(experts)
    assert e.min() >= 0 and e.max() < cfg.n_routed_experts
    assert all(len(set(row)) == K for row in e.reshape(-1, K))  # K distinct experts per token
    # each MoE layer's ids are route()'s top-k of that layer's input: check layer 0 directly
    first = cfg.pattern.index("E")
    h = params["embed"][tokens]
    for i in range(first):
        h = nhm._layer(cfg.pattern[i], params["layers"][i], h, cfg, None, None)[0]
    u = nhm.rms_norm(h, params["layers"][first]["norm"], cfg.layer_norm_epsilon)
    _, idx = nhm.route(params["layers"][first]["mixer"], u.reshape(-1, cfg.hidden_size), cfg)
    np.testing.assert_array_equal(e[:, :, 0].reshape(-1, K), np.asarray(idx))


def test_replay_uses_given_experts_after_router_moved(tiny):
    cfg, params, tokens = tiny
    fwd = _fwd(cfg)
    _, rollout_experts = fwd(params, tokens, None)  # the "rollout" routing under the old router
    moved = _moved_router(cfg, params)
    own_logits, own = fwd(moved, tokens, None)
    rep_logits, used = fwd(moved, tokens, rollout_experts)
    # with replay: exactly the rollout's experts, per token and layer
    np.testing.assert_array_equal(np.asarray(used), np.asarray(rollout_experts))
    # without replay: the moved router picks different experts for many tokens
    differ = np.any(np.sort(np.asarray(own), -1) != np.sort(np.asarray(rollout_experts), -1), -1)
    assert differ.mean() > 0.2, differ.mean()
    assert not np.allclose(np.asarray(rep_logits), np.asarray(own_logits), atol=1e-3)
    # replaying the router's own choice is the unreplayed forward, bit for bit
    same_logits, _ = fwd(moved, tokens, own)
    np.testing.assert_array_equal(np.asarray(same_logits), np.asarray(own_logits))
    # -1 = route freely: an all -1 replay is the unreplayed forward too
    free_logits, free = fwd(moved, tokens, jnp.full_like(own, -1))
    np.testing.assert_array_equal(np.asarray(free), np.asarray(own))
    np.testing.assert_array_equal(np.asarray(free_logits), np.asarray(own_logits))


def test_replayed_gate_weights_match_numpy_router(tiny):
    cfg, params, _ = tiny
    p = params["layers"][cfg.pattern.index("E")]["mixer"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, cfg.hidden_size)).astype(np.float32)
    ids = np.stack([rng.choice(cfg.n_routed_experts, cfg.num_experts_per_tok, replace=False)
                    for _ in range(16)]).astype(np.int32)
    ids[3] = -1  # this token routes freely
    w, idx = jax.jit(lambda p, x, i: nhm.route(p, x, cfg, i))(p, x, ids)
    w_free, idx_free = nhm.route(p, x, cfg)
    s = 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ np.asarray(p["gate"], np.float64))))
    want_ids = ids.copy()
    want_ids[3] = np.asarray(idx_free)[3]
    sw = np.take_along_axis(s, want_ids, 1)
    want_w = sw / sw.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    np.testing.assert_array_equal(np.asarray(idx), want_ids)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=2e-6, atol=1e-7)


def test_router_gradient_through_replayed_gates_matches_finite_differences(tiny):
    cfg, params, tokens = tiny
    _, rollout_experts = _fwd(cfg)(params, tokens, None)
    moved = _moved_router(cfg, params)
    moe = [i for i, k in enumerate(cfg.pattern) if k == "E"]
    probe = jax.random.normal(jax.random.key(3), (B, T, cfg.vocab_size), jnp.float32)

    def loss(gates):
        layers = list(moved["layers"])
        for i, g in zip(moe, gates):
            layers[i] = dict(layers[i], mixer=dict(layers[i]["mixer"], gate=g))
        p = dict(moved, layers=layers)
        logits = nh.forward(p, tokens, cfg, routed_experts=rollout_experts)
        return jnp.sum(jax.nn.log_softmax(logits, -1) * probe) / (B * T)

    gates = [moved["layers"][i]["mixer"]["gate"] for i in moe]
    grads = jax.jit(jax.grad(loss))(gates)
    f = jax.jit(loss)
    for j, (g, dg) in enumerate(zip(gates, grads)):
        assert float(jnp.abs(dg).max()) > 0, f"no router gradient in MoE layer {j}"
        d = jax.random.normal(jax.random.key(10 + j), g.shape, jnp.float32)
        eps = 0.1 * float(jnp.std(g))
        others = list(gates)
        others[j] = g + eps * d
        plus = f(others)
        others[j] = g - eps * d
        minus = f(others)
        fd = float(plus - minus) / (2 * eps)
        an = float(jnp.sum(dg * d))
        assert abs(fd - an) <= 2e-2 * abs(an) + 1e-6, (j, fd, an)


def test_prefill_and_decode_return_the_forward_experts(tiny):
    cfg, params, tokens = tiny
    _, want = _fwd(cfg)(params, tokens, None)
    P = T - 3
    prefill = jax.jit(lambda p, t: nh.prefill(p, t, cfg, max_len=T, last_only=True,
                                              return_routed_experts=True))
    step = jax.jit(lambda p, c, t, pos: nh.decode_step(p, c, t, pos, cfg, return_routed_experts=True))
    _, cache, pre = prefill(params, tokens[:, :P])
    assert pre.shape == (B, P, nh.num_moe_layers(cfg), cfg.num_experts_per_tok)
    np.testing.assert_array_equal(np.asarray(pre), np.asarray(want[:, :P]))
    for t in range(P, T):
        _, cache, got = step(params, cache, tokens[:, t], jnp.full((B,), t, jnp.int32))
        assert got.shape == (B, nh.num_moe_layers(cfg), cfg.num_experts_per_tok)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want[:, t]))


def test_bad_routed_experts_shape_names_the_field(tiny):
    cfg, params, tokens = tiny
    bad = jnp.zeros((B, T, nh.num_moe_layers(cfg) + 1, cfg.num_experts_per_tok), jnp.int32)
    with pytest.raises(ValueError, match="routed_experts"):
        nh.forward(params, tokens, cfg, routed_experts=bad)
