"""Teacher-forced scoring: ``log π(response[t] | prompt, response[:t])`` at temperature ``τ``
(default 1): ``log softmax(z_t / τ)[response[t]]`` of the next-token logits ``z_t``.

Each pair ``(prompt, response)`` becomes the row ``prompt ++ response`` (padded layout: the row
starts at column 0, positions ``0..T-1``, segment id 1 on its tokens) and is scored by the
trainer's own function, :func:`cascade_jax.rl.logprobs.token_logprobs` (full forward, chunked
log-softmax; the kernel-invariant model's path for ``models.nemotron_h.invariant``), so a score
is by construction what the update steps compute for the same tokens. Pairs are sorted by
length and run in chunks of ``batch_size``, each padded to a power-of-two row count and a
power-of-two length (>= 16), so repeated calls reuse a handful of compiled programs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.contract import SFTBatch
from cascade_jax.rl.logprobs import token_logprobs, token_topk_logprobs
from models import nemotron_h

__all__ = ["score_logprobs", "TopKScores", "pow2_at_least"]


def pow2_at_least(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, int(n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("model_cfg", "model", "temperature", "topk"))
def _score_rows(params, tokens, segment_ids, model_cfg, model, temperature=1.0, topk=0):
    """``[B, T]`` log-probs of ``tokens [B, T]`` given their prefixes at ``temperature``,
    aligned with the tokens (:func:`~cascade_jax.rl.logprobs.token_logprobs`; column 0 and
    padding are 0); with ``topk > 0`` a tuple ``(logp, ids [B, T, topk], topk_logp [B, T,
    topk])`` (:func:`~cascade_jax.rl.logprobs.token_topk_logprobs`)."""
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    rows = SFTBatch(tokens=tokens, positions=pos, segment_ids=segment_ids,
                    loss_mask=jnp.zeros(tokens.shape, jnp.float32))
    if topk:  # one forward for both
        return token_topk_logprobs(params, rows, model_cfg, topk, temperature=temperature,
                                   model=model)
    return token_logprobs(params, rows, model_cfg, temperature=temperature, model=model)[0]


def score_logprobs(params, model_cfg, prompts: Sequence[Sequence[int]],
                   responses: Sequence[Sequence[int]], *, batch_size: int = 8,
                   model=None, temperature: float = 1.0, topk: int = 0) -> list:
    """For every pair a ``[len(response)]`` float32 array of teacher-forced log-probs under
    ``params`` at ``temperature`` ``τ > 0`` (module doc; a sampling contract's
    ``logprob_temperature``). ``ValueError`` naming the pair for an empty prompt or a token id
    outside the vocabulary, or for ``τ <= 0``.

    ``topk > 0``: every pair's entry is a :class:`TopKScores` instead: the log-probs and, at
    each response position, the ``topk`` most likely tokens of the distribution the response
    token was drawn from (``[len(response), topk]`` ids and log-probs, most likely first)."""
    if topk < 0 or topk > int(model_cfg.vocab_size):
        raise ValueError(f"topk: must be in [0, {int(model_cfg.vocab_size)}], got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 (a greedy contract scores at 1), got {temperature}")
    if model is None:
        model = nemotron_h
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    V = int(model_cfg.vocab_size)
    pairs = [([int(t) for t in p], [int(t) for t in r]) for p, r in zip(prompts, responses)]
    for i, (p, r) in enumerate(pairs):
        if not p:
            raise ValueError(f"prompts[{i}]: empty prompt")
        bad = [t for t in p + r if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompts[{i}]/responses[{i}]: token id {bad[0]} outside [0, {V})")
    out: list = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        T = max(16, pow2_at_least(max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx)))
        nb = pow2_at_least(len(idx))
        tokens = np.zeros((nb, T), np.int32)
        seg = np.zeros((nb, T), np.int32)
        for r, i in enumerate(idx):
            seq = pairs[i][0] + pairs[i][1]
            tokens[r, :len(seq)] = seq
            seg[r, :len(seq)] = 1
        got = _score_rows(params, tokens, seg, model_cfg, model,
                          temperature=float(temperature), topk=int(topk))
        lp, ids, top_lp = (got if topk else (got, None, None))
        lp = np.asarray(lp)  # [nb, T]
        ids = None if ids is None else np.asarray(ids)
        top_lp = None if top_lp is None else np.asarray(top_lp)
        for r, i in enumerate(idx):
            P, R = len(pairs[i][0]), len(pairs[i][1])
            out[i] = lp[r, P:P + R].astype(np.float32)
            if topk:
                out[i] = TopKScores(out[i], ids[r, P:P + R].astype(np.int32),
                                    top_lp[r, P:P + R].astype(np.float32))
    return out


class TopKScores(NamedTuple):
    """A response's teacher scores with its top-K distribution (:func:`score_logprobs`,
    ``topk > 0``): ``logp [R]`` of the response tokens, ``topk_ids [R, K]`` int32 and
    ``topk_logp [R, K]`` float32 — the K most likely tokens at each position and their
    log-probs, most likely first."""

    logp: np.ndarray
    topk_ids: np.ndarray
    topk_logp: np.ndarray
