"""Group-relative advantages for GRPO (docs/algorithms.md §5).

For response ``i`` in group ``g(i)`` (the responses sampled for one prompt), with the group's
population statistics (ddof 0) over its members ``G_i``::

    mean_g = (1/|G|) Σ_{j∈G} r_j          std_g = sqrt((1/|G|) Σ_{j∈G} (r_j − mean_g)²)
    Â_i    = (r_i − mean_g) / (std_g + ε)                          (paper, default; ε = 1e-6)
    Â_i    = (r_i − mean_{g∖i}) / (std_g + ε),  mean_{g∖i} = (Σ_G r_j − r_i)/(|G| − 1)
                                                                   (leave-one-out option)

A group whose rewards are all equal (including a group of one) gets Â = 0 exactly. Groups may
have different sizes (aborted samples are dropped); they are given by ids, so no reshape to
``[num_prompts, G]`` is needed. Cost is an ``[N, N]`` comparison (N = 2,048 per step).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from .batch import FINISH_ABORT, FINISH_LENGTH
from .is_correction import masked_mean

__all__ = ["flat_groups", "group_advantages", "group_stats", "grpo_advantages"]


def _group_ids(groups, n: int) -> jax.Array:
    if isinstance(groups, int):
        if n % groups:
            raise ValueError(f"group size {groups} does not divide the number of rewards {n}")
        return jnp.arange(n, dtype=jnp.int32) // groups
    ids = jnp.asarray(groups)
    if ids.shape != (n,):
        raise ValueError(f"group ids must have shape [{n}], got {ids.shape}")
    return ids


def group_stats(rewards: jax.Array, groups: Union[int, jax.Array],
                valid: Optional[jax.Array] = None) -> dict:
    """Per-response statistics of its group, each ``[N]``: ``mean``, ``std`` (ddof 0),
    ``count``, ``sum``, ``all_equal`` (bool: every valid member has the same reward).
    ``valid`` ``[N]`` bool excludes responses from every group (their own stats are still
    those of their group's valid members)."""
    r = jnp.asarray(rewards, jnp.float32)
    n = r.shape[0]
    ids = _group_ids(groups, n)
    same = ids[:, None] == ids[None, :]  # [N, N]
    if valid is not None:
        same = same & jnp.asarray(valid, bool)[None, :]
    w = same.astype(jnp.float32)
    count = w.sum(1)
    total = w @ r
    mean = total / jnp.maximum(count, 1.0)
    dev = r[None, :] - mean[:, None]
    var = (w * dev * dev).sum(1) / jnp.maximum(count, 1.0)
    hi = jnp.where(same, r[None, :], -jnp.inf).max(1)
    lo = jnp.where(same, r[None, :], jnp.inf).min(1)
    all_equal = (hi <= lo) | (count <= 1)
    return dict(mean=mean, std=jnp.sqrt(var), count=count, sum=total, all_equal=all_equal)


def flat_groups(rewards: jax.Array, groups: Union[int, jax.Array],
                valid: Optional[jax.Array] = None) -> jax.Array:
    """``[N]`` bool: the response's group has no reward variance (every valid member has the
    same reward, or it has at most one; :func:`group_stats`'s ``all_equal``). The dynamic
    filter's one rule: the train step drops these responses from the loss
    (:func:`grpo_advantages`) and the runner draws more prompts in place of such groups."""
    return group_stats(rewards, groups, valid)["all_equal"]


def group_advantages(rewards: jax.Array, groups: Union[int, jax.Array], *,
                     leave_one_out: bool = False, eps: float = 1e-6,
                     valid: Optional[jax.Array] = None) -> jax.Array:
    """``[N]`` float32 advantages ``(r − mean_g) / (std_g + eps)`` (see module docstring).

    Args:
      rewards: ``[N]`` rewards.
      groups: group size ``G`` (responses ``[kG, (k+1)G)`` form group k) or ``[N]`` int ids.
      leave_one_out: baseline is the mean of the *other* members of the group.
      valid: optional ``[N]`` bool; invalid responses are left out of every statistic and
        get advantage 0.
    """
    r = jnp.asarray(rewards, jnp.float32)
    return _advantages(r, group_stats(r, groups, valid), leave_one_out, eps, valid)


def _advantages(r, s, leave_one_out, eps, valid):
    if leave_one_out:
        baseline = (s["sum"] - r) / jnp.maximum(s["count"] - 1.0, 1.0)
    else:
        baseline = s["mean"]
    adv = (r - baseline) / (s["std"] + eps)
    zero = s["all_equal"]
    if valid is not None:
        zero = zero | ~jnp.asarray(valid, bool)
    return jnp.where(zero, 0.0, adv)


def grpo_advantages(rewards: jax.Array, group_ids: jax.Array, finish_reason: jax.Array, *,
                    leave_one_out: bool = False, overlong_filtering: bool = False,
                    dynamic_filtering: bool = False, truncated_reward: float = 0.0,
                    eps: float = 1e-6):
    """GRPO's per-sequence advantages and keep-mask, with the stage's filtering rules.

    * overlong filtering **off** ("overlong penalty"): truncated responses
      (``finish_reason == FINISH_LENGTH``) get reward ``truncated_reward`` (0) and are trained on.
    * overlong filtering **on**: truncated responses keep their reward and enter the group
      statistics, and are then dropped from the loss (``keep = 0``) — *after* the statistics.
    * dynamic filtering: responses in all-equal groups are dropped from the loss (their
      advantage is 0 anyway; dropping them also removes their tokens from the denominator).
    * aborted responses are excluded from the statistics and from the loss.

    Returns ``(advantages [N] f32, keep [N] f32, metrics)``.
    """
    r = jnp.asarray(rewards, jnp.float32)
    fr = jnp.asarray(finish_reason)
    truncated = fr == FINISH_LENGTH
    valid = fr != FINISH_ABORT
    if not overlong_filtering:
        r = jnp.where(truncated, jnp.float32(truncated_reward), r)
    stats = group_stats(r, group_ids, valid)
    adv = _advantages(r, stats, leave_one_out, eps, valid)
    keep = valid
    if overlong_filtering:
        keep = keep & ~truncated
    if dynamic_filtering:  # flat_groups(r, group_ids, valid)
        keep = keep & ~stats["all_equal"]
    keep = keep.astype(jnp.float32)
    n_valid = jnp.maximum(valid.sum(), 1)
    metrics = {
        "reward_mean": masked_mean(r, valid),
        "adv_mean": masked_mean(adv, keep),
        "adv_abs_mean": masked_mean(jnp.abs(adv), keep),
        "adv_max": jnp.where(keep.sum() > 0, jnp.where(keep > 0, adv, -jnp.inf).max(), 0.0),
        "adv_min": jnp.where(keep.sum() > 0, jnp.where(keep > 0, adv, jnp.inf).min(), 0.0),
        "frac_all_equal_groups": (stats["all_equal"] & valid).sum() / n_valid,
        "frac_truncated": (truncated & valid).sum() / n_valid,
        "frac_kept": keep.sum() / r.shape[0],
    }
    return adv, keep, metrics
