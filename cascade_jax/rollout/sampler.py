"""The token sampler: the one rule every decode loop (the rollout engines) draws a token with.

:func:`sample_tokens` draws one next token per row from next-token logits ``z [B, V]``:

* ``τ_b > 0``: ``y_b ~ softmax(z_b / τ_b)`` restricted to the top-k / top-p support (below);
  ``τ_b = 0``: greedy, ``y_b = argmax z_b`` (first index on ties).
* Support (SGLang's rule, :func:`support_mask`): sort ``p = softmax(z_b / τ_b)`` descending
  (stable, so ties keep vocabulary order); keep rank ``r`` iff ``r < k_b`` (``top_k = -1``
  keeps all) and the mass of the tokens ranked before it is ``Σ_{r' < r} p_(r') <= top_p_b``.
  The top token is always kept.
* Draw: Gumbel-max over the vocabulary in its original order,
  ``y_b = argmax_v [z_b,v / τ_b + g_b,v]`` over the support, ``g_b = Gumbel(key_b) [V]``. The
  noise depends only on ``key_b`` and on vocabulary positions, so a row's token depends only on
  its own logits, key and settings — never on which other rows share the batch.
* Returned log-prob (SGLang's default): ``log softmax(z_b / τ_b)[y_b]``, *not* renormalised over
  the support; at ``τ_b = 0`` it is ``log softmax(z_b)[y_b]``.

Generation itself (prefill, decode, stop and length) is the rollout engine's
(:class:`cascade_jax.rollout.engine.JaxEngine`); a fixed list of prompts becomes an
:class:`~cascade_jax.contract.RLBatch` by ``engine.generate`` and
:func:`cascade_jax.rollout.packing.pack_rollouts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sample_tokens", "support_mask"]


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
