"""A minimal batched sampler over the model's ``prefill`` / ``decode_step`` (for tests and the
walk-through; the rollout engine replaces it).

Prompts are right-padded ``[B, P]`` with ``prompt_lengths [B]``. Each step samples
``y ~ softmax(z / τ)`` (or ``argmax z`` when ``greedy``) from the current next-token logits and
records ``log softmax(z / τ)[y]`` — the rollout log-prob the trainer's IS correction compares
against. Rows stop at ``eos_id`` (the EOS token is part of the response); without ``eos_id``
every response has exactly ``max_new_tokens`` tokens and counts as finished (``FINISH_STOP``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from .batch import FINISH_LENGTH, FINISH_STOP, RLBatch

__all__ = ["sample"]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id",
                                             "greedy", "model"))
def sample(params, prompts: jax.Array, cfg, *, rng: jax.Array, max_new_tokens: int,
           prompt_lengths: Optional[jax.Array] = None, temperature: float = 1.0,
           eos_id: Optional[int] = None, greedy: bool = False, group_ids=None, model=None):
    """Sample responses; returns ``(batch, responses)``.

    ``batch`` is an :class:`RLBatch` in the padded layout, ``[B, P + max_new_tokens]``: prompt
    then response then padding, ``loss_mask`` on the response tokens, ``rollout_logp`` aligned
    with the tokens, ``finish_reason``; ``rewards`` are zeros (score ``responses`` and
    ``batch.replace(rewards=...)``), ``group_ids`` default to ``arange(B)``, ``domain_ids``
    to zeros. ``responses`` is ``[B, max_new_tokens]`` int32 with ``resp_mask`` semantics:
    tokens after EOS are set to ``eos_id``.
    """
    if model is None:
        from models import nemotron_h as model
    B, P = prompts.shape
    M = max_new_tokens
    lengths = (jnp.full((B,), P, jnp.int32) if prompt_lengths is None
               else jnp.asarray(prompt_lengths, jnp.int32))
    last, cache = model.prefill(params, prompts, cfg, lengths=lengths, max_len=P + M,
                                last_only=True)  # [B, V] next-token logits

    def step(carry, key):
        cache, z, pos, done = carry
        z = z.astype(jnp.float32) / temperature
        logp_all = jax.nn.log_softmax(z, axis=-1)
        tok = jnp.argmax(z, -1) if greedy else jax.random.categorical(key, z, axis=-1)
        tok = tok.astype(jnp.int32)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
        lp = jnp.take_along_axis(logp_all, tok[:, None], -1)[:, 0]
        alive = ~done
        if eos_id is not None:
            done = done | (tok == eos_id)
        z_next, cache = model.decode_step(params, cache, tok, pos, cfg)
        return (cache, z_next, pos + 1, done), (tok, lp, alive)

    keys = jax.random.split(rng, M)
    init = (cache, last, lengths, jnp.zeros((B,), bool))
    (_, _, _, done), (toks, lps, alive) = jax.lax.scan(step, init, keys)
    toks, lps, alive = toks.T, lps.T, alive.T  # [B, M]

    T = P + M
    cols = lengths[:, None] + jnp.arange(M)[None, :]  # [B, M] absolute positions
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, M))
    pmask = jnp.arange(P)[None, :] < lengths[:, None]
    tokens = jnp.zeros((B, T), jnp.int32).at[:, :P].set(jnp.where(pmask, prompts, 0))
    tokens = tokens.at[rows, cols].set(toks)
    am = alive.astype(jnp.float32)
    loss_mask = jnp.zeros((B, T), jnp.float32).at[rows, cols].set(am)
    rollout_logp = jnp.zeros((B, T), jnp.float32).at[rows, cols].set(lps * am)
    total = lengths + alive.sum(-1).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segment_ids = (pos < total[:, None]).astype(jnp.int32)
    if eos_id is None:
        finish = jnp.full((B,), FINISH_STOP, jnp.int32)
    else:
        finish = jnp.where(done, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    batch = RLBatch(
        tokens=tokens, positions=pos, segment_ids=segment_ids, loss_mask=loss_mask,
        rollout_logp=rollout_logp, rewards=jnp.zeros((B,), jnp.float32),
        group_ids=jnp.arange(B, dtype=jnp.int32) if group_ids is None else jnp.asarray(group_ids, jnp.int32),
        finish_reason=finish, domain_ids=jnp.zeros((B,), jnp.int32),
        teacher_logp=jnp.zeros((B, T), jnp.float32))
    return batch, toks
