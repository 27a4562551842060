"""Batch-, slot- and position-invariant NemotronH kernels: the zero-mismatch mode's forward,
prefill and cached decode compute every token with the same arithmetic in the same order.

Why: XLA picks a matmul / reduction strategy per operand shape and fuses per program, so the
same token's numbers differ in the last bits between a ``[T, H] @ [H, N]`` training forward and
an ``[S, H] @ [H, N]`` decode step (on CPU a row of ``x @ w`` changes with the row count), and
bf16 roundings move with fusion (``xla_allow_excess_precision`` drops convert pairs). Here:

* every value is an fp32 array; where the default model stores an activation in the params'
  dtype ``d`` the value is rounded to ``d`` with ``lax.reduce_precision`` (an explicit op XLA
  keeps in every program, unlike a convert pair), so bf16 semantics do not depend on fusion;
* every contraction is a GEMM of one fixed shape (:func:`tile_map`): the rows of ``x`` are
  padded to tiles of ``ROW_TILE`` and each tile is one ``[ROW_TILE, K] @ [K, N]`` GEMM, run in
  a loop over the tiles, so a decode step (``S`` rows, one tile) and a training forward
  (``B·T`` rows, many tiles) put every row through the same kernel call. The rule, measured on
  XLA CPU: a row of ``x @ w`` changes in the last bits with the number of rows (the GEMM
  kernel and its blocking are chosen per shape), but at a FIXED shape a row's result depends on
  that row and ``w`` only, not on the other rows nor on its place in the tile (checked on 13
  ``K×N`` shapes from 17×33 to 64×1040, fp32 and bf16 values, 1 to 300 rows at two offsets,
  under ``jit`` and inside ``value_and_grad``). The loop matters: ``vmap`` of a tiled product
  becomes one batched dot whose rows do differ (64×1024, 17×33), so :func:`tile_map` is never
  vmapped. Batched GEMMs of a fixed matrix shape whose batch size varies (attention) behave
  the same way;
* attention runs over fixed key blocks of ``KV_BLOCK`` positions aligned at 0, in order, with
  the online softmax ``m' = max(m, max_b s)``, ``l' = l·e^{m−m'} + Σ_b e^{s−m'}``,
  ``acc' = acc·e^{m−m'} + Σ_b e^{s−m'} v``; per (row, KV head) the query rows are padded to
  tiles of ``ROW_TILE`` and each tile meets each key block in two GEMMs of fixed shape
  (``[ROW_TILE, D]·[D, KV_BLOCK]`` and ``[ROW_TILE, KV_BLOCK]·[KV_BLOCK, D]``); a block wholly in
  a query's future is an exact no-op (``e^{0} = 1``, ``+0``), so a training row of ``T`` keys
  and a decode cache of ``max_len`` keys give the same bits whichever future blocks are
  visited: the tiles run in chunks of ``Q_CHUNK`` queries and a chunk visits the blocks up to
  its last query only (causal skipping; a decode step is one chunk);
* the Mamba SSM is the per-step recurrence ``s_t = s_{t−1}·e^{Δ_t A} + (Δ_t x_t) ⊗ B_t``,
  ``y_t = Σ_n s_t C_t`` in both (the training forward scans it over ``T``; a padded step has
  ``Δ = 0`` and leaves ``s`` bit-unchanged); the causal conv is ``Σ_k w_k x_{t−K+1+k}`` in
  ``k`` order in both;
* MoE, grouped: the (token, expert) pairs sorted by expert into tiles of ``ROW_TILE`` rows of
  one expert each (each group zero-padded), every tile one ``[ROW_TILE, H] @ [H, F]`` and one
  ``[ROW_TILE, F] @ [F, H]`` GEMM of that expert's weights, so a pair's result depends on its
  token and the expert only (not on the sort, the tile or the place in it); each token's
  ``K`` outputs weighted and added in top-k order;
* the reductions that are not contractions (norms, the SSM's ``Σ_n``, softmax sums) are a fixed
  pairwise tree of elementwise adds (:func:`tree_sum`).

The decode cache is :func:`models.nemotron_h.init_cache`'s (K/V and conv state in ``d``, which
hold ``d``-rounded values exactly; SSM state fp32). Cost: decode pads its ``S`` rows to a tile
(``ROW_TILE`` rows per GEMM, and ``ROW_TILE / G`` queries per attention tile); the training
forward computes about half of the (query tile, key block) pairs (``O(T²)`` like the default),
the SSM as a per-step scan, and the routed experts plus each used expert's tile padding. The
forward is not reverse-differentiable (the attention chunks and the expert tiles are loops of
data-dependent length): the trainer uses these numbers as values only and takes its gradient
through the default model (``GRADIENT_MODEL``; ``cascade_jax.rl.logprobs``).

Only the padded layout is supported (one sequence per row from column 0, positions ``arange``):
what the rollout engine produces and the zero-mismatch trainer consumes.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

import models.nemotron_h as _default_model

from .config import ModelConfig

__all__ = ["KV_BLOCK", "ROW_TILE", "tree_sum", "tile_map", "idot", "hidden_states", "prefill",
           "decode_step", "logits_from_hidden"]

f32 = jnp.float32
KV_BLOCK = 16  # key positions per attention block (decode caches: max_len a multiple of it)
ROW_TILE = 16  # rows per GEMM tile (tile_map): every projection runs at [ROW_TILE, K] @ [K, N]
Q_CHUNK = 128  # query positions per attention chunk (block_attention's causal skipping)


def _round(x, dtype):
    """``x`` (fp32) rounded to ``dtype``'s precision, kept in fp32."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if jnp.dtype(dtype) == jnp.dtype(jnp.float16):
        return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    return x


