"""Train steps on a tiny NemotronH: optimiser rules, gradients (REINFORCE identity, micro-batch
accumulation, finite differences), determinism, jit vs eager, the engine's rows against the
trainer.

Tolerances: fp32 compute throughout; gradient identities at rtol 1e-5 of the largest entry;
finite differences (central, ε = 1e-2 along a unit direction) at 2e-3 relative."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cascade_jax.rl as rl
from cascade_jax import config as C
from cascade_jax.config import ConfigError, OptimizerConfig, StageConfig
from cascade_jax.rollout import JaxEngine, Request, SamplingParams
from cascade_jax.rollout.packing import pack_rollouts
from cascade_jax.runner import build as RB
from models import nemotron_h as nh

# Attention + MLP keeps CPU compiles short (the model's own tests cover every layer kind); no
# top-k routing, so losses are smooth for finite differences. CFG_ALL has all four kinds.
CFG = nh.preset("tiny", vocab_size=48, hidden_size=32, pattern="*-", intermediate_size=48)
CFG_SMOOTH = CFG
CFG_ALL = nh.preset("tiny", vocab_size=48, hidden_size=32, pattern="ME*-", intermediate_size=48,
                    chunk_size=8)
F32 = jnp.float32


@functools.partial(jax.jit, static_argnums=0)
def init(cfg, key):
    return nh.init_params(cfg, key, dtype=F32)


@functools.partial(jax.jit, static_argnums=2, static_argnames="temperature")
def logprobs(params, batch, cfg, temperature=1.0):
    return rl.token_logprobs(params, batch, cfg, temperature=temperature)


def make_batch(cfg, seed=0, B=8, T=10):
    """Padded rows: prompt (varying length) + response (varying length) + padding, groups of
    sizes {3, 2, 3}, one truncated response, rollout log-probs = trainer's + noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    plen = rng.integers(2, 5, B)
    rlen = rng.integers(1, T - 4, B)
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    seg = (pos < (plen + rlen)[:, None]).astype(np.int32)
    mask = ((pos >= plen[:, None]) & (seg > 0)).astype(np.float32)
    params = init(cfg, jax.random.key(seed + 100))
    probe = rl.SFTBatch(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(mask))
    lp, _ = logprobs(params, probe, cfg)
    roll = np.asarray(lp) + rng.normal(0, 0.3, (B, T)).astype(np.float32) * mask
    teacher = np.asarray(lp) + rng.normal(0, 1.0, (B, T)).astype(np.float32) * mask
    batch = rl.RLBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
        loss_mask=jnp.asarray(mask), rollout_logp=jnp.asarray(roll * mask),
        rewards=jnp.asarray(rng.integers(0, 2, B).astype(np.float32)),
        group_ids=jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2][:B], jnp.int32),
        finish_reason=jnp.asarray([0, 1] + [0] * (B - 2), jnp.int32),
        domain_ids=jnp.zeros((B,), jnp.int32), teacher_logp=jnp.asarray(teacher * mask),
        ref_logp=jnp.asarray(roll * mask))
    return params, batch


def sgd_state(params):
    return rl.TrainState.create(params, optax.sgd(1.0))


@functools.lru_cache(maxsize=None)
def jitted_step(objective, grad_accum):
    """One compiled step per (objective, grad_accum), shared between tests; GRPO/MOPD use every
    switch: KL, icepop, overlong and dynamic filtering."""
    fn = {"grpo": rl.grpo_train_step, "mopd": rl.mopd_train_step, "sft": rl.sft_train_step}[objective]
    kw = dict(model_cfg=CFG, compute_dtype=F32, grad_accum=grad_accum)
    if objective != "sft":
        kw["settings"] = rl.loss_settings(StageConfig(
            objective=objective, kl_coef=0.03, is_correction="icepop", overlong_filtering=True,
            dynamic_filtering=True))
    return jax.jit(functools.partial(fn, **kw))


def grads_of(step, params, batch, **kw):
    """−Δparams after one SGD(lr=1) step = the gradient the step applied."""
    state = sgd_state(params)
    new, metrics = step(state, batch, **kw)
    return jax.tree.map(lambda a, b: a - b, state.params, new.params), metrics


def assert_tree_close(a, b, rtol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.abs(x).max()) for x in lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=rtol * scale)


