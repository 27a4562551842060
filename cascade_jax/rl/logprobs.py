"""Per-token log-probs of the sampled tokens, chunked over the vocabulary.

For hidden states ``h_t`` (final-normed, ``[B, T, H]``) and ``W = lm_head`` ``[H, V]``::

    z_t   = (h_{t−1} · W) / τ                     (logits predicting token t, temperature τ)
    lp_t  = z_t[y_t] − logsumexp(z_t)
    ent_t = logsumexp(z_t) − Σ_v softmax(z_t)_v z_t,v       (for logging; no gradient)

The vocabulary is processed in chunks of ``vocab_chunk`` columns with a streaming
logsumexp in fp32 (running max ``m``, ``s = Σ e^{z−m}``, ``u = Σ e^{z−m} z``), so at most one
``[B, T, vocab_chunk]`` fp32 block is live; the loop body is rematerialised so the backward
pass does not store the per-chunk logits either.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .batch import sequence_index
from .losses import segment_start_mask

__all__ = ["chunked_logprobs", "token_logprobs", "routed_logprobs", "DEFAULT_VOCAB_CHUNK"]

DEFAULT_VOCAB_CHUNK = 8192
sg = jax.lax.stop_gradient


def chunked_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *,
                     temperature: float = 1.0, vocab_chunk: int = DEFAULT_VOCAB_CHUNK):
    """``(logp, entropy)``, each ``[B, T]`` float32, of ``targets [B, T]`` under the logits
    ``hidden [B, T, H] @ lm_head [H, V] / temperature`` (matmul in the inputs' dtype with fp32
    accumulation), without materialising ``[B, T, V]``. Gradients flow into ``hidden`` and
    ``lm_head`` through ``logp`` only."""
    H, V = lm_head.shape
    C = int(min(vocab_chunk, V))
    n = -(-V // C)
    if n * C != V:  # pad the vocab; padded columns are masked to −inf below
        lm_head = jnp.pad(lm_head, ((0, 0), (0, n * C - V)))
    w_chunks = lm_head.reshape(H, n, C).transpose(1, 0, 2)  # [n, H, C]
    starts = jnp.arange(n, dtype=jnp.int32) * C
    inv_t = 1.0 / float(temperature)
    targets = targets.astype(jnp.int32)
    B, T = targets.shape

    @jax.checkpoint
    def body(carry, xs):
        m, s, u, picked = carry
        w_c, c0 = xs
        z = jnp.einsum("bth,hc->btc", hidden, w_c, preferred_element_type=jnp.float32) * inv_t
        valid = (c0 + jnp.arange(C)) < V
        z = jnp.where(valid, z, -jnp.inf)
        m_new = jnp.maximum(m, sg(z).max(-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        s = s * scale + e.sum(-1)
        u = u * scale + sg(jnp.where(valid, e * z, 0.0)).sum(-1)
        local = targets - c0
        inside = (local >= 0) & (local < C)
        z_t = jnp.take_along_axis(z, jnp.clip(local, 0, C - 1)[..., None], -1)[..., 0]
        picked = picked + jnp.where(inside, z_t, 0.0)
        return (m_new, s, u, picked), None

    init = (jnp.full((B, T), -jnp.inf, jnp.float32), jnp.zeros((B, T), jnp.float32),
            jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), jnp.float32))
    (m, s, u, picked), _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = m + jnp.log(s)
    logp = picked - lse
    entropy = sg(lse - u / s)
    return logp, entropy


def token_logprobs(params, batch, cfg, *, temperature: float = 1.0,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None):
    """``(logp, entropy)`` ``[B, T]`` float32 of ``batch.tokens`` under the policy ``params``.

    ``logp[b, t] = log π(tokens[b, t] | tokens[b, <t])`` at temperature ``τ`` (aligned with the
    tokens; 0 where there is no prefix in the same segment: ``t = 0``, segment starts,
    padding). ``batch`` is anything with ``tokens``, ``positions``, ``segment_ids``
    (:class:`RLBatch`, :class:`SFTBatch`). ``model`` is the module providing
    ``hidden_states(params, tokens, cfg, *, positions, segment_ids)`` (default: NemotronH).
    """
    if model is None:
        from models import nemotron_h as model
    h = model.hidden_states(params, batch.tokens, cfg, positions=batch.positions,
                            segment_ids=batch.segment_ids)
    lp, ent = chunked_logprobs(h[:, :-1], params["lm_head"], batch.tokens[:, 1:],
                               temperature=temperature, vocab_chunk=vocab_chunk)
    lp = jnp.pad(lp, ((0, 0), (1, 0)))
    ent = jnp.pad(ent, ((0, 0), (1, 0)))
    valid = segment_start_mask(batch.segment_ids)
    return lp * valid, ent * valid


def routed_logprobs(teacher_params: Sequence, teacher_of_domain, batch, cfg, *,
                    temperature: float = 1.0, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                    model=None) -> jax.Array:
    """MOPD teacher log-probs ``[B, T]``: each sequence scored by the teacher of its domain,
    ``teacher_of_domain[batch.domain_ids[n]]`` (an int array indexing ``teacher_params``).
    All teachers share the student's tokenizer and ``cfg`` here (a list of configs can be
    added when teachers differ in architecture)."""
    route = jnp.asarray(teacher_of_domain, jnp.int32)[batch.domain_ids]  # [N]
    tok_route = route[sequence_index(batch)]  # [B, T]
    out = jnp.zeros(batch.tokens.shape, jnp.float32)
    for k, p in enumerate(teacher_params):
        lp, _ = token_logprobs(p, batch, cfg, temperature=temperature, vocab_chunk=vocab_chunk,
                               model=model)
        out = jnp.where(tok_route == k, lp, out)
    return sg(out)
