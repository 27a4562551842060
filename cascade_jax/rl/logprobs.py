"""Per-token log-probs of the sampled tokens, chunked over the vocabulary.

For hidden states ``h_t`` (final-normed, ``[B, T, H]``) and ``W = lm_head`` ``[H, V]``::

    z_t   = (h_{t−1} · W) / τ                     (logits predicting token t, temperature τ)
    lp_t  = z_t[y_t] − logsumexp(z_t)
    ent_t = logsumexp(z_t) − Σ_v softmax(z_t)_v z_t,v       (for logging; no gradient)

The vocabulary is processed in chunks of ``vocab_chunk`` columns with a streaming
logsumexp in fp32 (running max ``m``, ``s = Σ e^{z−m}``, ``u = Σ e^{z−m} z``), so at most one
``[B, T, vocab_chunk]`` fp32 block is live; the loop body is rematerialised so the backward
pass does not store the per-chunk logits either.

Batch-invariant mode (``row_len``), the trainer side of zero-mismatch rollouts: XLA chooses
matmul and reduction strategies by operand shape (on CPU a row's logits change in the last bits
between batch sizes, between ``jit`` and ``grad`` programs of the same batched shape, and
between row lengths), so with ``row_len`` set every row is computed on its own at the fixed
shape ``[1, row_len]`` (a ``lax.map`` over rows) and its log-probs depend only on its own tokens.
:func:`next_token_logprobs` is the sampler side: the same row function at the same shape,
returning the whole next-token distribution ``z_t − logsumexp(z_t)`` at each row's end, so the
log-prob a token is sampled with equals the one :func:`token_logprobs` recomputes, bit for bit.
Causality makes the prefix's numbers independent of what follows it at a fixed shape (masked
terms are exact zeros), so the sampler's partly filled row and the trainer's full one agree.

Why a custom VJP (the trainer side under ``value_and_grad``): the same row function, compiled
once as a plain forward and once inside a gradient program, did not give the same bits. In the
gradient program the forward's intermediates also feed the backward (saved residuals), which
changes how XLA fuses the forward; with ``xla_allow_excess_precision`` (on by default) XLA drops
``f32 -> bf16 -> f32`` convert pairs inside fusions, so which bf16 roundings happen depends on
the fusion: bf16 rows of 64+ tokens were off on every token by 1e-3 to 5e-3 (the MoE layer is
the first whose output differs; with the flag off both programs agree), and fp32 rows moved in
the last bit on some tokens (a fusion-dependent order, not the flag). :func:`_exact_rows` therefore returns the value of a forward-only
computation of the rows (its only residuals are its inputs, so XLA compiles the same forward as
the sampler's) and its backward recomputes the rows with their VJP behind an
``optimization_barrier`` (so the two forwards cannot be merged): the log-probs the loss, the
importance ratios and the ``mismatch_*`` metrics see are the sampler's, bit for bit, at the
price of one extra forward of the rows per step. The rows run without the mesh's activation
hooks (``use_partitioner(None)``), the sampler's single-device program, also in a sharded step.

Kernel-invariant mode (``model=models.nemotron_h.invariant``, the trainer side of
:class:`cascade_jax.rollout.exact.ExactEngine`): the model's kernels themselves compute each
token independently of the batch, the row length and the program (fixed-shape GEMM tiles,
fixed key blocks, the per-step Mamba recurrence, grouped tiled experts, explicit bf16 rounding;
:mod:`models.nemotron_h.invariant`), and the logits product is the same tiled GEMM
(``head_dot``), so no per-row map and no ``row_len`` are needed: any batch of padded rows gives
the cached-decode engine's numbers. :func:`_invariant_rows` returns them as the value of a
forward-only computation and takes its gradient from the default model's log-probs of the same
rows (equal up to rounding), so the step costs the default step plus one invariant forward.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from models import nemotron_h
from models.nemotron_h import invariant
from models.nemotron_h.partitioning import use_partitioner

from .losses import segment_start_mask

__all__ = ["chunked_logprobs", "chunked_topk_logprobs", "token_logprobs", "token_topk_logprobs",
           "next_token_logprobs",
           "invariant_next_logprobs",
           "inverse_temperature",
           "DEFAULT_VOCAB_CHUNK"]

DEFAULT_VOCAB_CHUNK = 8192
sg = jax.lax.stop_gradient


def chunked_logprobs(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, *,
                     temperature: float = 1.0, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                     fixed_order: bool = False, head_dot=None, extra_ids=None):
    """``(logp, entropy)``, each ``[B, T]`` float32, of ``targets [B, T]`` under the logits
    ``hidden [B, T, H] @ lm_head [H, V] / temperature`` (matmul in the inputs' dtype with fp32
    accumulation), without materialising ``[B, T, V]``. Gradients flow into ``hidden`` and
    ``lm_head`` through ``logp`` only. ``fixed_order``: vocabulary sums in a written-out order
    (:func:`_tree_sum`), the same in every program (batch-invariant mode).

    ``extra_ids [B, T, K]`` (int, in ``[0, V)``): also ``extra_logp [B, T, K]``, the
    log-probs ``z_t[extra_ids[b, t, k]] − logsumexp(z_t)`` of K more tokens at each position
    (e.g. a teacher's top-K), from the same chunk loop; gradients flow through them too.
    Returns ``(logp, entropy, extra_logp)`` then."""
    w_chunks, starts, C = _vocab_chunks(lm_head, vocab_chunk)
    inv_t = 1.0 / float(temperature)
    targets = targets.astype(jnp.int32)
    V = lm_head.shape[1]
    if extra_ids is None:
        @jax.checkpoint
        def body(carry, xs):
            return _chunk_step(carry, xs, hidden, targets, inv_t, C, V, fixed_order,
                               head_dot)[0], None

        (m, s, u, picked), _ = jax.lax.scan(body, _chunk_init(targets.shape), (w_chunks, starts))
    else:
        extra_ids = extra_ids.astype(jnp.int32)

        @jax.checkpoint
        def body(carry, xs):
            inner, extra = carry
            inner, z = _chunk_step(inner, xs, hidden, targets, inv_t, C, V, fixed_order,
                                   head_dot)
            local = extra_ids - xs[1]
            inside = (local >= 0) & (local < C)
            z_k = jnp.take_along_axis(z, jnp.clip(local, 0, C - 1), -1)
            return (inner, extra + jnp.where(inside, z_k, 0.0)), None

        init = (_chunk_init(targets.shape), jnp.zeros(extra_ids.shape, jnp.float32))
        ((m, s, u, picked), extra), _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = m + jnp.log(s)
    logp = picked - lse
    entropy = sg(lse - u / s)
    if extra_ids is None:
        return logp, entropy
    return logp, entropy, extra - lse[..., None]


def chunked_topk_logprobs(hidden: jax.Array, lm_head: jax.Array, k: int, *,
                          temperature: float = 1.0, vocab_chunk: int = DEFAULT_VOCAB_CHUNK):
    """``(ids, logp)``, each ``[B, T, k]`` (int32, float32): the ``k`` most likely tokens of
    ``softmax(hidden [B, T, H] @ lm_head [H, V] / temperature)`` at every position, most likely
    first, and their log-probs ``z[id] − logsumexp(z)``, without materialising ``[B, T, V]``:
    a streaming top-k (merge the running top-k with each vocabulary chunk's logits) beside the
    streaming logsumexp of :func:`chunked_logprobs`. No gradient (a teacher's distribution)."""
    V = lm_head.shape[1]
    if not 1 <= k <= V:
        raise ValueError(f"chunked_topk_logprobs: k must be in [1, {V}], got {k}")
    w_chunks, starts, C = _vocab_chunks(lm_head, vocab_chunk)
    inv_t = 1.0 / float(temperature)
    shape = hidden.shape[:-1]
    targets = jnp.zeros(shape, jnp.int32)

    def body(carry, xs):
        inner, top_z, top_id = carry
        inner, z = _chunk_step(inner, xs, hidden, targets, inv_t, C, V)
        ids = jnp.broadcast_to(xs[1] + jnp.arange(C, dtype=jnp.int32), z.shape)
        z_all = jnp.concatenate([top_z, z], -1)
        id_all = jnp.concatenate([top_id, ids], -1)
        top_z, at = jax.lax.top_k(z_all, k)
        return (inner, top_z, jnp.take_along_axis(id_all, at, -1)), None

    init = (_chunk_init(shape), jnp.full(shape + (k,), -jnp.inf, jnp.float32),
            jnp.zeros(shape + (k,), jnp.int32))
    ((m, s, _, _), top_z, top_id), _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = m + jnp.log(s)
    return sg(top_id), sg(top_z - lse[..., None])


def _vocab_chunks(lm_head, vocab_chunk: int):
    """``lm_head [H, V]`` -> ``(chunks [n, H, C], chunk starts [n], C)`` (vocab padded to n·C)."""
    H, V = lm_head.shape
    C = int(min(vocab_chunk, V))
    n = -(-V // C)
    if n * C != V:  # pad the vocab; padded columns are masked to −inf in _chunk_step
        lm_head = jnp.pad(lm_head, ((0, 0), (0, n * C - V)))
    return lm_head.reshape(H, n, C).transpose(1, 0, 2), jnp.arange(n, dtype=jnp.int32) * C, C


def _chunk_init(shape):
    return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def _tree_sum(x):
    """``Σ`` over the last axis as a fixed pairwise tree of elementwise adds (zero-padded to a
    power of two). Unlike ``x.sum(-1)``, whose order XLA picks per program (vectorisation and
    fusion of the reduce), the order here is written out, so every program gets the same bits."""
    n = x.shape[-1]
    p2 = 1 << max(n - 1, 0).bit_length()
    if p2 != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, p2 - n)])
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def _chunk_step(carry, xs, hidden, targets, inv_t, C: int, V: int, fixed_order: bool = False,
                head_dot=None):
    """One vocabulary chunk of the streaming log-softmax: ``carry = (m, s, u, picked)`` each
    ``[B, T]``, ``xs = (W_c [H, C], c0)`` -> ``(carry, z [B, T, C])`` (``z`` the chunk's
    temperature-scaled logits, −inf past ``V``). The one definition the trainer's
    :func:`chunked_logprobs` and the sampler's :func:`next_token_logprobs` share;
    ``fixed_order`` sums with :func:`_tree_sum` (batch-invariant mode); ``head_dot(h, W_c)``
    replaces the logits matmul (the invariant model's tiled GEMM, kernel-invariant
    mode; the scaled logits are then kept apart from the adds that follow, so no program
    contracts them into an FMA)."""
    total = _tree_sum if fixed_order else (lambda a: a.sum(-1))
    m, s, u, picked = carry
    w_c, c0 = xs
    if head_dot is None:
        z = jnp.einsum("bth,hc->btc", hidden, w_c, preferred_element_type=jnp.float32) * inv_t
    else:
        z = jax.lax.optimization_barrier(head_dot(hidden, w_c) * inv_t)
    valid = (c0 + jnp.arange(C)) < V
    z = jnp.where(valid, z, -jnp.inf)
    m_new = jnp.maximum(m, sg(z).max(-1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(z - m_new[..., None])
    ez = jnp.where(valid, e * z, 0.0)
    s_old, u_old = s * scale, u * scale
    if head_dot is not None:
        ez, s_old, u_old = jax.lax.optimization_barrier((ez, s_old, u_old))
    s = s_old + total(e)
    u = u_old + total(sg(ez))
    local = targets - c0
    inside = (local >= 0) & (local < C)
    z_t = jnp.take_along_axis(z, jnp.clip(local, 0, C - 1)[..., None], -1)[..., 0]
    picked = picked + jnp.where(inside, z_t, 0.0)
    return (m_new, s, u, picked), z


def token_logprobs(params, batch, cfg, *, temperature: float = 1.0,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None, routed_experts=None,
                   row_len: Optional[int] = None, return_routed_experts: bool = False,
                   extra_ids=None):
    """``(logp, entropy)`` ``[B, T]`` float32 of ``batch.tokens`` under the policy ``params``.

    ``logp[b, t] = log π(tokens[b, t] | tokens[b, <t])`` at temperature ``τ`` (aligned with the
    tokens; 0 where there is no prefix in the same segment: ``t = 0``, segment starts,
    padding). ``batch`` is anything with ``tokens``, ``positions``, ``segment_ids``
    (:class:`RLBatch`, :class:`SFTBatch`). ``model`` is the module providing
    ``hidden_states(params, tokens, cfg, *, positions, segment_ids)`` (default: NemotronH).

    ``routed_experts [B, T, L_moe, K]`` (default ``batch.routed_experts`` when the batch has
    one): MoE routing replay, the model uses these experts (-1: route freely).
    ``row_len``: batch-invariant mode (module doc): each row alone at shape ``[1, row_len]``
    (``row_len >= T``; the rows are padded). Needs the padded layout (one sequence per row,
    starting at column 0), as the rollout engine's rows are.
    ``return_routed_experts``: returns ``(logp, entropy, experts [B, T, L_moe, K] int32)``, the
    experts the forward used (for expert-load statistics; no second forward).
    ``extra_ids [B, T, K]``: the log-probs of K more candidate tokens at each position (aligned
    like ``logp``: ``extra_logp[b, t, k] = log π(extra_ids[b, t, k] | tokens[b, <t])``, 0 where
    ``logp`` is), returned last; default model path only (not with ``row_len`` or the
    kernel-invariant model, whose programs are pinned to the sampler's).
    """
    if model is None:
        model = nemotron_h
    if routed_experts is None:
        routed_experts = getattr(batch, "routed_experts", None)
    experts = None
    if extra_ids is not None:
        if row_len is not None or getattr(model, "KERNEL_INVARIANT", False):
            raise ValueError("token_logprobs: extra_ids (a teacher's top-K) is not available in "
                             "the zero-mismatch modes (row_len / the kernel-invariant model)")
        lp, ent, experts, extra = _logprobs(
            params, batch.tokens, batch.positions, batch.segment_ids, routed_experts, cfg, model,
            temperature, vocab_chunk, return_routed_experts=return_routed_experts,
            extra_ids=extra_ids)
        valid = segment_start_mask(batch.segment_ids)
        head = (lp * valid, ent * valid) + ((experts,) if return_routed_experts else ())
        return head + (extra * valid[..., None],)
    if getattr(model, "KERNEL_INVARIANT", False):  # the invariant kernels: values, any shape
        static = (cfg, model, float(temperature), int(vocab_chunk), bool(return_routed_experts))
        rows = (batch.tokens, batch.positions, batch.segment_ids, routed_experts)
        lp, ent, experts = _invariant_rows(params, rows, static)
    elif row_len is None:
        lp, ent, experts = _logprobs(params, batch.tokens, batch.positions, batch.segment_ids,
                                     routed_experts, cfg, model, temperature, vocab_chunk,
                                     return_routed_experts=return_routed_experts)
    else:
        B, T = batch.tokens.shape
        if row_len < T:
            raise ValueError(f"token_logprobs: row_len ({row_len}) < batch length T ({T})")
        pad = lambda x, v=0: jnp.pad(x, [(0, 0), (0, row_len - T)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=v)
        rows = (pad(batch.tokens), pad(batch.positions), pad(batch.segment_ids),
                None if routed_experts is None else pad(routed_experts, -1))

        static = (cfg, model, float(temperature), int(vocab_chunk), bool(return_routed_experts))
        lp, ent, experts = _exact_rows(params, rows, static)
        lp, ent = lp[:, :T], ent[:, :T]
        experts = None if experts is None else experts[:, :T]
    valid = segment_start_mask(batch.segment_ids)
    if return_routed_experts:
        return lp * valid, ent * valid, experts
    return lp * valid, ent * valid


def _rows_logprobs(params, rows, static):
    """Batch-invariant rows: ``(lp, ent, experts or None)``, each row of ``rows = (tokens,
    positions, segment_ids, routed_experts or None)`` (``[B, row_len, ...]``) alone at shape
    ``[1, row_len]`` (a ``lax.map``), vocabulary sums in the fixed order."""
    cfg, model, temperature, vocab_chunk, return_routed_experts = static

    def one(r):
        tok, pos, seg, rx = r
        with use_partitioner(None):  # on a mesh too: the sampler's single-device row program
            out = _logprobs(params, tok[None], pos[None], seg[None],
                            None if rx is None else rx[None], cfg, model, temperature,
                            vocab_chunk, fixed_order=True,
                            return_routed_experts=return_routed_experts)
        return jax.tree.map(lambda a: a[0], out)

    return jax.lax.map(one, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _exact_rows(params, rows, static):
    """:func:`_rows_logprobs` whose value under differentiation comes from a forward-only
    computation (the zero-mismatch trainer side; module doc, "Why a custom VJP").

    ``fwd`` runs exactly the primal program and keeps only its inputs; ``bwd`` recomputes the
    rows with their VJP behind an optimisation barrier (so XLA cannot merge the two forwards)
    and pulls back the cotangent of ``lp`` (``ent`` carries no gradient, ``experts`` are ids).
    Cost: one extra forward of the rows per step."""
    return _rows_logprobs(params, rows, static)


def _exact_rows_fwd(params, rows, static):
    return _rows_logprobs(params, rows, static), (params, rows)


def _exact_rows_bwd(static, res, ct):
    params, rows = jax.lax.optimization_barrier(res)
    _, pull = jax.vjp(lambda p: _rows_logprobs(p, rows, static)[0], params)
    (g,) = pull(ct[0])
    return g, jax.tree.map(lambda _: None, rows)


_exact_rows.defvjp(_exact_rows_fwd, _exact_rows_bwd)


def _invariant_logprobs(params, rows, static):
    """``(lp, ent, experts or None)`` of padded-layout ``rows`` under the kernel-invariant model
    (``static[1]``, e.g. :mod:`models.nemotron_h.invariant`): its forward and the chunked
    log-softmax with the tiled logits GEMM and fixed-order sums, so every token's
    numbers depend on its own prefix only (any batch, any row length, any program)."""
    cfg, model, temperature, vocab_chunk, return_routed_experts = static
    tokens, _, _, rx = rows
    kw = {"return_routed_experts": True} if return_routed_experts else {}
    if rx is not None:
        kw["routed_experts"] = rx
    out = model.hidden_states(params, tokens, cfg, **kw)
    h, experts = out if return_routed_experts else (out, None)
    lp, ent = chunked_logprobs(h[:, :-1], params["lm_head"], tokens[:, 1:],
                               temperature=temperature, vocab_chunk=vocab_chunk,
                               fixed_order=True, head_dot=model.idot)
    return jnp.pad(lp, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0))), experts


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _invariant_rows(params, rows, static):
    """:func:`_invariant_logprobs` as the value (forward-only, as the sampler computes it);
    the gradient is that of the default model's log-probs of the same rows
    (``model.GRADIENT_MODEL``, batched kernels), which differ from these values only by
    rounding: the trainer pays one invariant forward on top of the default step."""
    return _invariant_logprobs(params, rows, static)


def _invariant_rows_fwd(params, rows, static):
    return _invariant_logprobs(params, rows, static), (params, rows)


def _invariant_rows_bwd(static, res, ct):
    cfg, model, temperature, vocab_chunk, _ = static
    params, (tok, pos, seg, rx) = res

    def lp_of(p):
        return _logprobs(p, tok, pos, seg, rx, cfg, model.GRADIENT_MODEL, temperature,
                         vocab_chunk)[0]

    _, pull = jax.vjp(lp_of, params)
    (g,) = pull(ct[0])
    return g, jax.tree.map(lambda _: None, res[1])


_invariant_rows.defvjp(_invariant_rows_fwd, _invariant_rows_bwd)


def invariant_next_logprobs(params, hidden, inv_temperature, *,
                            vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None):
    """The sampler side of the kernel-invariant mode: ``hidden [S, H]`` (the invariant model's
    final-normed state after each slot's last token), ``inv_temperature [S]`` -> ``logp [S, V]``
    ``= z − logsumexp(z)``, ``z = (h · lm_head) / τ``, by the chunk loop of
    :func:`chunked_logprobs` with the same tiled product, chunks and order, so
    ``logp[s, y]`` equals the trainer's :func:`token_logprobs` (``model`` the invariant model)
    of ``y`` after the same prefix, bit for bit."""
    if model is None:
        model = invariant
    S = hidden.shape[0]
    w_chunks, starts, C = _vocab_chunks(params["lm_head"], vocab_chunk)
    V = params["lm_head"].shape[1]
    hid = hidden[:, None]
    inv_t = jnp.asarray(inv_temperature, jnp.float32)[:, None, None]
    targets = jnp.zeros((S, 1), jnp.int32)

    def body(carry, xs):
        carry, z = _chunk_step(carry, xs, hid, targets, inv_t, C, V, fixed_order=True,
                               head_dot=model.idot)
        return carry, z[:, 0]

    (m, s, _, _), zs = jax.lax.scan(body, _chunk_init((S, 1)), (w_chunks, starts))
    lse = (m + jnp.log(s))[:, 0]
    return jnp.moveaxis(zs, 0, 1).reshape(S, -1)[:, :V] - lse[:, None]


def _model_hidden(params, tokens, positions, segment_ids, routed_experts, cfg, model, **kw):
    extra = {} if routed_experts is None else {"routed_experts": routed_experts}
    return model.hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                               **extra, **kw)


def _logprobs(params, tokens, positions, segment_ids, routed_experts, cfg, model, temperature,
              vocab_chunk, fixed_order=False, return_routed_experts=False, extra_ids=None):
    """Aligned ``(lp, ent, experts)``: ``lp``/``ent`` ``[B, T]`` (entry 0 is 0; no segment mask
    applied yet), ``experts [B, T, L_moe, K]`` when ``return_routed_experts`` else None; with
    ``extra_ids [B, T, K]`` also the aligned ``[B, T, K]`` log-probs of those ids, last."""
    kw = {"return_routed_experts": True} if return_routed_experts else {}
    out = _model_hidden(params, tokens, positions, segment_ids, routed_experts, cfg, model, **kw)
    h, experts = out if return_routed_experts else (out, None)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))
    if extra_ids is not None:
        lp, ent, extra = chunked_logprobs(h[:, :-1], params["lm_head"], tokens[:, 1:],
                                          temperature=temperature, vocab_chunk=vocab_chunk,
                                          fixed_order=fixed_order, extra_ids=extra_ids[:, 1:])
        return pad(lp), pad(ent), experts, pad(extra)
    lp, ent = chunked_logprobs(h[:, :-1], params["lm_head"], tokens[:, 1:],
                               temperature=temperature, vocab_chunk=vocab_chunk,
                               fixed_order=fixed_order)
    return pad(lp), pad(ent), experts


