"""NemotronH in JAX: model config parsing, shapes/counts, decode == forward, packing isolation.

Parity against transformers lives in test_parity.py; these tests check the model against itself
under transformations that must not change the result. Tolerance: 1e-4 max-abs on fp32 logits.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import nemotron_h as nh

TOL = 1e-4  # fp32 logits, max-abs

fwd = jax.jit(nh.forward, static_argnums=2)
prefill = jax.jit(nh.prefill, static_argnums=2, static_argnames=("max_len", "last_only"))
step = jax.jit(nh.decode_step, static_argnums=4)


@pytest.fixture(scope="module")
def tiny():
    cfg = nh.preset("tiny")
    params = jax.jit(nh.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), jnp.float32)
    return cfg, params


def test_30b_shapes_without_allocating():
    cfg = nh.preset("nano-30b-a3b")
    total, active = nh.param_counts(cfg)
    assert total == 31_577_940_288
    assert active == 3_227_754_816 and round(active / 1e9, 2) == 3.23
    shapes = nh.abstract_params(cfg)
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(math.prod(x.shape) for x in leaves) == total
    assert shapes["layers"][1]["mixer"]["experts_up"].shape == (128, 2688, 1856)
    assert shapes["layers"][0]["mixer"]["A_log"].dtype == jnp.float32
    assert shapes["layers"][0]["mixer"]["in_x"].dtype == jnp.bfloat16
    assert cfg.pattern.count("M") == 23 and cfg.pattern.count("E") == 23 and cfg.pattern.count("*") == 6


def test_hf_config_round_trip_and_forms():
    cfg = nh.preset("nano-30b-a3b")
    d = cfg.to_hf_dict()
    assert d["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    assert "dt_floor" not in d and d["hybrid_override_pattern"] == cfg.pattern
    assert nh.ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg
    # transformers-5 form: list only, legacy spellings and aliases
    d2 = {k: v for k, v in d.items() if k != "hybrid_override_pattern"}
    d2["layers_block_type"] = ["mamba" if x == "linear_attention" else "attention" if x == "full_attention" else x
                               for x in d2["layers_block_type"]]
    d2["mamba_chunk_size"] = d2.pop("chunk_size")
    d2["num_local_experts"] = d2.pop("n_routed_experts")
    assert nh.ModelConfig.from_hf_dict(d2) == cfg
    # head_dim defaults to hidden // heads; mtp keys accepted when 0
    d3 = dict(d, head_dim=None, num_nextn_predict_layers=0, mtp_layers_block_type=["attention", "moe"])
    assert nh.ModelConfig.from_hf_dict(d3).head_dim == 2688 // 32


@pytest.mark.parametrize("patch,match", [
    ({"hybrid_override_pattern": "MEX"}, "pattern"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["mamba", "conv"]}, "layers_block_type: unknown"),
    ({"num_hidden_layers": 7}, "num_hidden_layers"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
    ({"time_step_limit": [0.0, {"__float__": "lots"}]}, "bad float"),
    ({"model_type": "llama"}, "model_type"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"n_group": 3}, "n_routed_experts"),
])
def test_bad_hf_config(patch, match):
    d = nh.preset("tiny").to_hf_dict()
    d.pop("layers_block_type")
    d.update(patch)
    with pytest.raises(nh.ModelConfigError, match=match):
        nh.ModelConfig.from_hf_dict(d)


def test_preset_errors():
    with pytest.raises(nh.ModelConfigError, match="valid presets"):
        nh.preset("huge")
    with pytest.raises(nh.ModelConfigError, match="unknown ModelConfig field"):
        nh.preset("tiny", hiden_size=3)


def test_forward_shapes_dtypes(tiny):
    cfg, _ = tiny
    p16 = jax.jit(nh.init_params, static_argnums=0)(cfg, jax.random.key(1))  # bf16
    toks = jnp.zeros((2, 7), jnp.int32)
    assert fwd(p16, toks, cfg).dtype == jnp.float32
    h = jax.jit(nh.hidden_states, static_argnums=2)(p16, toks, cfg)
    assert h.shape == (2, 7, cfg.hidden_size) and h.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(fwd(p16, toks, cfg))))
    assert p16["layers"][0]["mixer"]["A_log"].dtype == jnp.float32


@pytest.mark.parametrize("prefill_len", [1, 2, 16, 21])  # < conv kernel, = chunk, not a multiple
def test_prefill_decode_matches_forward(tiny, prefill_len):
    cfg, params = tiny
    T = 26
    toks = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
    ref = fwd(params, toks, cfg)
    logits, cache = prefill(params, toks[:, :prefill_len], cfg, max_len=T)
    np.testing.assert_allclose(logits, ref[:, :prefill_len], atol=TOL, rtol=0)
    for t in range(prefill_len, T):
        out, cache = step(params, cache, toks[:, t], jnp.full((2,), t), cfg)
        np.testing.assert_allclose(out, ref[:, t], atol=TOL, rtol=0, err_msg=f"step {t}")


@pytest.mark.integration
def test_ragged_prefill_then_decode(tiny):
    """Right-padded prompts of different lengths, decoded with per-row positions."""
    cfg, params = tiny
    rows = [jax.random.randint(jax.random.key(3 + i), (n,), 0, cfg.vocab_size) for i, n in enumerate((3, 19))]
    L = 24
    padded = jnp.stack([jnp.pad(r, (0, 19 - len(r))) for r in rows])
    lengths = jnp.array([len(r) for r in rows])
    last, cache = prefill(params, padded, cfg, lengths=lengths, max_len=L, last_only=True)
    for i, r in enumerate(rows):  # next-token logits at each row's own last prompt token
        np.testing.assert_allclose(last[i], fwd(params, r[None], cfg)[0, -1], atol=TOL, rtol=0)
    nxt = jnp.array([7, 11])
    out, cache = step(params, cache, nxt, lengths, cfg)
    for i, r in enumerate(rows):
        full = fwd(params, jnp.concatenate([r, nxt[i:i + 1]])[None], cfg)
        np.testing.assert_allclose(out[i], full[0, -1], atol=TOL, rtol=0)


def test_packed_equals_separate(tiny):
    cfg, params = tiny
    lens = (20, 3, 17)  # segments crossing chunk (16) boundaries, one shorter than the conv
    seqs = [jax.random.randint(jax.random.key(10 + i), (n,), 0, cfg.vocab_size) for i, n in enumerate(lens)]
    packed = jnp.concatenate(seqs)[None]
    seg = jnp.concatenate([jnp.full((n,), i) for i, n in enumerate(lens)])[None]
    pos = jnp.concatenate([jnp.arange(n) for n in lens])[None]
    out = fwd(params, packed, cfg, positions=pos, segment_ids=seg)
    start = 0
    for s in seqs:
        alone = fwd(params, s[None], cfg)
        np.testing.assert_allclose(out[0, start:start + len(s)], alone[0], atol=TOL, rtol=0)
        start += len(s)


@pytest.mark.integration
def test_remat_and_frozen_router(tiny):
    cfg, params = tiny
    toks = jax.random.randint(jax.random.key(4), (1, 12), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(nh.forward(p, toks, c))[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g = grad(params, cfg)
    g_remat = grad(params, dataclasses.replace(cfg, remat="full"))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    e = cfg.pattern.index("E")
    assert float(jnp.abs(g["layers"][e]["mixer"]["gate"]).max()) > 0
    assert float(jnp.abs(g["layers"][e]["mixer"]["e_score_correction_bias"]).max()) == 0
    g_frozen = grad(params, dataclasses.replace(cfg, freeze_router=True))
    assert float(jnp.abs(g_frozen["layers"][e]["mixer"]["gate"]).max()) == 0
    np.testing.assert_allclose(g_frozen["embed"], g["embed"], atol=1e-6)


def test_dt_floor_changes_only_when_set(tiny):
    cfg, params = tiny
    toks = jax.random.randint(jax.random.key(5), (1, 9), 0, cfg.vocab_size)
    a = fwd(params, toks, cfg)
    b = fwd(params, toks, dataclasses.replace(cfg, dt_floor=1e-12))
    c = fwd(params, toks, dataclasses.replace(cfg, dt_floor=0.5))
    np.testing.assert_allclose(a, b, atol=1e-7)
    assert float(jnp.abs(a - c).max()) > 1e-3