def _apart(x):
    """``x`` computed in its own fusion: XLA CPU contracts a multiply feeding an add into one
    FMA when both land in the same fusion, which depends on the program; a product passed
    through an ``optimization_barrier`` is rounded before any add, in every program."""
    return jax.lax.optimization_barrier(x)


def tree_sum(x, axis: int = -1):
    """``Σ`` over ``axis`` as a fixed pairwise tree of elementwise adds (zero-padded to a power
    of two): the order is written out, the same in every program and for every shape of the
    other axes."""
    axis = axis % x.ndim
    x = _apart(x)
    n = x.shape[axis]
    p2 = 1 << max(n - 1, 0).bit_length()
    if p2 != n:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, p2 - n)
        x = jnp.pad(x, pad)
    while x.shape[axis] > 1:
        h = x.shape[axis] // 2
        x = jax.lax.slice_in_dim(x, 0, h, axis=axis) + jax.lax.slice_in_dim(x, h, 2 * h, axis=axis)
    return jax.lax.index_in_dim(x, 0, axis=axis, keepdims=False)


def tile_map(fn, x, tile: int = ROW_TILE):
    """``fn`` applied to the rows of ``x [..., d]`` in tiles of ``tile`` rows: the rows are
    flattened, zero-padded to a multiple of ``tile`` and reshaped to ``[n_tiles, tile, d]``, and
    ``fn : [tile, d] -> [tile, f]`` runs once per tile (``lax.map``, a loop, never vmapped), so
    every row goes through the same fixed-shape computation whatever the row count (a decode
    step's ``S`` rows or a training batch's ``B·T``) -> ``[..., f]``."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    nt = -(-n // tile)
    rows = jnp.pad(rows, ((0, nt * tile - n), (0, 0))).reshape(nt, tile, d)
    out = jax.lax.map(fn, rows)
    return out.reshape(nt * tile, -1)[:n].reshape(*lead, -1)


def _gemm(a, b):
    return jax.lax.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)


def idot(x, w):
    """``x [..., K] @ w [K, N] -> [..., N]`` fp32 by fixed-shape GEMM tiles
    (:func:`tile_map`: one ``[ROW_TILE, K] @ [K, N]`` GEMM per tile): a row's result depends on
    that row and ``w`` only, not on the number of rows nor on its place in its tile."""
    w = w.astype(f32)
    return tile_map(lambda t: _gemm(t, w), x.astype(f32))


def rms_norm(x, w, eps, dtype):
    """``w · x · rsqrt(mean(x²) + eps)`` (fp32), rounded to ``dtype``."""
    ms = tree_sum(x * x) / x.shape[-1]
    return _round(w.astype(f32) * (x * jax.lax.rsqrt(ms + eps)[..., None]), dtype)


# --------------------------------------------------------------------------------------------
# Mamba2


def _mamba_in(p, u, dtype):
    z = _round(idot(u, p["in_z"]), dtype)
    xbc = _round(jnp.concatenate([idot(u, p["in_x"]), idot(u, p["in_B"]), idot(u, p["in_C"])], -1),
                 dtype)
    return z, xbc, _round(idot(u, p["in_dt"]), dtype)


def _conv(window, p, dtype):
    """``window [..., K, C]`` (oldest first) -> ``silu(Σ_k w_k x_k + b)`` rounded, ``[..., C]``."""
    w = p["conv_w"].astype(f32)
    acc = _apart(window[..., 0, :] * w[0])
    for k in range(1, w.shape[0]):
        acc = acc + _apart(window[..., k, :] * w[k])
    return _round(jax.nn.silu(_round(acc + p["conv_b"].astype(f32), dtype)), dtype)


def _ssm_step(p, xbc, dt_raw, s, cfg: ModelConfig, live=None):
    """One recurrence step on ``[..., ·]``: ``-> (y [..., Hm, P] fp32, x, s')``."""
    di, gn = cfg.d_inner, cfg.n_groups * cfg.ssm_state_size
    lead = xbc.shape[:-1]
    x = xbc[..., :di].reshape(*lead, cfg.mamba_num_heads, cfg.mamba_head_dim)
    bm = xbc[..., di:di + gn].reshape(*lead, cfg.n_groups, cfg.ssm_state_size)
    cm = xbc[..., di + gn:].reshape(*lead, cfg.n_groups, cfg.ssm_state_size)
    dt = jnp.clip(jax.nn.softplus(dt_raw + p["dt_bias"].astype(f32)), cfg.dt_min_clamp,
                  cfg.dt_max_clamp)
    if live is not None:
        dt = jnp.where(live[..., None], dt, 0.0)
    A = -jnp.exp(p["A_log"].astype(f32))
    rep = cfg.mamba_num_heads // cfg.n_groups
    bh = jnp.repeat(bm, rep, axis=-2)  # [..., Hm, N]
    ch = jnp.repeat(cm, rep, axis=-2)
    decay = jnp.exp(_apart(dt * A))[..., None, None]
    s = _apart(s * decay) + _apart((x * dt[..., None])[..., :, None] * bh[..., None, :])
    y = tree_sum(s * ch[..., None, :])  # [..., Hm, P]
    return y, x, s


def _mamba_out(p, y, x, z, cfg: ModelConfig, dtype):
    y = y + _apart(p["D"].astype(f32)[:, None] * x)
    y = y.reshape(*y.shape[:-2], cfg.d_inner)
    g = y * jax.nn.silu(z)
    g = g.reshape(*g.shape[:-1], cfg.n_groups, cfg.d_inner // cfg.n_groups)
    g = g * jax.lax.rsqrt(tree_sum(g * g) / g.shape[-1] + cfg.layer_norm_epsilon)[..., None]
    g = _round(p["norm"].astype(f32) * g.reshape(*g.shape[:-2], cfg.d_inner), dtype)
    return _round(idot(g, p["out_proj"]), dtype)


def mamba_row(p, u, valid, cfg: ModelConfig, dtype):
    """Training / prefill form: ``u [B, T, H]`` -> ``(out [B, T, H], state)``; ``valid [B, T]``
    (padded steps leave the state unchanged). The recurrence is scanned over ``T``."""
    B, T, _ = u.shape
    z, xbc_in, dt_raw = _mamba_in(p, u, dtype)
    K = cfg.conv_kernel
    padded = jnp.pad(xbc_in, ((0, 0), (K - 1, 0), (0, 0)))
    window = jnp.stack([padded[:, k:k + T] for k in range(K)], axis=2)  # [B, T, K, C]
    xbc = _conv(window, p, dtype)

    def body(s, xs):
        xb, dr, lv = xs
        y, x, s = _ssm_step(p, xb, dr, s, cfg, lv)
        return s, (y, x)

    s0 = jnp.zeros((B, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), f32)
    tm = lambda a: jnp.moveaxis(a, 1, 0)
    s, (y, x) = jax.lax.scan(body, s0, (tm(xbc), tm(dt_raw), tm(valid)))
    out = _mamba_out(p, tm(y), tm(x), z, cfg, dtype)
    length = jnp.sum(valid, axis=1).astype(jnp.int32)
    idx = length[:, None] - (K - 1) + jnp.arange(K - 1)[None]
    conv = jnp.take_along_axis(padded, (idx + K - 1)[..., None], axis=1)  # last K-1 valid inputs
    return out, {"conv": conv, "ssm": s}


def mamba_step(p, u, state, cfg: ModelConfig, dtype):
    """Decode form: ``u [S, H]``, state ``{"conv": [S, K-1, C], "ssm": [S, Hm, P, N]}``."""
    z, xbc_new, dt_raw = _mamba_in(p, u, dtype)
    window = jnp.concatenate([state["conv"].astype(f32), xbc_new[:, None]], axis=1)
    xbc = _conv(window, p, dtype)
    y, x, s = _ssm_step(p, xbc, dt_raw, state["ssm"], cfg)
    return _mamba_out(p, y, x, z, cfg, dtype), {"conv": window[:, 1:], "ssm": s}


# --------------------------------------------------------------------------------------------
# Attention


def _qkv(p, u, cfg: ModelConfig, dtype):
    hd = cfg.head_dim
    q = _round(idot(u, p["q_proj"]), dtype).reshape(*u.shape[:-1], cfg.num_attention_heads, hd)
    k = _round(idot(u, p["k_proj"]), dtype).reshape(*u.shape[:-1], cfg.num_key_value_heads, hd)
    v = _round(idot(u, p["v_proj"]), dtype).reshape(*u.shape[:-1], cfg.num_key_value_heads, hd)
    return q, k, v


def _bgemm(a, b, contract_b: int):
    """Batched fixed-shape GEMM on the last two axes: ``a [..., R, X] · b [..., ·, ·]``
    contracting ``a``'s last axis with ``b``'s axis ``contract_b`` (−1 or −2); the batch axes
    are all the leading ones (their number varies, each matrix's shape does not)."""
    nb = a.ndim - 2
    batch = tuple(range(nb))
    return _apart(jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim + contract_b,)), (batch, batch)),
                                      precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=f32))


