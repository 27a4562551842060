"""The token sampler (one home) and a minimal fixed-batch generator built on it.

:func:`sample_tokens` draws one next token per row from next-token logits ``z [B, V]``:

* ``τ_b > 0``: ``y_b ~ softmax(z_b / τ_b)`` restricted to the top-k / top-p support (below);
  ``τ_b = 0``: greedy, ``y_b = argmax z_b`` (first index on ties).
* Support (SGLang's rule): sort ``p = softmax(z_b / τ_b)`` descending (stable, so ties keep
  vocabulary order); keep rank ``r`` iff ``r < k_b`` (``top_k = -1`` keeps all) and the mass of
  the tokens ranked before it is ``Σ_{r' < r} p_(r') <= top_p_b``. The top token is always kept.
* Draw: Gumbel-max over the vocabulary in its original order,
  ``y_b = argmax_v [z_b,v / τ_b + g_b,v]`` over the support, ``g_b = Gumbel(key_b) [V]``. The
  noise depends only on ``key_b`` and on vocabulary positions, so a row's token depends only on
  its own logits, key and settings — never on which other rows share the batch.
* Returned log-prob (SGLang's default): ``log softmax(z_b / τ_b)[y_b]``, *not* renormalised over
  the support; at ``τ_b = 0`` it is ``log softmax(z_b)[y_b]``.

:func:`sample` is the fixed-batch generator (no slot refill): prefill right-padded prompts
``[B, P]`` and decode ``max_new_tokens`` steps for every row with :func:`sample_tokens`. It is the
baseline the rollout engine is benchmarked against and the walk-through's sampler. Rows stop at
``eos_id`` (kept as the last response token); without ``eos_id`` every response has exactly
``max_new_tokens`` tokens and counts as finished (``FINISH_STOP``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from cascade_jax.contract.sampling import SamplingParams
from cascade_jax.rl.batch import FINISH_LENGTH, FINISH_STOP, RLBatch
from models import nemotron_h

__all__ = ["sample_tokens", "support_mask", "sample"]


def support_mask(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                 top_k: jax.Array) -> jax.Array:
    """``[B, V]`` bool: the top-k / top-p support of each row (module doc), in vocabulary
    order. ``temperature [B]`` (> 0 used; 0 is treated as 1), ``top_p [B]`` in (0, 1],
    ``top_k [B]`` int (``<= 0`` = off)."""
    B, V = logits.shape
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    z = logits.astype(jnp.float32) / t[:, None]
    order = jnp.argsort(-z, axis=-1, stable=True)  # [B, V] descending
    p_sorted = jax.nn.softmax(jnp.take_along_axis(z, order, -1), axis=-1)
    before = jnp.cumsum(p_sorted, -1) - p_sorted  # mass ranked before each token
    rank = jnp.arange(V, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, top_k, V).astype(jnp.int32)[:, None]
    keep_sorted = (rank < k) & (before <= top_p.astype(jnp.float32)[:, None])
    keep_sorted = keep_sorted.at[:, 0].set(True)
    rows = jnp.arange(B)[:, None]
    return jnp.zeros((B, V), bool).at[rows, order].set(keep_sorted)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array):
    """One token per row (module doc): ``logits [B, V]``, ``key [B]`` typed PRNG keys,
    ``temperature [B]`` (0 = greedy), ``top_p [B]``, ``top_k [B]`` (-1 = off) ->
    ``(ids [B] int32, logp [B] float32)``. Pure and jittable; the top-k / top-p sort runs only
    when some row needs it (the result does not depend on whether it ran)."""
    B, V = logits.shape
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature)
    z = logits.astype(jnp.float32) / t[:, None]
    logp_all = jax.nn.log_softmax(z, axis=-1)
    truncated = (~greedy) & ((top_p < 1.0) | ((top_k > 0) & (top_k < V)))
    keep = jax.lax.cond(jnp.any(truncated),
                        lambda: support_mask(logits, temperature, top_p, top_k) | ~truncated[:, None],
                        lambda: jnp.ones((B, V), bool))
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(key)
    drawn = jnp.argmax(jnp.where(keep, z + gumbel, -jnp.inf), axis=-1)
    ids = jnp.where(greedy, jnp.argmax(z, axis=-1), drawn).astype(jnp.int32)
    logp = jnp.take_along_axis(logp_all, ids[:, None], -1)[:, 0]
    return ids, logp


def _row_keys(rng: jax.Array, B: int) -> jax.Array:
    """``[B]`` keys ``fold_in(rng, b)``; step ``t`` of row ``b`` uses ``fold_in(key_b, t)``."""
    return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(B))


def sample(params, prompts: jax.Array, cfg, *, rng: jax.Array, max_new_tokens: int,
           prompt_lengths: Optional[jax.Array] = None, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = -1, eos_id: Optional[int] = None,
           group_ids=None, model=None):
    """Sample responses with a fixed batch; returns ``(batch, responses)``.

    ``batch`` is an :class:`RLBatch` in the padded layout, ``[B, P + max_new_tokens]``: prompt
    then response then padding, ``loss_mask`` on the response tokens, ``rollout_logp`` aligned
    with the tokens (:func:`sample_tokens` semantics: ``log softmax(z / τ)[y]``; ``temperature
    = 0`` is greedy and its log-probs are those of the unscaled logits), ``finish_reason``,
    ``sampling`` the contract it was drawn with (``SamplingParams(max_new_tokens, temperature,
    top_p, top_k, stop_token_ids=(eos_id,) or ())``); ``rewards`` are zeros (score
    ``responses`` and ``batch.replace(rewards=...)``), ``group_ids`` default to ``arange(B)``,
    ``domain_ids`` to zeros, ``teacher_logp`` is ``None`` (MOPD fills it). ``responses`` is
    ``[B, max_new_tokens]`` int32: tokens after EOS are set to ``eos_id``. Row ``b`` at step
    ``t`` draws with key ``fold_in(fold_in(rng, b), t)``.
    """
    contract = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, stop_token_ids=() if eos_id is None else (int(eos_id),))
    batch, toks = _sample(params, prompts, cfg, rng=rng, max_new_tokens=max_new_tokens,
                          prompt_lengths=prompt_lengths, temperature=temperature, top_p=top_p,
                          top_k=top_k, eos_id=eos_id, group_ids=group_ids, model=model)
    return batch.replace(sampling=contract), toks


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id",
                                             "model"))
def _sample(params, prompts, cfg, *, rng, max_new_tokens, prompt_lengths, temperature, top_p,
            top_k, eos_id, group_ids, model):
    """:func:`sample`'s jitted body (its batch without ``sampling``)."""
    if model is None:
        model = nemotron_h
    B, P = prompts.shape
    M = max_new_tokens
    lengths = (jnp.full((B,), P, jnp.int32) if prompt_lengths is None
               else jnp.asarray(prompt_lengths, jnp.int32))
    last, cache = model.prefill(params, prompts, cfg, lengths=lengths, max_len=P + M,
                                last_only=True)  # [B, V] next-token logits
    temps = jnp.full((B,), temperature, jnp.float32)
    top_ps = jnp.full((B,), top_p, jnp.float32)
    top_ks = jnp.full((B,), top_k, jnp.int32)
    row_keys = _row_keys(rng, B)

    def step(carry, t):
        cache, z, pos, done = carry
        keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
        tok, lp = sample_tokens(z, keys, temps, top_ps, top_ks)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
        alive = ~done
        if eos_id is not None:
            done = done | (tok == eos_id)
        z_next, cache = model.decode_step(params, cache, tok, pos, cfg)
        return (cache, z_next, pos + 1, done), (tok, lp, alive)

    init = (cache, last, lengths, jnp.zeros((B,), bool))
    (_, _, _, done), (toks, lps, alive) = jax.lax.scan(step, init, jnp.arange(M))
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
        finish_reason=finish, domain_ids=jnp.zeros((B,), jnp.int32), teacher_logp=None)
    return batch, toks
