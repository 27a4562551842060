"""Rollout-fidelity metrics: how far the sampler's numbers are from the trainer's (pure functions).

Log-prob mismatch over the trained tokens (``mask``), with ``δ_t = lp_train(y_t) − lp_rollout(y_t)``::

    mismatch_abs_max      max_t |δ_t|
    mismatch_abs_mean     mean_t |δ_t|
    mismatch_exact_frac   fraction of tokens with δ_t == 0 exactly (1.0 in zero-mismatch mode)
    mismatch_out_of_band  fraction of tokens whose ratio exp(δ_t) lies outside [low, high]
                          (the IS band of the stage: is_low / is_high)

Routing mismatch (MoE, routing replay): for expert ids ``[B, T, L_moe, K]`` of the rollout and of
an *unreplayed* trainer forward (``forward(..., return_routed_experts=True)``), a token's experts
differ in a layer when the two top-k *sets* differ (order within the top-k is ignored)::

    routing_token_diff_frac  fraction of tokens whose set differs in at least one MoE layer
    routing_layer_diff_frac  fraction of (token, layer) pairs whose sets differ
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .is_correction import masked_mean

__all__ = ["logprob_mismatch", "routing_mismatch"]


def logprob_mismatch(train_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, *,
                     low: float = 0.5, high: float = 2.0) -> dict:
    """Scalar metrics of ``δ = train_logp − rollout_logp`` (each ``[B, T]``) over ``mask``
    (module doc). Empty mask: every metric 0 (``mismatch_exact_frac`` too)."""
    m = (mask > 0).astype(jnp.float32)
    delta = jnp.where(m > 0, train_logp.astype(jnp.float32) - rollout_logp.astype(jnp.float32), 0.0)
    ad = jnp.abs(delta)
    ratio = jnp.exp(delta)
    out = (ratio < low) | (ratio > high)
    return {
        "mismatch_abs_max": (ad * m).max(),
        "mismatch_abs_mean": masked_mean(ad, m),
        "mismatch_exact_frac": jnp.where(m.sum() > 0, masked_mean((delta == 0).astype(jnp.float32), m), 0.0),
        "mismatch_out_of_band": masked_mean(out.astype(jnp.float32), m),
    }


def routing_mismatch(rollout_experts: jax.Array, trainer_experts: jax.Array,
                     mask: jax.Array) -> dict:
    """Scalar metrics comparing expert ids ``[B, T, L_moe, K]`` of the rollout and of the
    trainer's unreplayed forward over the tokens in ``mask [B, T]`` (module doc). Positions where
    the rollout has no routing (ids ``< 0``, e.g. a sequence's last token) are not counted."""
    a = jnp.sort(rollout_experts.astype(jnp.int32), axis=-1)
    b = jnp.sort(trainer_experts.astype(jnp.int32), axis=-1)
    layer_diff = jnp.any(a != b, axis=-1)  # [B, T, L]
    known = jnp.all(rollout_experts >= 0, axis=(-1, -2))  # [B, T]
    m = ((mask > 0) & known).astype(jnp.float32)
    return {
        "routing_token_diff_frac": masked_mean(jnp.any(layer_diff, -1).astype(jnp.float32), m),
        "routing_layer_diff_frac": masked_mean(layer_diff.astype(jnp.float32).mean(-1), m),
    }
