"""Expert-load statistics in the train-step metrics (``cascade_jax.rl.expert_load``).

* a hand-computed case (exact values) and random cases against a numpy reference (per-layer
  ``np.bincount`` over valid tokens), tolerance 1e-6;
* through the GRPO / SFT steps of a tiny MoE model (fp32): the ``moe/*`` metrics equal the
  numpy statistics of the experts a separate forward routes the batch's valid tokens to, with
  one micro-batch and with ``grad_accum=2`` (counts summed over micro-batches, so the same
  values), 1e-5;
* through the stage runner: one tiny GRPO step's line in ``metrics.jsonl`` carries them."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cascade_jax.rl as rl
from cascade_jax.rl.expert_load import expert_counts, load_metrics
from models import nemotron_h as nh

KEYS = ("moe/load_max_over_mean", "moe/load_max_over_mean_worst", "moe/load_cv", "moe/dead_experts")


def np_stats(ids, mask, n_exp):
    """numpy reference: ``ids [..., L, K]``, ``mask [...]``."""
    ids = np.asarray(ids).reshape(-1, *np.shape(ids)[-2:])
    keep = np.asarray(mask).reshape(-1) > 0
    per = []
    for l in range(ids.shape[1]):
        c = np.bincount(ids[keep, l].ravel(), minlength=n_exp).astype(np.float64)
        if c.sum() == 0:
            continue
        mu = c.mean()
        per.append((c.max() / mu, c.std() / mu, np.mean(c == 0)))
    if not per:
        return dict.fromkeys(KEYS, 0.0)
    a = np.array(per)
    return {"moe/load_max_over_mean": a[:, 0].mean(), "moe/load_max_over_mean_worst": a[:, 0].max(),
            "moe/load_cv": a[:, 1].mean(), "moe/dead_experts": a[:, 2].mean()}


def test_hand_computed():
    # 3 tokens (the last one masked out), 2 layers, top-2 of 4 experts
    ids = jnp.asarray([[[0, 1], [2, 3]],
                       [[0, 2], [2, 3]],
                       [[3, 3], [0, 1]]], jnp.int32)
    mask = jnp.asarray([1.0, 1.0, 0.0])
    c = np.asarray(expert_counts(ids, mask, 4))
    np.testing.assert_array_equal(c, [[2, 1, 1, 0], [0, 0, 2, 2]])
    m = {k: float(v) for k, v in load_metrics(jnp.asarray(c)).items()}
    # layer 0: mean 1, max 2, std sqrt(0.5); layer 1: mean 1, max 2, std 1
    assert m["moe/load_max_over_mean"] == pytest.approx(2.0, abs=1e-6)
    assert m["moe/load_max_over_mean_worst"] == pytest.approx(2.0, abs=1e-6)
    assert m["moe/load_cv"] == pytest.approx((np.sqrt(0.5) + 1.0) / 2, abs=1e-6)
    assert m["moe/dead_experts"] == pytest.approx((0.25 + 0.5) / 2, abs=1e-6)
    # balanced load: ratio 1, cv 0; nothing valid: all 0
    bal = load_metrics(jnp.full((3, 8), 5.0))
    assert float(bal["moe/load_max_over_mean"]) == 1.0 and float(bal["moe/load_cv"]) == 0.0
    empty = load_metrics(expert_counts(ids, jnp.zeros(3), 4))
    assert all(float(v) == 0.0 for v in empty.values())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_against_numpy(seed):
    rng = np.random.default_rng(seed)
    n_exp = 16
    ids = rng.integers(0, n_exp, (4, 9, 3, 2)) if seed == 0 else rng.integers(0, 3, (4, 9, 3, 2))
    mask = (rng.uniform(size=(4, 9)) < 0.6).astype(np.float32)
    got = load_metrics(expert_counts(jnp.asarray(ids), jnp.asarray(mask), n_exp))
    want = np_stats(ids, mask, n_exp)
    for k in KEYS:
        assert float(got[k]) == pytest.approx(want[k], rel=1e-6, abs=1e-6), k
    if seed == 1:
        assert want["moe/dead_experts"] == pytest.approx(13 / 16)


CFG = nh.preset("tiny", vocab_size=48, hidden_size=32, pattern="E*E", intermediate_size=48)


def _batch(B=4, T=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    lens = np.array([12, 9, 7, 10])[:B]
    seg = (pos < lens[:, None]).astype(np.int32)
    mask = ((pos >= 3) & (seg > 0)).astype(np.float32)
    return rl.RLBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
        loss_mask=jnp.asarray(mask), rollout_logp=jnp.zeros((B, T), jnp.float32),
        rewards=jnp.asarray([1.0, 0.0, 1.0, 0.0]), group_ids=jnp.asarray([0, 0, 1, 1], jnp.int32),
        finish_reason=jnp.zeros((B,), jnp.int32), domain_ids=jnp.zeros((B,), jnp.int32))


@pytest.mark.integration
def test_train_steps_report_expert_load():
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    batch = _batch()
    _, experts = jax.jit(lambda p, t, pos, s: nh.hidden_states(p, t, CFG, positions=pos, segment_ids=s,
                                                                return_routed_experts=True))(
        params, batch.tokens, batch.positions, batch.segment_ids)
    # the steps' valid tokens: loss mask x segment-start mask (every group has mixed rewards)
    valid = np.asarray(batch.loss_mask) * np.asarray(rl.segment_start_mask(batch.segment_ids))
    want = np_stats(experts, valid, CFG.n_routed_experts)
    assert want["moe/load_max_over_mean"] > 1.0
    state = rl.TrainState.create(params, optax.sgd(0.1))
    for objective, accum in (("grpo", 1), ("grpo", 2), ("sft", 2)):
        fn = {"grpo": rl.grpo_train_step, "sft": rl.sft_train_step}[objective]
        kw = dict(model_cfg=CFG, compute_dtype=jnp.float32, grad_accum=accum)
        if objective == "grpo":
            kw["settings"] = rl.GRPOSettings()
        b = batch if objective == "grpo" else rl.SFTBatch(batch.tokens, batch.positions, batch.segment_ids,
                                                          batch.loss_mask)
        _, m = jax.jit(functools.partial(fn, **kw))(state, b)
        assert "moe_expert_counts" not in m
        for k in KEYS:
            assert float(m[k]) == pytest.approx(want[k], rel=1e-5, abs=1e-6), (objective, accum, k)


@pytest.mark.integration
def test_runner_metrics_carry_expert_load(tmp_path, tiny_cfg):
    from cascade_jax import config as C
    from cascade_jax.runner import run_stage

    cfg = C.from_dict(C.Config, {
        "model": {"preset": "tiny", "dtype": "float32"},
        "optimizer": {"lr": 2e-3},
        "rollout": {"sampling": {"n_samples": 2, "max_prompt_len": 64, "max_response_len": 4},
                    "batching": {"num_slots": 4, "steps_per_call": 4}},
        "data": {"domains": ["structured_output"], "batch_prompts": 2, "tiny_rows_per_domain": 32},
        "stage": {"name": "expert_load", "objective": "grpo", "steps": 1},
        "eval": {"every": -1},
        "run": {"out_dir": str(tmp_path / "run")},
    })
    run_stage(cfg, progress=False, log=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 1
    m = steps[0]
    n_exp = tiny_cfg().n_routed_experts
    assert 1.0 <= m["moe/load_max_over_mean"] <= m["moe/load_max_over_mean_worst"] <= n_exp
    assert 0.0 <= m["moe/dead_experts"] < 1.0 and m["moe/load_cv"] >= 0.0
