"""The MOPD recipe's switches (configs/SOURCES.md, "recipe comparison"): each is validated with
a one-line error naming the field and changes what it says. Loss normalisation
(``stage.loss_norm``) and the frozen router (``model.overrides.freeze_router``) are tested in
test_rl_losses.py / test_rl_steps.py; Adam β2, weight decay and gradient clipping here against a
hand-written numpy AdamW (decoupled decay, ε outside the root, bias-corrected moments)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax.rl as rl
import configs
from cascade_jax.config import ConfigError, OptimizerConfig, RolloutConfig, ServersSection
from cascade_jax.config import load as load_config
from cascade_jax.runner.build import model_config

Spec = collections.namedtuple("Spec", "decay trainable fp32")
SPECS = {"w": Spec(True, True, True), "b": Spec(False, True, True)}
P0 = {"w": np.array([1.0, -2.0], np.float32), "b": np.array([0.5], np.float32)}
GRADS = [{"w": np.array([3.0, 4.0], np.float32), "b": np.array([0.0], np.float32)},   # norm 5
         {"w": np.array([0.3, -0.4], np.float32), "b": np.array([0.0], np.float32)}]  # norm 0.5


def numpy_adamw(cfg: OptimizerConfig, grads):
    """Reference: clip by global norm, then per leaf m = b1 m + (1-b1) g, v = b2 v + (1-b2) g²,
    p -= lr (m̂ / (√v̂ + eps) + wd·p [decay leaves only]), m̂ = m/(1-b1^t), v̂ = v/(1-b2^t)."""
    p = {k: v.astype(np.float64) for k, v in P0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        if cfg.grad_clip > 0 and norm > cfg.grad_clip:
            g = {k: x * cfg.grad_clip / norm for k, x in g.items()}
        for k in p:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
            upd = (m[k] / (1 - cfg.b1 ** t)) / (np.sqrt(v[k] / (1 - cfg.b2 ** t)) + cfg.eps)
            if SPECS[k].decay:
                upd = upd + cfg.weight_decay * p[k]
            p[k] = p[k] - cfg.lr * upd
    return p


def run_optax(cfg: OptimizerConfig, grads):
    state = rl.TrainState.from_config({k: jnp.asarray(v) for k, v in P0.items()}, cfg, SPECS)
    for g in grads:
        state = state.apply_gradients({k: jnp.asarray(x) for k, x in g.items()})
    return jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("overrides", [
    dict(b2=0.95, weight_decay=0.0, grad_clip=1.0),    # the paper's β2 (our choice)
    dict(b2=0.999, weight_decay=0.0, grad_clip=1.0),   # NeMo-RL's β2
    dict(b2=0.95, weight_decay=0.1, grad_clip=1.0),
    dict(b2=0.95, weight_decay=0.0, grad_clip=0.0),    # clipping off
])
def test_optimizer_switches_match_numpy_adamw(overrides):
    cfg = OptimizerConfig(lr=0.1, **overrides)
    got, want = run_optax(cfg, GRADS), numpy_adamw(cfg, GRADS)
    for k in P0:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)


def test_each_optimizer_switch_changes_the_update():
    """Hand-computed second step of ``w[0]`` (g1 = 3 clipped to 0.6, g2 = 0.3; lr 0.1, b1 0.9):
    β2 0.95 vs 0.999 differ only through v̂; clipping off uses g1 = 3; decay adds lr·wd·p."""
    base = OptimizerConfig(lr=0.1, b2=0.95, grad_clip=1.0)

    def step2(b2, g1):
        m = 0.9 * (0.1 * g1) + 0.1 * 0.3
        v = b2 * ((1 - b2) * g1 ** 2) + (1 - b2) * 0.09
        return (m / (1 - 0.81)) / (np.sqrt(v / (1 - b2 ** 2)) + 1e-8)

    w1 = 1.0 - 0.1 * (0.6 / (0.6 + 1e-8))  # first step: m̂/√v̂ = sign(g)
    for b2, clip, want_w0 in [(0.95, 1.0, w1 - 0.1 * step2(0.95, 0.6)),
                              (0.999, 1.0, w1 - 0.1 * step2(0.999, 0.6)),
                              (0.95, 0.0, 1.0 - 0.1 * (3 / (3 + 1e-8)) - 0.1 * step2(0.95, 3.0))]:
        cfg = OptimizerConfig(lr=0.1, b2=b2, grad_clip=clip)
        assert run_optax(cfg, GRADS)["w"][0] == pytest.approx(want_w0, abs=2e-6), (b2, clip)
    # the three settings give three different weights (each switch acts)
    outs = {run_optax(OptimizerConfig(lr=0.1, b2=b2, grad_clip=c), GRADS)["w"][0]
            for b2, c in [(0.95, 1.0), (0.999, 1.0), (0.95, 0.0)]}
    assert len(outs) == 3
    decayed = run_optax(OptimizerConfig(lr=0.1, b2=0.95, grad_clip=1.0, weight_decay=0.1), GRADS[:1])
    plain = run_optax(base, GRADS[:1])
    np.testing.assert_allclose(decayed["w"] - plain["w"], -0.1 * 0.1 * P0["w"], atol=1e-7)
    np.testing.assert_array_equal(decayed["b"], plain["b"])  # 1-D leaves never decay


@pytest.mark.parametrize("field,value,msg", [
    ("b2", 1.0, "optimizer.b2: must be in [0, 1)"),
    ("b2", -0.1, "optimizer.b2: must be in [0, 1)"),
    ("b1", 1.5, "optimizer.b1: must be in [0, 1)"),
    ("eps", 0.0, "optimizer.eps: must be > 0"),
    ("weight_decay", -0.1, "optimizer.weight_decay: must be >= 0"),
    ("grad_clip", -1.0, "optimizer.grad_clip: must be >= 0"),
    ("grad_clip", float("nan"), "optimizer.grad_clip: must be >= 0"),
])
def test_optimizer_switch_errors(field, value, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        OptimizerConfig(**{field: value})


def test_max_policy_lag_errors():
    served = ServersSection(url="http://h:1")
    assert RolloutConfig().max_policy_lag == 0  # strictly on-policy by default (the paper)
    for bad in (2, -1):
        with pytest.raises(ConfigError, match="rollout.max_policy_lag: must be 0"):
            RolloutConfig(engine="jax_server", servers=served, max_policy_lag=bad)
    with pytest.raises(ConfigError, match="rollout.max_policy_lag: 1 needs a served engine"):
        RolloutConfig(engine="jax", max_policy_lag=1)
    assert RolloutConfig(engine="jax_server", servers=served, max_policy_lag=1).max_policy_lag == 1


@pytest.mark.parametrize("stage", ["sft", "if_rl", "multi_domain_rl", "mopd", "rlhf", "rlhf_teacher",
                                   "long_context_rl", "code_rl", "swe_rl"])
def test_30b_rl_stages_freeze_the_router_and_sft_trains_it(stage):
    """configs/SOURCES.md: every RL stage freezes the MoE router (NeMo-RL's Nano-3 GRPO recipe and
    its MOPD replication do); SFT trains it. Read from the composed model config the runner
    builds, so an override that loses the flag on the way fails here."""
    run_config = load_config(str(configs.stage_path(stage)))
    assert model_config(run_config).freeze_router is (stage != "sft")