def block_attention(q, k, v, q_pos, dtype):
    """``q [B, Tq, Hq, D]`` at positions ``q_pos [B, Tq]`` over keys ``k, v [B, Tk, Hkv, D]`` at
    positions ``arange(Tk)`` (``Tk`` a multiple of ``KV_BLOCK``; key ``s`` visible iff
    ``s <= q_pos``; ``k, v`` are read in float32), block by block in order (module doc) ->
    ``[B, Tq, Hq, D]`` rounded.

    By fixed-shape GEMM tiles: per (row, KV head) the ``Tq·G`` query rows (``G = Hq/Hkv``,
    query-major) are padded to tiles of ``ROW_TILE`` rows, and a tile meets a key block in the
    same two GEMMs, ``S = Q_tile [ROW_TILE, D] · K_jᵀ [D, KV_BLOCK]`` and
    ``P_tile [ROW_TILE, KV_BLOCK] · V_j [KV_BLOCK, D]`` (a batch of such matrices; the batch size
    varies, the matrix shape never does).

    Causal skipping: the tiles run in chunks of ``Q_CHUNK`` query positions (a loop over the
    chunks; a decode step is one chunk), and a chunk visits only the key blocks
    ``j <= max(q_pos in the chunk) // KV_BLOCK`` (a loop of dynamic length), so a decode step
    costs O(position) and a training row about half of all (query tile, key block) pairs. A
    block a query does not visit lies wholly in its future, and visiting such a block leaves
    the running ``(m, l, acc)`` bit for bit as they were (every score is ``-inf``: ``m``
    unchanged, ``alpha = e^0 = 1``, ``p = 0``), so every query row gets the same bits whichever
    blocks its chunk visits past its own, and whatever chunk it lands in."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nb = Tk // KV_BLOCK
    R = ROW_TILE
    M = Tq * G
    nt = -(-M // R)
    nc = -(-nt // max(1, Q_CHUNK * G // R))  # chunks of at most Q_CHUNK queries, as even as
    ct = -(-nt // nc)  # can be: tiles per chunk (how many does not change a tile's bits)
    qr = jnp.moveaxis(q.reshape(B, Tq, Hkv, G, D), 2, 1).reshape(B, Hkv, M, D)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, nc * ct * R - M), (0, 0))).reshape(B, Hkv, nc, ct, R, D)
    pos = jnp.pad(jnp.repeat(q_pos, G, axis=1), ((0, 0), (0, nc * ct * R - M)))  # padded: key 0
    pos = pos.reshape(B, 1, nc, ct, R, 1)
    kb = jnp.moveaxis(k.reshape(B, nb, KV_BLOCK, Hkv, D), 3, 2)  # [B, nb, Hkv, KV_BLOCK, D]
    vb = jnp.moveaxis(v.reshape(B, nb, KV_BLOCK, Hkv, D), 3, 2)
    kb, vb = jnp.moveaxis(kb, 1, 0), jnp.moveaxis(vb, 1, 0)  # [nb, B, Hkv, KV_BLOCK, D]
    scale = D ** -0.5
    tiles = lambda x: jnp.broadcast_to(x[:, :, None], (B, Hkv, ct, KV_BLOCK, D))

    def chunk(xs):  # qc [B, Hkv, ct, R, D], pc [B, 1, ct, R, 1]
        qc, pc = xs

        def body(j, c):
            m, l, acc = c
            kj, vj = kb[j].astype(f32), vb[j].astype(f32)
            s = _apart(_bgemm(qc, tiles(kj), -1) * scale)  # [B, Hkv, ct, R, KV_BLOCK]
            kpos = j * KV_BLOCK + jnp.arange(KV_BLOCK)
            s = jnp.where(kpos <= pc, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            pr = jnp.exp(s - m_new[..., None])
            l = _apart(l * alpha) + tree_sum(pr)
            acc = _apart(acc * alpha[..., None]) + _bgemm(_round(pr, dtype), tiles(vj), -2)
            return m_new, l, acc

        init = (jnp.full((B, Hkv, ct, R), -jnp.inf, f32), jnp.zeros((B, Hkv, ct, R), f32),
                jnp.zeros((B, Hkv, ct, R, D), f32))
        n_visit = jnp.minimum(jnp.max(pc) // KV_BLOCK + 1, nb)
        m, l, acc = jax.lax.fori_loop(0, n_visit, body, init)
        return _round(acc / l[..., None], dtype)  # [B, Hkv, ct, R, D]

    o = jax.lax.map(chunk, (jnp.moveaxis(qr, 2, 0), jnp.moveaxis(pos, 2, 0)))  # [nc, B, Hkv, ...]
    o = jnp.moveaxis(o, 0, 2).reshape(B, Hkv, nc * ct * R, D)[:, :, :M]
    return jnp.moveaxis(o.reshape(B, Hkv, Tq, G, D), 1, 2).reshape(B, Tq, Hq, D)


def _pad_keys(x, n: int):
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))


def attention_row(p, u, cfg: ModelConfig, dtype):
    """Training / prefill form: ``u [B, T, H]`` -> ``(out, (k, v))``."""
    B, T, _ = u.shape
    q, k, v = _qkv(p, u, cfg, dtype)
    Tk = -(-T // KV_BLOCK) * KV_BLOCK
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    o = block_attention(q, _pad_keys(k, Tk), _pad_keys(v, Tk), pos, dtype)
    return _round(idot(o.reshape(B, T, -1), p["o_proj"]), dtype), (k, v)


def attention_step(p, u, state, positions, cfg: ModelConfig, dtype):
    """Decode form: ``u [S, H]``; cache ``{"k","v": [S, max_len, Hkv, D]}``."""
    q, k, v = _qkv(p, u[:, None], cfg, dtype)
    b = jnp.arange(u.shape[0])
    kc = state["k"].at[b, positions].set(k[:, 0].astype(state["k"].dtype))
    vc = state["v"].at[b, positions].set(v[:, 0].astype(state["v"].dtype))
    o = block_attention(q, kc, vc, positions[:, None], dtype)
    return _round(idot(o.reshape(u.shape[0], -1), p["o_proj"]), dtype), {"k": kc, "v": vc}


# --------------------------------------------------------------------------------------------
# MoE and MLP


def _relu2(h, dtype):
    h = jax.nn.relu(h)
    return _round(h * h, dtype)


def mlp(x, up, down, dtype):
    return _round(idot(_relu2(_round(idot(x, up), dtype), dtype), down), dtype)


def route(p, x, cfg: ModelConfig, expert_ids=None):
    """:func:`models.nemotron_h.model.route` with written-out sums: ``x [..., H]`` ->
    ``(weights [..., K] fp32, ids [..., K] int32)``."""
    scores = jax.nn.sigmoid(idot(x, p["gate"]))
    sel = scores + p["e_score_correction_bias"].astype(f32)
    E = sel.shape[-1]
    if cfg.n_group > 1:
        grouped = sel.reshape(*sel.shape[:-1], cfg.n_group, E // cfg.n_group)
        top2 = jax.lax.top_k(grouped, 2)[0]
        group_scores = top2[..., 0] + top2[..., 1]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        keep_mask = jnp.any(keep[..., :, None] == jnp.arange(cfg.n_group), axis=-2)
        sel = jnp.where(jnp.repeat(keep_mask, E // cfg.n_group, axis=-1), sel, -jnp.inf)
    _, idx = jax.lax.top_k(sel, cfg.num_experts_per_tok)
    if expert_ids is not None:
        given = expert_ids.astype(idx.dtype)
        free = jnp.any((given < 0) | (given >= cfg.n_routed_experts), axis=-1, keepdims=True)
        idx = jnp.where(free, idx, given)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (tree_sum(w)[..., None] + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def _combine(w, y, dtype):
    """``Σ_j w_j y_j`` over the top-k axis in top-k order: ``w [..., K]``, ``y [..., K, H]``."""
    acc = _apart(w[..., 0, None] * y[..., 0, :])
    for j in range(1, w.shape[-1]):
        acc = acc + _apart(w[..., j, None] * y[..., j, :])
    return _round(acc, dtype)


def _experts_grouped(p, x, idx, dtype):
    """Each token through its ``K`` experts only: ``x [n, H]``, ``idx [n, K]`` -> ``y [n, K, H]``.

    The ``n·K`` (token, expert) pairs are sorted by expert (stable) and laid out expert by
    expert, each expert's group zero-padded to a multiple of ``ROW_TILE`` rows, so every tile
    holds rows of one expert ``e``; a loop over the used tiles (their number follows the
    routing, at most ``(n·K + min(E, n·K)·(ROW_TILE−1)) / ROW_TILE``) runs
    ``relu2([ROW_TILE, H] @ up_e [H, F]) @ down_e [F, H]`` on each, two GEMMs of fixed shape, so
    a pair's result depends on its token row and ``e``'s weights only (not on the batch, the
    other tokens, its tile or its place in it); the outputs are gathered back to ``[n, K, H]``.
    The routed FLOPs plus padding of at most ``ROW_TILE − 1`` rows per used expert: ``K/E`` of
    what running every expert on every token costs (the form this replaced, in CPU time on a
    2-core CPU: 2.0x slower on the tiny model's ``E/K = 4`` at 1056 tokens and equal on a 4-token
    decode step; 3.1-4.2x slower at 1056 tokens and 2.8x on 4 tokens at ``E/K = 16``; the paper's
    ``E/K = 128/6`` would pay 21x the FLOPs), so it is the only form."""
    E, H, F = p["experts_up"].shape
    n, K = idx.shape
    R = ROW_TILE
    a = n * K
    n_tiles = (a + min(E, a) * (R - 1)) // R  # a bound on the tiles any routing needs
    e = idx.reshape(a)
    order = jnp.argsort(e, stable=True)  # pairs grouped by expert
    counts = jnp.zeros((E,), jnp.int32).at[e].add(1)
    padded = -(-counts // R) * R
    pstart = jnp.cumsum(padded) - padded  # each expert's first row in the tiled layout
    cstart = jnp.cumsum(counts) - counts  # its first pair in the sorted order
    es = e[order]
    dest = jnp.zeros((a,), jnp.int32).at[order].set(pstart[es] + jnp.arange(a) - cstart[es])
    src = jnp.full((n_tiles * R,), n, jnp.int32).at[dest].set(jnp.arange(a) // K)  # n: padding
    tile_e = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_tiles) * R,
                                          side="right"), E - 1).astype(jnp.int32)
    rows = jnp.concatenate([x.astype(f32), jnp.zeros((1, H), f32)])
    up, down = p["experts_up"], p["experts_down"]

    def body(t, out):
        xt = rows[jax.lax.dynamic_slice_in_dim(src, t * R, R)]  # [R, H]
        h = _relu2(_round(_gemm(xt, up[tile_e[t]].astype(f32)), dtype), dtype)
        y = _round(_gemm(h, down[tile_e[t]].astype(f32)), dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, y, t * R, 0)

    used = jnp.sum(padded) // R
    out = jax.lax.fori_loop(0, used, body, jnp.zeros((n_tiles * R, H), f32))
    return out[dest].reshape(n, K, H)


def moe(p, x, cfg: ModelConfig, dtype, expert_ids=None):
    """``x [..., H]`` -> ``(out [..., H], ids [..., K])``: each token's ``K`` routed experts by
    fixed-shape GEMM tiles of one expert each (:func:`_experts_grouped`), their outputs
    weighted and added in top-k order, then the shared expert."""
    w, idx = route(p, x, cfg, expert_ids)
    lead, H = x.shape[:-1], x.shape[-1]
    y = _experts_grouped(p, x.reshape(-1, H), idx.reshape(-1, idx.shape[-1]), dtype)
    out = _combine(w, y.reshape(*lead, *y.shape[-2:]), dtype)
    if cfg.n_shared_experts:
        out = _round(out + mlp(x, p["shared_up"], p["shared_down"], dtype), dtype)
    return out, idx


# --------------------------------------------------------------------------------------------
# Model


def _run(params, h, cfg: ModelConfig, dtype, mixer):
    """The layer stack on residual ``h [..., H]`` (fp32, rounded); ``mixer(i, kind, mp, u) ->
    (out, state or None, expert ids or None)``. Returns ``(h, states, expert ids per MoE)``."""
    states, used = [], []
    for i, kind in enumerate(cfg.pattern):
        lp = params["layers"][i]
        u = rms_norm(h, lp["norm"], cfg.layer_norm_epsilon, dtype)
        out, state, ids = mixer(i, kind, lp["mixer"], u)
        h = _round(h + out, dtype)
        states.append(state)
        if ids is not None:
            used.append(ids)
    return h, states, used


def _stack(used, lead, cfg):
    if not used:
        return jnp.zeros((*lead, 0, cfg.num_experts_per_tok), jnp.int32)
    return jnp.stack(used, axis=-2)


def _forward_rows(params, tokens, cfg: ModelConfig, lengths=None, routed_experts=None):
    """``tokens [B, T]`` -> ``(h_final [B, T, H] fp32 rounded, states, experts [B,T,L_moe,K])``."""
    dtype = params["embed"].dtype
    B, T = tokens.shape
    valid = (jnp.ones((B, T), bool) if lengths is None
             else jnp.arange(T)[None, :] < lengths[:, None])
    h = params["embed"][tokens].astype(f32)
    moe_ix = [i for i, k in enumerate(cfg.pattern) if k == "E"]

    def mixer(i, kind, mp, u):
        if kind == "M":
            out, st = mamba_row(mp, u, valid, cfg, dtype)
            return out, st, None
        if kind == "*":
            out, (k, v) = attention_row(mp, u, cfg, dtype)
            return out, {"k": k, "v": v}, None
        if kind == "E":
            given = None if routed_experts is None else routed_experts[..., moe_ix.index(i), :]
            out, ids = moe(mp, u, cfg, dtype, given)
            return out, {}, ids
        return mlp(u, mp["up_proj"], mp["down_proj"], dtype), {}, None

    h, states, used = _run(params, h, cfg, dtype, mixer)
    h = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon, dtype)
    return h, states, _stack(used, (B, T), cfg)


def hidden_states(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  routed_experts=None, return_routed_experts: bool = False):
    """Final-normed hidden states ``[B, T, H]`` fp32 (values rounded to the params' dtype) of
    padded-layout rows (``positions``/``segment_ids`` are accepted for the model interface; the
    rows must start at column 0). Same contract as :func:`models.nemotron_h.hidden_states`."""
    h, _, experts = _forward_rows(params, tokens, cfg, routed_experts=routed_experts)
    return (h, experts) if return_routed_experts else h


def logits_from_hidden(params, h):
    """``h @ lm_head`` by fixed-shape GEMM tiles (:func:`idot`) -> fp32 logits."""
    return idot(h, params["lm_head"])


def prefill(params, tokens, cfg: ModelConfig, *, lengths=None, max_len: Optional[int] = None,
            return_routed_experts: bool = False):
    """Right-padded prompts ``tokens [B, T]`` (``lengths [B]``) -> ``(h_last [B, H] fp32, cache,
    [experts [B, T, L_moe, K]])``: the final-normed hidden state at ``lengths − 1`` and an
    :func:`models.nemotron_h.init_cache`-layout cache with ``max_len`` positions (dtype of the
    params). Decoding continues with :func:`decode_step` at ``positions = lengths``."""
    B, T = tokens.shape
    max_len = T if max_len is None else max_len
    dtype = params["embed"].dtype
    lengths = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    h, states, experts = _forward_rows(params, tokens, cfg, lengths)
    cache = []
    for kind, st in zip(cfg.pattern, states):
        if kind == "*":
            pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
            cache.append({n: jnp.pad(st[n], pad).astype(dtype) for n in ("k", "v")})
        elif kind == "M":
            cache.append({"conv": st["conv"].astype(dtype), "ssm": st["ssm"]})
        else:
            cache.append({})
    last = h[jnp.arange(B), lengths - 1]
    return (last, cache, experts) if return_routed_experts else (last, cache)


def decode_step(params, cache, tokens, positions, cfg: ModelConfig, *,
                return_routed_experts: bool = False):
    """``tokens [S]`` at ``positions [S]`` -> ``(h [S, H] fp32 final-normed, cache,
    [experts [S, L_moe, K]])``: the same per-token arithmetic as :func:`hidden_states`."""
    dtype = params["embed"].dtype
    positions = positions.astype(jnp.int32)
    h = params["embed"][tokens].astype(f32)

    def mixer(i, kind, mp, u):
        if kind == "M":
            out, st = mamba_step(mp, u, cache[i], cfg, dtype)
            return out, {"conv": st["conv"].astype(cache[i]["conv"].dtype), "ssm": st["ssm"]}, None
        if kind == "*":
            out, st = attention_step(mp, u, cache[i], positions, cfg, dtype)
            return out, st, None
        if kind == "E":
            out, ids = moe(mp, u, cfg, dtype)
            return out, {}, ids
        return mlp(u, mp["up_proj"], mp["down_proj"], dtype), {}, None

    h, states, used = _run(params, h, cfg, dtype, mixer)
    h = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon, dtype)
    if return_routed_experts:
        return h, states, _stack(used, tokens.shape, cfg)
    return h, states


# --------------------------------------------------------------------------------------------
# The model-module interface (``model=invariant`` wherever a model module is taken)

from .params import init_params, param_specs  # noqa: E402  same parameters as the default model
from .model import init_cache, num_moe_layers  # noqa: E402  same cache layout

#: marks a model whose per-token numbers do not depend on batch, slot, row length or program
#: (``cascade_jax.rl.token_logprobs`` then uses :func:`idot` for the logits as well)
KERNEL_INVARIANT = True

#: the trainer's gradient model (same parameters, batched kernels)
GRADIENT_MODEL = _default_model
