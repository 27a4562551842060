"""Rollout/trainer log-prob mismatch: how far the engine's sampling log-probs are from the
trainer's recomputation of the same tokens.

For response tokens ``t`` (``loss_mask = 1``)::

    δ_t = log π_train(y_t | y_<t) − log π_rollout(y_t | y_<t)
    max_abs = max_t |δ_t|,   mean_abs = mean_t |δ_t|

``π_train`` is :func:`cascade_jax.rl.token_logprobs` on the packed batch (the number the update
steps' importance ratios use), ``π_rollout`` the engine's ``Sample.logprobs``. Zero mismatch
means strictly on-policy ratios of exactly 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from .packing import pack_rollouts
from .types import Request

__all__ = ["logprob_mismatch", "engine_mismatch"]


def logprob_mismatch(rollout_logp, trainer_logp, mask) -> dict:
    """``{"max_abs", "mean_abs", "tokens"}`` of ``|trainer_logp − rollout_logp|`` over
    ``mask`` (any matching shapes, e.g. ``[B, T]``)."""
    m = np.asarray(mask, np.float32) > 0
    d = np.abs(np.asarray(trainer_logp, np.float64) - np.asarray(rollout_logp, np.float64))[m]
    if d.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "tokens": 0}
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "tokens": int(d.size)}


def engine_mismatch(engine, requests: Sequence[Request], *, layout: str = "padded",
                    seq_len: Optional[int] = None, params=None) -> dict:
    """Generate ``requests`` with ``engine`` (one shared temperature > 0), pack them, recompute
    with :func:`cascade_jax.rl.token_logprobs` at that temperature under ``params`` (default:
    the engine's own weights) and return :func:`logprob_mismatch` plus ``"layout"``."""
    from cascade_jax.rl.logprobs import token_logprobs

    temps = {r.sampling.temperature for r in requests}
    if len(temps) != 1 or next(iter(temps)) <= 0:
        raise ValueError(f"requests: need one shared temperature > 0, got {sorted(temps)}")
    tau = float(next(iter(temps)))
    rollouts = engine.generate(requests)
    batch = pack_rollouts(rollouts, np.zeros(len(rollouts.samples())), layout=layout,
                          seq_len=seq_len)
    params = engine.params() if params is None else params
    lp = jax.jit(lambda p, b: token_logprobs(p, b, engine.model_cfg, temperature=tau,
                                             model=engine.model)[0])(params, batch)
    out = logprob_mismatch(batch.rollout_logp, lp, batch.loss_mask)
    out["layout"] = layout
    return out
