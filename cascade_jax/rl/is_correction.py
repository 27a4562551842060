"""Train/inference mismatch correction (docs/algorithms.md §7).

With ``δ_t = lp_train(y_t) − lp_rollout(y_t)`` (the trainer's recomputed log-prob minus the
inference engine's) and ``r_t = exp(δ_t)``, the stop-gradient per-token weights are::

    "none"    w_t = 1
    "tis"     w_t = min(r_t, C)                        (truncated IS; C = 2 by default)
    "icepop"  w_t = r_t · 1[lo ≤ r_t ≤ hi]             (hard mask, *not* a clamp)

Metrics (over ``mask`` tokens): mean and p99 and max of |δ|, fraction of tokens clipped
(TIS: r > C) or masked (icepop: r outside [lo, hi]), mean weight, and the mean over rows of
Σ_t δ_t (per sequence in the padded layout).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["is_weights", "masked_quantile", "masked_mean"]

ISMode = Literal["none", "tis", "icepop"]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ mask·x / max(Σ mask, 1)``."""
    m = mask.astype(jnp.float32)
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def masked_quantile(x: jax.Array, mask: jax.Array, q: float) -> jax.Array:
    """The ``q`` quantile (linear interpolation, as ``numpy.quantile``) of ``x[mask]``;
    0 when the mask is empty. Sorts ``x.size`` values."""
    v = jnp.where(mask > 0, x, -jnp.inf).ravel().astype(jnp.float32)
    m = v.shape[0]
    n = (mask > 0).sum()
    s = jnp.sort(v)  # valid values occupy the last n slots
    pos = q * (jnp.maximum(n, 1) - 1).astype(jnp.float32)
    lo = jnp.floor(pos)
    frac = pos - lo
    i0 = (m - n + lo.astype(jnp.int32)).clip(0, m - 1)
    i1 = jnp.minimum(i0 + 1, m - 1)
    val = s[i0] + frac * (s[i1] - s[i0])
    val = jnp.where(frac > 0, val, s[i0])  # avoid inf·0 when i1 is past the end
    return jnp.where(n > 0, val, 0.0)


def is_weights(train_logp: jax.Array, rollout_logp: jax.Array, mask: jax.Array, *,
               mode: ISMode = "tis", cap: float = 2.0, low: float = 0.5, high: float = 2.0):
    """Stop-gradient IS weights ``w [B, T]`` and metrics (see module docstring).

    ``train_logp`` is detached here; ``mask`` ``[B, T]`` selects the tokens that count.
    Returns ``(w, metrics)``; ``w`` is 0 off the mask.
    """
    m = mask.astype(jnp.float32)
    delta = jax.lax.stop_gradient(train_logp).astype(jnp.float32) - rollout_logp.astype(jnp.float32)
    delta = jnp.where(m > 0, delta, 0.0)
    ratio = jnp.exp(delta)
    if mode == "none":
        w = jnp.ones_like(ratio)
        hit = jnp.zeros_like(ratio, dtype=bool)
    elif mode == "tis":
        w = jnp.minimum(ratio, cap)
        hit = ratio > cap
    elif mode == "icepop":
        inside = (ratio >= low) & (ratio <= high)
        w = jnp.where(inside, ratio, 0.0)
        hit = ~inside
    else:
        raise ValueError(f"unknown IS correction {mode!r}; valid: none, tis, icepop")
    w = w * m
    ad = jnp.abs(delta)
    metrics = {
        "is_abs_delta_mean": masked_mean(ad, m),
        "is_abs_delta_p99": masked_quantile(ad, m, 0.99),
        "is_abs_delta_max": (ad * m).max(),
        "is_frac_corrected": masked_mean(hit.astype(jnp.float32), m),
        "is_weight_mean": masked_mean(w, m),
        "is_seq_delta_mean": (delta.sum(-1)).sum() / jnp.maximum((m.sum(-1) > 0).sum(), 1),
    }
    return w, metrics