# ---------------------------------------------------------------------------------------------
# Optimiser


def test_param_labels_and_frozen_leaves():
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, F32), nh.abstract_params(CFG_ALL))
    labels = rl.param_labels(nh.param_specs(CFG_ALL))
    moe = next(l["mixer"] for l, k in zip(labels["layers"], CFG_ALL.pattern) if k == "E")
    mamba = labels["layers"][0]["mixer"]
    assert moe["e_score_correction_bias"] == "frozen" and moe["gate"] == "decay"
    for name in ("A_log", "D", "dt_bias", "norm", "conv_b"):
        assert mamba[name] == "no_decay", name
    assert labels["norm_f"] == "no_decay" and labels["layers"][1]["norm"] == "no_decay"
    assert mamba["in_x"] == "decay" and labels["lm_head"] == "decay"
    frozen_cfg = dataclasses.replace(CFG_ALL, freeze_router=True)  # set once, on the model config
    frozen_gate = rl.param_labels(nh.param_specs(frozen_cfg))
    assert next(l["mixer"] for l, k in zip(frozen_gate["layers"], CFG_ALL.pattern) if k == "E")["gate"] == "frozen"

    # one real step with weight decay: frozen leaves bitwise unchanged, no_decay leaves with a
    # zero gradient unchanged, decayed matrices shrink even without gradient
    ocfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    state = rl.TrainState.from_config(params, ocfg, nh.param_specs(frozen_cfg))
    zero = jax.tree.map(jnp.zeros_like, state.params)
    ones = jax.tree.map(jnp.ones_like, state.params)
    apply = jax.jit(lambda s, g: s.apply_gradients(g))
    new = apply(state, ones)
    li = CFG_ALL.pattern.index("E")
    for name in ("gate", "e_score_correction_bias"):
        np.testing.assert_array_equal(new.params["layers"][li]["mixer"][name],
                                      state.params["layers"][li]["mixer"][name])
    new0 = apply(state, zero)
    np.testing.assert_array_equal(new0.params["norm_f"], state.params["norm_f"])
    np.testing.assert_array_equal(new0.params["layers"][0]["mixer"]["A_log"],
                                  state.params["layers"][0]["mixer"]["A_log"])
    np.testing.assert_allclose(new0.params["lm_head"], state.params["lm_head"] * (1 - 1e-2 * 0.1), rtol=1e-6)
    assert int(new.step) == 1