def token_topk_logprobs(params, batch, cfg, k: int, *, temperature: float = 1.0,
                        vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None):
    """``(logp [B, T], ids [B, T, k], topk_logp [B, T, k])`` (float32, int32, float32) from one
    forward: the tokens' own log-probs as :func:`token_logprobs` computes them, and at each
    position ``t`` the ``k`` most likely tokens of ``π(· | tokens[b, <t])`` at temperature ``τ``
    with their log-probs, most likely first, aligned the same way (the distribution
    ``tokens[b, t]`` was drawn from; everything 0 where there is no prefix in the same
    segment). A teacher's side of the top-K forward-KL term of
    :func:`cascade_jax.rl.losses.mopd_loss` (``forward_kl_coef``); the default model path
    (not the zero-mismatch modes), no gradient through the top-K."""
    if model is None:
        model = nemotron_h
    if getattr(model, "KERNEL_INVARIANT", False):
        raise ValueError("token_topk_logprobs: not available for the kernel-invariant model")
    h = _model_hidden(params, batch.tokens, batch.positions, batch.segment_ids, None, cfg, model)
    lp, _ = chunked_logprobs(h[:, :-1], params["lm_head"], batch.tokens[:, 1:],
                             temperature=temperature, vocab_chunk=vocab_chunk)
    ids, top_lp = chunked_topk_logprobs(h[:, :-1], params["lm_head"], k, temperature=temperature,
                                        vocab_chunk=vocab_chunk)
    valid = segment_start_mask(batch.segment_ids)
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))
    return (pad(lp) * valid, pad(ids) * valid[..., None].astype(jnp.int32),
            pad(top_lp) * valid[..., None])


