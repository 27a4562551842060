"""Expert-load statistics of a train step, from the routed experts of its forward pass.

``expert_ids [B, T, L_moe, K]`` (the top-k experts each token used in each MoE layer, as
``return_routed_experts`` gives them) and the step's loss mask ``mask [B, T]`` (only tokens with
``mask > 0`` count) give per-layer counts ``c[l, e] = #{(b, t, j) : mask[b, t] > 0,
expert_ids[b, t, l, j] = e}`` (:func:`expert_counts`; summed over micro-batches). With
``μ_l = Σ_e c[l, e] / E`` (the mean expert load) the metrics (:func:`load_metrics`) are::

    moe/load_max_over_mean        = mean_l  max_e c[l, e] / μ_l      (1 = perfectly balanced, E = all on one)
    moe/load_max_over_mean_worst  = max_l   max_e c[l, e] / μ_l
    moe/load_cv                   = mean_l  std_e c[l, e] / μ_l      (population std)
    moe/dead_experts              = mean_l  #{e : c[l, e] = 0} / E

Layers without any valid token (``μ_l = 0``, e.g. a fully filtered batch) are left out of the
means; with none at all every metric is 0. Cost: one scatter-add of ``B·T·L_moe·K`` ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["COUNTS_KEY", "expert_counts", "load_metrics"]

#: the metrics entry carrying ``c [L_moe, E]`` from the micro-batch loss to the step (summed)
COUNTS_KEY = "moe_expert_counts"


def expert_counts(expert_ids: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
    """``expert_ids [..., L, K]`` int, ``mask [...]`` -> ``c [L, E]`` float32 (see module doc)."""
    *lead, n_layers, k = expert_ids.shape
    ids = expert_ids.reshape(-1, n_layers, k).astype(jnp.int32)
    valid = (mask.reshape(-1) > 0).astype(jnp.float32)
    flat = (jnp.arange(n_layers, dtype=jnp.int32)[None, :, None] * num_experts + ids).reshape(-1)
    weight = jnp.broadcast_to(valid[:, None, None], ids.shape).reshape(-1)
    return jnp.zeros((n_layers * num_experts,), jnp.float32).at[flat].add(weight).reshape(n_layers, num_experts)


def load_metrics(counts: jax.Array) -> dict:
    """``c [L, E]`` -> the scalar ``moe/*`` metrics (module doc)."""
    n_exp = counts.shape[-1]
    total = counts.sum(-1)
    live = total > 0
    mean = jnp.where(live, total / n_exp, 1.0)
    max_over_mean = counts.max(-1) / mean
    cv = jnp.sqrt(jnp.mean((counts - mean[:, None]) ** 2, axis=-1)) / mean
    dead = jnp.mean((counts == 0).astype(jnp.float32), axis=-1)
    n_live = jnp.maximum(live.sum(), 1)
    avg = lambda v: jnp.sum(jnp.where(live, v, 0.0)) / n_live
    return {
        "moe/load_max_over_mean": avg(max_over_mean),
        "moe/load_max_over_mean_worst": jnp.max(jnp.where(live, max_over_mean, 0.0)),
        "moe/load_cv": avg(cv),
        "moe/dead_experts": avg(dead),
    }
