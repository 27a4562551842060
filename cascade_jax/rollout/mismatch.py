"""Rollout/trainer log-prob mismatch of an engine: how far its sampling log-probs are from the
trainer's recomputation of the same tokens.

:func:`engine_mismatch` generates, packs and recomputes with :func:`cascade_jax.rl.token_logprobs`
(the number the update steps' importance ratios use), then reports
:func:`cascade_jax.rl.mismatch.logprob_mismatch` (the one definition of the metrics, the same
the train steps log): over response tokens ``t`` (``loss_mask = 1``),
``δ_t = log π_train(y_t | y_<t) − log π_rollout(y_t | y_<t)``, ``mismatch_abs_max = max_t |δ_t|``,
``mismatch_abs_mean``, ``mismatch_exact_frac`` (``δ_t == 0``), ``mismatch_out_of_band``. Zero
mismatch means strictly on-policy ratios of exactly 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from cascade_jax.rl.logprobs import token_logprobs
from cascade_jax.rl.mismatch import logprob_mismatch

from .packing import pack_rollouts
from .types import Request

__all__ = ["engine_mismatch"]


def engine_mismatch(engine, requests: Sequence[Request], *, layout: str = "padded",
                    seq_len: Optional[int] = None, params=None) -> dict:
    """Generate ``requests`` with ``engine`` (one shared temperature > 0), pack them, recompute
    with :func:`cascade_jax.rl.token_logprobs` at that temperature under ``params`` (default:
    the engine's own weights) and return the :func:`~cascade_jax.rl.mismatch.logprob_mismatch`
    metrics as floats plus ``"tokens"`` (response tokens compared) and ``"layout"``."""
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
    out = {k: float(v) for k, v in logprob_mismatch(lp, batch.rollout_logp, batch.loss_mask).items()}
    out["tokens"] = int((np.asarray(batch.loss_mask) > 0).sum())
    out["layout"] = layout
    return out