def next_token_logprobs(params, tokens: jax.Array, lengths: jax.Array, cfg, *,
                        temperature: float = 1.0, inv_temperature=None,
                        vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None,
                        return_routed_experts: bool = False):
    """The sampler side of the batch-invariant mode: ``logp [S, V]`` float32, the distribution
    of the token following ``tokens[r, :lengths[r]]`` (``tokens [S, row_len]``, anything past
    the length is ignored), computed for each row alone at shape ``[1, row_len]`` by the same
    functions :func:`token_logprobs` (``row_len=row_len``) uses, so for a row that continues
    with ``y``: ``logp[r, y] == token_logprobs(...)[r, lengths[r]]`` bit for bit.

    ``logp[r] = z − logsumexp(z)`` with ``z`` the row's temperature-scaled logits at position
    ``lengths[r] − 1`` (the vocabulary chunk loop of :func:`chunked_logprobs`, same chunks).
    ``temperature``: one τ for all rows (as the trainer's), or ``inv_temperature [S]`` float32
    per-row ``1/τ`` computed as the trainer does, ``float32(1.0 / float(τ))``
    (:func:`inverse_temperature`). ``return_routed_experts``: also the experts the row's tokens
    were routed to, ``[S, row_len, L_moe, K]`` (the prefix part is meaningful).
    ``lengths >= 1``."""
    if model is None:
        model = nemotron_h
    S, R = tokens.shape
    lengths = jnp.asarray(lengths, jnp.int32)
    if inv_temperature is None:
        inv = jnp.full((S,), 1.0 / float(temperature), jnp.float32)
    else:
        inv = jnp.asarray(inv_temperature, jnp.float32)
    w_chunks, starts, C = _vocab_chunks(params["lm_head"], vocab_chunk)
    V = params["lm_head"].shape[1]
    ar = jnp.arange(R, dtype=jnp.int32)

    def one(r):
        tok, n, inv_t = r
        seg = (ar < n).astype(jnp.int32)[None]
        out = _model_hidden(params, tok[None], ar[None], seg, None, cfg, model,
                            **({"return_routed_experts": True} if return_routed_experts else {}))
        h, experts = out if return_routed_experts else (out, None)
        hid, targets = h[:, :-1], tok[None, 1:]
        at = jnp.clip(n - 1, 0, R - 2)

        def body(carry, xs):
            carry, z = _chunk_step(carry, xs, hid, targets, inv_t, C, V, fixed_order=True)
            return carry, z[0, at]

        (m, s, _, _), zs = jax.lax.scan(body, _chunk_init(targets.shape), (w_chunks, starts))
        lse = (m + jnp.log(s))[0, at]
        logp = zs.reshape(-1)[:V] - lse
        return (logp, experts[0]) if return_routed_experts else logp

    return jax.lax.map(one, (tokens.astype(jnp.int32), lengths, inv))


def inverse_temperature(temperature) -> "np.ndarray":
    """Per-row ``1/τ`` as float32 computed the way the trainer computes it (``1.0 / float(τ)``
    in double precision, then rounded), for :func:`next_token_logprobs`; ``τ <= 0`` (greedy)
    gives 1 (log-probs of the unscaled logits, as the sampler reports them)."""
    import numpy as np

    t = np.asarray(temperature, np.float64)
    return np.where(t > 0, 1.0 / np.where(t > 0, t, 1.0), 1.0).astype(np.float32)