def test_lr_schedule_mopd_warmup():
    f = rl.lr_schedule(rl.mopd_optimizer_config())
    np.testing.assert_allclose([f(0), f(15), f(30), f(52)], [2e-7, 1.1e-6, 2e-6, 2e-6], rtol=1e-6)
    g = rl.lr_schedule(OptimizerConfig(lr=5e-5, warmup_init_lr=0.0, warmup_steps=200,
                                       schedule="cosine", min_lr=5e-6, decay_steps=1000))
    np.testing.assert_allclose([g(0), g(200), g(1000)], [0.0, 5e-5, 5e-6], rtol=1e-6)
    h = rl.lr_schedule(rl.sft_optimizer_config())
    np.testing.assert_allclose([h(0), h(100), h(200), h(40000)], [0.0, 2.5e-5, 5e-5, 5e-6], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients


def test_grpo_on_policy_gradient_equals_reinforce():
    params, batch = make_batch(CFG)
    adv = jnp.asarray(np.random.default_rng(1).normal(size=8).astype(np.float32))
    mask = batch.loss_mask * rl.segment_start_mask(batch.segment_ids)

    def lp_of(p):
        return rl.token_logprobs(p, batch, CFG)[0]

    g_grpo = jax.jit(jax.grad(lambda p: rl.grpo_loss(lp_of(p), None, adv, mask, num_tokens=50.0)[0]))(params)
    g_rf = jax.jit(jax.grad(lambda p: -(mask * adv[:, None] * lp_of(p)).sum() / 50.0))(params)
    assert_tree_close(g_grpo, g_rf, 1e-6)


@pytest.mark.parametrize("objective", ["grpo", "mopd", "sft"])
def test_micro_batches_equal_one_batch(objective):
    params, batch = make_batch(CFG)
    if objective == "sft":
        batch = rl.SFTBatch(batch.tokens, batch.positions, batch.segment_ids, batch.loss_mask)
    g1, m1 = grads_of(jitted_step(objective, 1), params, batch)
    g4, m4 = grads_of(jitted_step(objective, 4), params, batch)
    assert_tree_close(g4, g1, 1e-5)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m4["num_tokens"], m1["num_tokens"])
    np.testing.assert_allclose(m1["grad_norm"], optax.tree.norm(g1), rtol=1e-5)
    for k in ("entropy", "is_abs_delta_mean", "is_weight_mean", "reverse_kl", "ratio_mean", "nll"):
        if k in m1:  # token means survive accumulation (token-weighted over micro-batches)
            np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_packed_rows_equal_padded_rows_grpo():
    """Two padded rows packed into one (``seq_index`` maps tokens to sequences) give the same
    GRPO gradient: advantages, filtering and the token count are per sequence, not per row."""
    params, batch = make_batch(CFG)
    B, T = batch.tokens.shape
    cat = lambda x: jnp.concatenate([x[0::2], x[1::2]], axis=1)  # rows (0,1), (2,3), ... -> one row
    seg = batch.segment_ids
    packed = batch.replace(
        tokens=cat(batch.tokens), positions=cat(batch.positions),
        segment_ids=cat(jnp.where(seg > 0, seg + (jnp.arange(B) % 2)[:, None], 0)),
        loss_mask=cat(batch.loss_mask), rollout_logp=cat(batch.rollout_logp),
        teacher_logp=cat(batch.teacher_logp), ref_logp=cat(batch.ref_logp),
        seq_index=cat(jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, T))))
    step = jitted_step("grpo", 1)
    g_pad, m_pad = grads_of(step, params, batch)
    g_pack, m_pack = grads_of(step, params, packed)
    assert_tree_close(g_pack, g_pad, 1e-5)
    for k in ("loss", "num_tokens", "resp_len_mean", "adv_abs_mean", "entropy"):
        np.testing.assert_allclose(m_pack[k], m_pad[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _fd_check(loss_of_params, params, seed=0, eps=1e-2, rtol=2e-3, expected_grad=None):
    """Central finite difference along a random unit direction vs the autodiff directional
    derivative (and, if given, ``expected_grad`` vs autodiff of ``loss_of_params``)."""
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    v = [jax.random.normal(k, x.shape, F32) for k, x in zip(keys, leaves)]
    norm = jnp.sqrt(sum((x * x).sum() for x in v))
    v = jax.tree.unflatten(tdef, [x / norm for x in v])
    g = jax.jit(jax.grad(loss_of_params))(params)
    assert_tree_close(g, expected_grad, 1e-5) if expected_grad is not None else None
    analytic = sum((a * b).sum() for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, v)
    f = jax.jit(loss_of_params)
    numeric = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
    assert abs(float(analytic)) > 1e-4, float(analytic)
    np.testing.assert_allclose(float(numeric), float(analytic), rtol=rtol)


def test_finite_differences_grpo():
    params, batch = make_batch(CFG_SMOOTH, seed=3)
    mask = batch.loss_mask
    adv = rl.group_advantages(batch.rewards, batch.group_ids)
    lp_of = lambda p: rl.token_logprobs(p, batch, CFG_SMOOTH)[0]
    lp0 = logprobs(params, batch, CFG_SMOOTH)[0]
    kw = dict(rollout_logp=batch.rollout_logp, ref_logp=batch.ref_logp, kl_coef=0.5,
              is_correction="tis")
    # on-policy gradient (old = sg(lp)) vs finite differences of the surrogate with old fixed
    g_on = jax.jit(jax.grad(lambda p: rl.grpo_loss(lp_of(p), None, adv, mask, **kw)[0]))(params)
    _fd_check(lambda p: rl.grpo_loss(lp_of(p), lp0, adv, mask, **kw)[0], params, expected_grad=g_on)


def test_finite_differences_mopd():
    params, batch = make_batch(CFG_SMOOTH, seed=4)
    mask = batch.loss_mask
    lp_of = lambda p: rl.token_logprobs(p, batch, CFG_SMOOTH)[0]
    lp0 = logprobs(params, batch, CFG_SMOOTH)[0]
    noise = jax.random.normal(jax.random.key(0), mask.shape) * 0.8
    batch = batch.replace(rollout_logp=(lp0 + noise) * mask)
    # stop-gradient quantities frozen at θ0: a = teacher − lp0, w = band-masked exp(lp0 − lp_inf)
    a0 = batch.teacher_logp - lp0
    r0 = jnp.exp(lp0 - batch.rollout_logp)
    w0 = jnp.where((r0 >= 0.5) & (r0 <= 2.0), r0, 0.0) * mask
    assert float((w0 == 0).sum()) > float((mask == 0).sum())  # some tokens are band-masked
    nseq = (mask.sum(1) > 0).sum()
    surrogate = lambda p: -((w0 * a0 * lp_of(p)).sum(1) / jnp.maximum(mask.sum(1), 1)).sum() / nseq
    g = jax.jit(jax.grad(lambda p: rl.mopd_loss(lp_of(p), batch.teacher_logp, batch.rollout_logp, mask)[0]))(params)
    _fd_check(surrogate, params, expected_grad=g)


@pytest.mark.parametrize("norm", ["token", "domain"])
def test_mopd_step_loss_norm_and_domain_metrics(norm):
    """``stage.loss_norm`` reaches the loss (the step's gradient is ``mopd_loss``'s with the
    batch's counts, also over micro-batches), and each teacher domain gets its token count and
    loss share (``rl.domain_metrics``; the shares of the two domains sum to 1)."""
    params, batch = make_batch(CFG, seed=8)
    dom = np.array([4, 3, 4, 4, 3, 4, 3, 4], np.int32)  # math, structured_output
    batch = batch.replace(domain_ids=jnp.asarray(dom), finish_reason=jnp.zeros((8,), jnp.int32))
    stage = StageConfig(objective="mopd", loss_norm=norm, teachers={"math": "a", "structured_output": "b"})
    kw = dict(model_cfg=CFG, compute_dtype=F32, settings=rl.loss_settings(stage))
    g1, m1 = grads_of(jax.jit(functools.partial(rl.mopd_train_step, **kw)), params, batch)
    g2, m2 = grads_of(jax.jit(functools.partial(rl.mopd_train_step, grad_accum=2, **kw)), params, batch)
    m1, m2 = (rl.domain_metrics(m, stage.teachers) for m in (m1, m2))
    assert {k for k in m1 if k.startswith("mopd/")} == {
        "mopd/tokens/math", "mopd/tokens/structured_output", "mopd/loss_share/math",
        "mopd/loss_share/structured_output"}
    assert_tree_close(g2, g1, 1e-5)
    lp_of = lambda p: rl.token_logprobs(p, batch, CFG)[0]
    mask = batch.loss_mask * rl.segment_start_mask(batch.segment_ids)
    dom_tok = jnp.broadcast_to(jnp.asarray(dom)[:, None], mask.shape)
    want = jax.jit(jax.grad(lambda p: rl.mopd_loss(
        lp_of(p), batch.teacher_logp, batch.rollout_logp, mask, normalization=norm,
        domain_index=dom_tok, num_domains=9)[0]))(params)
    assert_tree_close(g1, want, 1e-5)
    m_np = np.asarray(mask)
    for name, i in (("math", 4), ("structured_output", 3)):
        assert float(m1[f"mopd/tokens/{name}"]) == m_np[dom == i].sum() > 0, name
        np.testing.assert_allclose(m2[f"mopd/loss_share/{name}"], m1[f"mopd/loss_share/{name}"], rtol=1e-5)
    np.testing.assert_allclose(m1["mopd/loss_share/math"] + m1["mopd/loss_share/structured_output"],
                               1.0, rtol=1e-6)
    assert 0.0 < float(m1["mopd/loss_share/math"]) < 1.0


def test_mopd_step_domain_loss_weights():
    """``stage.domain_loss_weights`` reaches the step: its gradient is ``mopd_loss``'s with
    ``domain_weight`` λ (math 3, structured_output 0.5, the rest 1), also over micro-batches;
    unknown domains and bad weights are refused naming the key."""
    params, batch = make_batch(CFG, seed=8)
    dom = np.array([4, 3, 4, 4, 3, 4, 3, 4], np.int32)  # math, structured_output
    batch = batch.replace(domain_ids=jnp.asarray(dom), finish_reason=jnp.zeros((8,), jnp.int32))
    stage = StageConfig(objective="mopd", loss_norm="token",
                        domain_loss_weights={"math": 3, "structured_output": 0.5})
    settings = rl.loss_settings(stage)
    lam = np.ones(9, np.float32)
    lam[4], lam[3] = 3.0, 0.5
    assert settings.domain_weights == tuple(lam.tolist())
    kw = dict(model_cfg=CFG, compute_dtype=F32, settings=settings)
    g1, _ = grads_of(jax.jit(functools.partial(rl.mopd_train_step, **kw)), params, batch)
    g2, _ = grads_of(jax.jit(functools.partial(rl.mopd_train_step, grad_accum=2, **kw)), params, batch)
    g0, _ = grads_of(jax.jit(functools.partial(rl.mopd_train_step, model_cfg=CFG, compute_dtype=F32,
                                               settings=rl.loss_settings(dataclasses.replace(
                                                   stage, domain_loss_weights={})))), params, batch)
    lp_of = lambda p: rl.token_logprobs(p, batch, CFG)[0]
    mask = batch.loss_mask * rl.segment_start_mask(batch.segment_ids)
    dom_tok = jnp.broadcast_to(jnp.asarray(dom)[:, None], mask.shape)
    want = jax.jit(jax.grad(lambda p: rl.mopd_loss(
        lp_of(p), batch.teacher_logp, batch.rollout_logp, mask, normalization="token",
        domain_index=dom_tok, num_domains=9, domain_weight=jnp.asarray(lam))[0]))(params)
    assert_tree_close(g1, want, 1e-5)
    assert_tree_close(g2, g1, 1e-5)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
    with pytest.raises(ConfigError, match="stage.domain_loss_weights.maths: unknown domain"):
        rl.loss_settings(StageConfig(objective="mopd", domain_loss_weights={"maths": 2}))
    with pytest.raises(ConfigError, match="stage.domain_loss_weights.math: expected a finite weight"):
        StageConfig(objective="mopd", domain_loss_weights={"math": -1})
    with pytest.raises(ConfigError, match="stage.domain_loss_weights: read only by objective 'mopd'"):
        StageConfig(objective="grpo", domain_loss_weights={"math": 2})
    with pytest.raises(ValueError, match="MOPDSettings.domain_weights: need 9 finite weights"):
        rl.MOPDSettings(domain_weights=(1.0, 2.0))


def test_finite_differences_sft():
    params, batch = make_batch(CFG_SMOOTH, seed=5)
    sft = rl.SFTBatch(batch.tokens, batch.positions, batch.segment_ids, batch.loss_mask)
    _fd_check(lambda p: rl.sft_loss(rl.token_logprobs(p, sft, CFG_SMOOTH)[0], sft.loss_mask,
                                    segment_ids=sft.segment_ids)[0], params)


# ---------------------------------------------------------------------------------------------
# Determinism, jit, the engine's rows


def test_train_step_deterministic_and_jit_matches_eager():
    params, batch = make_batch(CFG, seed=6)
    stage = StageConfig(objective="grpo", is_correction="tis", kl_coef=0.03)
    state = rl.TrainState.from_config(params, OptimizerConfig(lr=1e-3, warmup_steps=3,
                                                              warmup_init_lr=1e-4),
                                      nh.param_specs(CFG))
    step = rl.make_train_step("grpo", model_cfg=CFG, settings=rl.loss_settings(stage), grad_accum=2)
    batch = batch.replace(policy_version=jnp.zeros((8,), jnp.int32))
    s1, m1 = step(state, batch)
    s2, m2 = step(state, batch)
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eager = rl.make_train_step("grpo", jit=False, model_cfg=CFG, settings=rl.loss_settings(stage),
                               grad_accum=2)
    s3, m3 = eager(state, batch)
    # bf16 compute: jit may fuse differently from eager; updates are lr-sized (1e-4 at step 0)
    assert_tree_close(s3.params, s1.params, 1e-6)
    for k in ("loss", "grad_norm", "entropy", "is_abs_delta_mean"):
        np.testing.assert_allclose(m3[k], m1[k], rtol=2e-2, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(m1["lr"], 1e-4, rtol=1e-6)
    expected = {"loss", "grad_norm", "lr", "entropy", "resp_len_mean", "num_tokens", "adv_mean",
                "is_abs_delta_p99", "is_weight_mean", "is_frac_corrected", "reward_mean", "kl_ref",
                "policy_lag_max"}
    assert expected <= set(m1), expected - set(m1)


# ---------------------------------------------------------------------------------------------
# Loss settings: the steps' one static loss argument


def test_loss_settings_from_stage():
    """Every loss field of the stage reaches its settings, the bookkeeping (name, steps,
    teachers) none; bad values are refused naming the field."""
    g = rl.loss_settings(StageConfig(objective="grpo", kl_coef=0.03, is_correction="icepop",
                                     is_low=0.4, is_high=1.5, leave_one_out=True,
                                     overlong_filtering=True, dynamic_filtering=True))
    assert g == rl.GRPOSettings(kl_coef=0.03, clip_low=0.2, clip_high=0.2, is_correction="icepop",
                                is_low=0.4, is_high=1.5, leave_one_out=True,
                                overlong_filtering=True, dynamic_filtering=True)
    m = rl.loss_settings(StageConfig(objective="mopd", is_low=0.3, is_high=3.0, loss_norm="domain",
                                     leave_one_out=True, teachers={"math": "a"}))
    assert m == rl.MOPDSettings(is_low=0.3, is_high=3.0, loss_norm="domain", grpo_coef=0.0,
                                leave_one_out=True)
    assert rl.loss_settings(StageConfig(objective="sft")) is None
    for cls in (rl.GRPOSettings, rl.MOPDSettings):
        assert not {"name", "steps", "teachers", "objective"} & {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(ValueError, match="GRPOSettings.is_correction"):
        rl.GRPOSettings(is_correction="clip")
    with pytest.raises(ValueError, match="MOPDSettings.is_low/is_high"):
        rl.MOPDSettings(is_low=2.0, is_high=1.0)
    with pytest.raises(ValueError, match="MOPDSettings.loss_norm"):
        rl.MOPDSettings(loss_norm="row")
    with pytest.raises(ValueError, match="GRPOSettings.clip_high"):
        rl.GRPOSettings(clip_high=-0.1)


def test_bookkeeping_does_not_recompile_the_step():
    """Stages that differ only in name / steps / teachers give equal loss settings and equal
    runner step arguments: one compiled step (jit cache size 1), bitwise equal results; a loss
    field (``kl_coef``) does recompile and changes the result."""
    params, batch = make_batch(CFG, seed=11)
    state = sgd_state(params)
    grpo = jax.jit(rl.grpo_train_step, static_argnames=("model_cfg", "settings", "compute_dtype"))
    base = dict(objective="grpo", is_correction="icepop", dynamic_filtering=True)
    a = StageConfig(name="a", steps=3, **base)
    b = StageConfig(name="b", steps=40, teachers={"math": "ckpt"}, **base)
    outs = [grpo(state, batch, model_cfg=CFG, settings=rl.loss_settings(st), compute_dtype=F32)
            for st in (a, b)]
    assert grpo._cache_size() == 1
    for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    kl = grpo(state, batch, model_cfg=CFG, compute_dtype=F32,
              settings=rl.loss_settings(dataclasses.replace(a, kl_coef=0.5)))
    assert grpo._cache_size() == 2 and float(kl[1]["loss"]) != float(outs[0][1]["loss"])
    # the runner's step arguments (and so the sharded step and the dry run) likewise
    for obj in ("grpo", "mopd"):
        cfgs = [C.Config(stage=StageConfig(objective=obj, name=n, steps=k, teachers=t))
                for n, k, t in (("x", 1, {"math": "p"}), ("y", 9, {"math": "q", "code": "r"}))]
        s1, s2 = (RB.train_step_static(c) for c in cfgs)
        assert "stage" not in s1 and s1 == s2 and hash(s1["settings"]) == hash(s2["settings"]), obj


def test_mopd_step_with_routed_teachers_and_grpo_mixing():
    params, batch = make_batch(CFG, seed=7)
    teacher_b = init(CFG, jax.random.key(9))
    batch = batch.replace(domain_ids=jnp.asarray([0, 1] * 4, jnp.int32))
    # each sequence scored by its domain's teacher (domain 0: the policy, 1: teacher_b)
    tlp = jnp.where((batch.domain_ids == 0)[:, None], logprobs(params, batch, CFG)[0],
                    logprobs(teacher_b, batch, CFG)[0])
    state = rl.TrainState.from_config(params, rl.mopd_optimizer_config(), nh.param_specs(CFG))
    step = rl.make_train_step("mopd", model_cfg=CFG, settings=rl.MOPDSettings(grpo_coef=0.1))
    new, m = step(state, batch.replace(teacher_logp=tlp))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    np.testing.assert_allclose(m["lr"], 2e-7, rtol=1e-6)
    assert "reverse_kl" in m and "adv_mean" in m


@jax.jit
def forward(params, tokens, segment_ids):
    """``[B, T, V]`` logits of the full forward (the independent reference of the engine's rows)."""
    return nh.forward(params, tokens, CFG, segment_ids=segment_ids)


def engine_batch(engine, prompts, sampling: SamplingParams, seeds):
    """``prompts`` through ``engine`` (one request each, seeded ``seeds``), packed in the padded
    layout (16 columns) with zero rewards: the rows a GRPO step gets."""
    ro = engine.generate([Request(prompt_ids=p, sampling=dataclasses.replace(sampling, seed=s))
                          for p, s in zip(prompts, seeds)])
    return pack_rollouts(ro, np.zeros(len(prompts)), seq_len=16)


def test_engine_batch_logprobs_match_trainer():
    """The one generator (the engine) packed into an RLBatch: sampling log-probs at τ = 0.8 equal
    the trainer's recomputation (fp32, 2e-5), prompts kept in front of their responses, no
    teacher log-probs (MOPD refuses the batch), the contract recorded; top-k / top-p draws stay
    in the support; greedy ignores the seed and reports the mode's log-prob under the unscaled
    logits."""
    params = init(CFG, jax.random.key(1))
    eng = JaxEngine(CFG, params, num_slots=4, max_len=11, prompt_buckets=(5,), prefill_sizes=(4,),
                    steps_per_call=6)
    rng = np.random.default_rng(2)
    lengths = [5, 3, 4, 2]
    prompts = [tuple(rng.integers(3, CFG.vocab_size, n).tolist()) for n in lengths]
    sp = SamplingParams(max_new_tokens=6, temperature=0.8, stop_token_ids=(2,))
    batch = engine_batch(eng, prompts, sp, seeds=range(4))
    assert batch.sampling == sp and batch.teacher_logp is None
    lp, _ = logprobs(params, batch, CFG, temperature=0.8)
    m = batch.loss_mask
    np.testing.assert_allclose(np.asarray(lp * m), np.asarray(batch.rollout_logp), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(m.sum(1)) > 0, True)
    for b, p in enumerate(prompts):  # prompt kept, response right after it
        np.testing.assert_array_equal(batch.tokens[b, :len(p)], p)
        assert float(m[b, len(p) - 1]) == 0 and float(m[b, len(p)]) == 1
    with pytest.raises(ValueError, match="teacher_logp"):
        rl.mopd_train_step(None, batch, model_cfg=CFG)  # refused before the state is read
    # top-k / top-p: every drawn token lies in SGLang's support (numpy, fp64: fewer than k
    # tokens ranked before it, and their mass under softmax(z / τ) at most top_p)
    t = engine_batch(eng, prompts, dataclasses.replace(sp, top_p=0.6, top_k=3), seeds=range(12, 16))
    z = np.asarray(forward(params, t.tokens, t.segment_ids), np.float64) / 0.8
    cols = np.argwhere(np.asarray(t.loss_mask) > 0)
    for b, c in cols:
        p = np.exp(z[b, c - 1] - z[b, c - 1].max())
        p /= p.sum()
        ahead = p > p[int(t.tokens[b, c])]
        assert ahead.sum() < 3 and p[ahead].sum() <= 0.6 + 1e-6, (b, c)
    assert len(cols) >= 8
    greedy = dataclasses.replace(sp, temperature=0.0)
    g = engine_batch(eng, prompts, greedy, seeds=range(4, 8))
    g2 = engine_batch(eng, prompts, greedy, seeds=range(8, 12))
    np.testing.assert_array_equal(g.tokens, g2.tokens)  # greedy ignores the seed
    assert g.sampling.greedy and g.sampling.logprob_temperature == 1.0
    # greedy (τ = 0) picks the mode: its log-prob is the max of the unscaled log-softmax
    full = jax.nn.log_softmax(forward(params, g.tokens, g.segment_ids), -1)
    best = full.max(-1)[:, :-1]
    np.testing.assert_allclose(np.asarray(g.rollout_logp[:, 1:]),
                               np.asarray(best * g.loss_mask[:, 1:]), atol=2e-5)


def test_mopd_step_forward_kl_term():
    """``stage.forward_kl_coef`` / ``teacher_topk`` reach the step: with a teacher's top-K
    (another tiny model, ``rl.token_topk_logprobs`` at τ = 1.5) in the batch, the step's
    gradient is that of ``mopd_loss`` plus ``β Σ mask c_t Σ_k q_k (log q_k − log p_k)`` with
    ``log p`` from a full-vocabulary log-softmax of the model's logits (an independent path:
    no chunking), also over micro-batches; a batch without the top-K is refused."""
    params, batch = make_batch(CFG, seed=9)
    dom = np.array([4, 3, 4, 4, 3, 4, 3, 4], np.int32)  # math, structured_output
    batch = batch.replace(finish_reason=jnp.zeros((8,), jnp.int32), domain_ids=jnp.asarray(dom))
    tau, K, beta = 1.5, 6, 0.5
    teacher = init(CFG, jax.random.key(77))
    _, ids, tlp = jax.jit(functools.partial(rl.token_topk_logprobs, cfg=CFG, k=K, temperature=tau))(
        teacher, batch)
    mask = batch.loss_mask * rl.segment_start_mask(batch.segment_ids)
    batch = batch.replace(teacher_topk_ids=ids, teacher_topk_logp=tlp,
                          sampling=SamplingParams(temperature=tau))
    stage = StageConfig(objective="mopd", forward_kl_coef=beta, teacher_topk=K)
    kw = dict(model_cfg=CFG, compute_dtype=F32, settings=rl.loss_settings(stage))
    g1, m1 = grads_of(jax.jit(functools.partial(rl.mopd_train_step, **kw)), params, batch)
    g2, _ = grads_of(jax.jit(functools.partial(rl.mopd_train_step, grad_accum=2, **kw)), params, batch)
    assert_tree_close(g2, g1, 1e-5)

    def reference(p):
        h = nh.hidden_states(p, batch.tokens, CFG, positions=batch.positions,
                             segment_ids=batch.segment_ids)
        ls = jax.nn.log_softmax((h @ p["lm_head"]) / tau, -1)
        ls = jnp.pad(ls[:, :-1], ((0, 0), (1, 0), (0, 0)))  # aligned: entry t predicts token t
        lp = jnp.take_along_axis(ls, batch.tokens[..., None], -1)[..., 0] * mask
        slp_k = jnp.take_along_axis(ls, ids, -1)
        base = rl.mopd_loss(lp, batch.teacher_logp, batch.rollout_logp, mask)[0]
        F = (jnp.exp(tlp) * (tlp - slp_k)).sum(-1)
        c = 1.0 / ((mask.sum(1) > 0).sum() * jnp.maximum(mask.sum(1), 1.0))[:, None]
        return base + beta * (c * mask * F).sum(), F * mask

    g_ref, fkl_ref = jax.jit(jax.grad(reference, has_aux=True))(params)
    assert_tree_close(g1, g_ref, 1e-5)
    fkl_ref, m_np = np.asarray(fkl_ref), np.asarray(mask)
    np.testing.assert_allclose(float(m1["forward_kl_topk"]), fkl_ref.sum() / m_np.sum(), rtol=1e-5)
    named = rl.domain_metrics(m1, ["math", "structured_output"])
    for name, i in (("math", 4), ("structured_output", 3)):  # per-domain means
        np.testing.assert_allclose(named[f"mopd/forward_kl/{name}"],
                                   fkl_ref[dom == i].sum() / m_np[dom == i].sum(), rtol=1e-5)
    g0, _ = grads_of(jax.jit(functools.partial(rl.mopd_train_step, model_cfg=CFG, compute_dtype=F32,
                                               settings=rl.loss_settings(StageConfig(objective="mopd")))),
                     params, batch)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))) > 1e-3
    with pytest.raises(ValueError, match="needs batch.teacher_topk_ids"):
        rl.mopd_train_step(sgd_state(params), batch.replace(teacher_topk_ids=None), **kw)
