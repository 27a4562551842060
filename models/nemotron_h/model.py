"""NemotronH forward pass, prefill and single-token decode as pure functions over params.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden, ``V`` vocab. Activations run in the params'
dtype (bf16 for the checkpoint) with fp32 where docs/model.md says fp32: RMSNorm statistics and weight
multiply, router, routed-expert accumulation, the whole SSM (dt, A, state, y, gated norm) and the
logits. Packed rows: tokens with different ``segment_ids`` never see each other — attention is
masked, the Mamba conv does not read across a segment start, and the SSM state is reset there.

Routing replay (R3): ``forward`` / ``hidden_states`` / ``prefill`` / ``decode_step`` can return the
experts every token was routed to in every MoE layer (``return_routed_experts=True``; layout
``[..., L_moe, K]``, MoE layers in pattern order, each token's ``K`` ids in top-k order), and
``forward`` / ``hidden_states`` accept such ids (``routed_experts``) to use instead of the router's
own top-k; the gate weights are then recomputed from the current router at the given experts
(:func:`route`), so gradients still reach the router.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

import kernels
from kernels import moe_dispatch

from .config import ModelConfig, remat_for_kind
from .layer_scan import run_layers
from .partitioning import constrain, context_parallel, expert_parallel

__all__ = ["forward", "hidden_states", "logits_from_hidden", "prefill", "prefill_continue",
           "decode_step", "init_cache", "rms_norm", "num_moe_layers"]

f32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Norms


def rms_norm(x, w, eps):
    """``(w_fp32 · x_fp32 · rsqrt(mean(x²) + eps))`` cast to ``x.dtype`` (docs/model.md §3)."""
    xf = x.astype(f32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(f32) * xf).astype(x.dtype)


def gated_group_norm(y, z, w, groups, eps, out_dtype):
    """Gate-before-norm grouped RMSNorm (docs/model.md §4.6): ``g = y·silu(z)`` in fp32, normalised
    over ``groups`` contiguous groups, times the weight in fp32, cast to ``out_dtype``."""
    g = y.astype(f32) * jax.nn.silu(z.astype(f32))
    shape = g.shape
    g = g.reshape(*shape[:-1], groups, shape[-1] // groups)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return (w.astype(f32) * g.reshape(shape)).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# Mamba2 mixer


def _mamba_in(p, u):
    """Split projections: z [.., Di], xBC [.., Di+2GN], dt_raw [.., Hm]."""
    z = u @ p["in_z"]
    xbc = jnp.concatenate([u @ p["in_x"], u @ p["in_B"], u @ p["in_C"]], axis=-1)
    return z, xbc, u @ p["in_dt"]


def _dt(p, dt_raw, cfg: ModelConfig):
    """``clip(softplus(dt_raw + dt_bias), lo, hi)`` in fp32 (lo = max(dt_floor, limit[0]))."""
    dt = jax.nn.softplus(dt_raw.astype(f32) + p["dt_bias"].astype(f32))
    return jnp.clip(dt, cfg.dt_min_clamp, cfg.dt_max_clamp)


def _split_xbc(xbc, cfg: ModelConfig):
    di, gn = cfg.d_inner, cfg.n_groups * cfg.ssm_state_size
    x, b, c = xbc[..., :di], xbc[..., di:di + gn], xbc[..., di + gn:]
    return (x.reshape(*x.shape[:-1], cfg.mamba_num_heads, cfg.mamba_head_dim),
            b.reshape(*b.shape[:-1], cfg.n_groups, cfg.ssm_state_size),
            c.reshape(*c.shape[:-1], cfg.n_groups, cfg.ssm_state_size))


def _mamba_out(p, y, x, z, cfg: ModelConfig, dtype):
    """y [B,T,Hm,P] fp32 (without D) -> out [B,T,H]."""
    y = y + p["D"].astype(f32)[:, None] * x.astype(f32)
    y = y.reshape(*y.shape[:-2], cfg.d_inner)
    g = gated_group_norm(y, z, p["norm"], cfg.n_groups, cfg.layer_norm_epsilon, dtype)
    return g @ p["out_proj"]


def causal_conv(xbc, w, b, segment_ids):
    """Depthwise causal conv: ``out_t = Σ_k w[k]·xbc[t-(K-1)+k] + b``, taps before the start of
    ``t``'s segment read zero. xbc [B,T,C], w [K,C]."""
    k = w.shape[0]
    t = xbc.shape[1]
    out = xbc * w[k - 1]
    for shift in range(1, k):
        prev = jnp.pad(xbc, ((0, 0), (shift, 0), (0, 0)))[:, :t]
        if segment_ids is not None:
            prev_seg = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
            prev = jnp.where((prev_seg == segment_ids)[..., None], prev, jnp.zeros((), prev.dtype))
        out = out + prev * w[k - 1 - shift]
    return out + b


def mamba_mixer(p, u, cfg: ModelConfig, *, segment_ids=None, valid=None, return_state=False):
    """Full-sequence Mamba2 mixer. u [B,T,H] -> [B,T,H] (and the decode state if asked)."""
    dtype = u.dtype
    z, xbc_in, dt_raw = _mamba_in(p, u)
    xbc = jax.nn.silu(causal_conv(xbc_in, p["conv_w"], p["conv_b"], segment_ids))
    x, bm, cm = _split_xbc(xbc, cfg)
    dt = _dt(p, dt_raw, cfg)
    if valid is not None:  # padded positions: dt = 0 leaves the state untouched
        dt = jnp.where(valid[..., None], dt, 0.0)
    A = -jnp.exp(p["A_log"].astype(f32))
    cp = context_parallel()
    if cp is not None:  # sequence split over devices: states passed between shards
        y, state = cp.ssd(x, dt, A, bm, cm, cfg.chunk_size, segment_ids,
                          functools.partial(kernels.ssd, impl=cfg.ssd_impl))
    else:
        y, state = kernels.ssd(x, dt, A, bm, cm, chunk_size=cfg.chunk_size,
                               segment_ids=segment_ids, impl=cfg.ssd_impl)
    out = _mamba_out(p, y, x, z, cfg, dtype)
    if not return_state:
        return out
    return out, {"conv": _last_inputs(xbc_in, valid, cfg.conv_kernel - 1), "ssm": state}


def _last_inputs(xbc, valid, n):
    """The last ``n`` valid rows of xbc [B,T,C] per batch row (zeros before t = 0) -> [B,n,C]."""
    b, t, _ = xbc.shape
    length = jnp.full((b,), t, jnp.int32) if valid is None else jnp.sum(valid, axis=1).astype(jnp.int32)
    idx = length[:, None] - n + jnp.arange(n)[None]  # [B,n]
    rows = jnp.take_along_axis(xbc, jnp.clip(idx, 0, t - 1)[..., None], axis=1)
    return jnp.where((idx >= 0)[..., None], rows, jnp.zeros((), xbc.dtype))


def mamba_step(p, u, state, cfg: ModelConfig):
    """One decode step. u [B,H]; state {"conv": [B,K-1,C], "ssm": [B,Hm,P,N] fp32}."""
    dtype = u.dtype
    z, xbc_new, dt_raw = _mamba_in(p, u)
    window = jnp.concatenate([state["conv"], xbc_new[:, None]], axis=1)  # [B,K,C]
    xbc = jax.nn.silu(jnp.einsum("bkc,kc->bc", window, p["conv_w"]) + p["conv_b"])
    x, bm, cm = _split_xbc(xbc, cfg)  # [B,Hm,P], [B,G,N]
    dt = _dt(p, dt_raw, cfg)  # [B,Hm]
    A = -jnp.exp(p["A_log"].astype(f32))
    rep = cfg.mamba_num_heads // cfg.n_groups
    bh = jnp.repeat(bm.astype(f32), rep, axis=1)  # [B,Hm,N]
    ch = jnp.repeat(cm.astype(f32), rep, axis=1)
    s = state["ssm"] * jnp.exp(dt * A)[..., None, None] + jnp.einsum(
        "bhp,bhn->bhpn", x.astype(f32) * dt[..., None], bh)
    y = jnp.einsum("bhpn,bhn->bhp", s, ch)
    out = _mamba_out(p, y[:, None], x[:, None], z[:, None], cfg, dtype)[:, 0]
    return out, {"conv": window[:, 1:], "ssm": s}


# --------------------------------------------------------------------------------------------
# Attention


def _qkv(p, u, cfg: ModelConfig):
    hd = cfg.head_dim
    q = (u @ p["q_proj"]).reshape(*u.shape[:-1], cfg.num_attention_heads, hd)
    k = (u @ p["k_proj"]).reshape(*u.shape[:-1], cfg.num_key_value_heads, hd)
    v = (u @ p["v_proj"]).reshape(*u.shape[:-1], cfg.num_key_value_heads, hd)
    return q, k, v


def attention_mixer(p, u, cfg: ModelConfig, *, positions=None, segment_ids=None):
    """Causal GQA attention with no positional encoding (NoPE). u [B,T,H] -> [B,T,H].
    ``positions`` [B,T] order the causal mask (None: arange)."""
    q, k, v = _qkv(p, u, cfg)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    cp = context_parallel()
    if cp is not None:  # sequence split over devices: K/V gathered
        o = cp.attention(q, k, v, positions, segment_ids,
                         functools.partial(kernels.attention, impl=cfg.attention_impl))
    else:
        o = kernels.attention(q, k, v, q_positions=positions, kv_positions=positions,
                              q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                              impl=cfg.attention_impl)
    return o.reshape(*u.shape[:-1], -1) @ p["o_proj"], (k, v)


def attention_step(p, u, state, positions, cfg: ModelConfig):
    """u [B,H]; state {"k","v": [B,S,Hkv,D]}; writes the new K/V at ``positions[b]``."""
    q, k, v = _qkv(p, u[:, None], cfg)
    bidx = jnp.arange(u.shape[0])
    kc = state["k"].at[bidx, positions].set(k[:, 0])
    vc = state["v"].at[bidx, positions].set(v[:, 0])
    s = kc.shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (u.shape[0], s))
    o = kernels.attention(q, kc, vc, q_positions=positions[:, None], kv_positions=kv_pos,
                          impl=cfg.attention_impl)
    return o.reshape(u.shape[0], -1) @ p["o_proj"], {"k": kc, "v": vc}


# --------------------------------------------------------------------------------------------
# MoE and dense MLP


def relu2_mlp(x, up, down):
    h = jax.nn.relu(x @ up)
    return (h * h) @ down


def route(p, x, cfg: ModelConfig, expert_ids=None):
    """Sigmoid router with correction-biased, group-limited top-k (docs/model.md §6.1).
    x [n,H] -> (weights [n,k] fp32, expert ids [n,k] int32).

    ``s = sigmoid(x·gate)`` (fp32); the experts are the top-k of ``s + e_score_correction_bias``
    (within the ``topk_group`` best groups); ``w_j = scale · s[e_j] / Σ_j' s[e_j']``.
    Replay: ``expert_ids [n,k]`` given -> ``e_j`` are those ids (a token with any id outside
    ``[0, n_routed_experts)``, e.g. -1, is routed freely) and ``w`` is recomputed from the current
    ``s`` at them, so ``∂w/∂gate`` flows as in the unreplayed router."""
    gate = p["gate"]
    if cfg.freeze_router:
        gate = jax.lax.stop_gradient(gate)
    scores = jax.nn.sigmoid(jnp.dot(x.astype(f32), gate.astype(f32)))
    sel = scores + jax.lax.stop_gradient(p["e_score_correction_bias"].astype(f32))
    if cfg.n_group > 1:
        n, e = sel.shape
        grouped = sel.reshape(n, cfg.n_group, e // cfg.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [n, n_group]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        keep_mask = jnp.zeros_like(group_scores, bool).at[jnp.arange(n)[:, None], keep].set(True)
        sel = jnp.where(jnp.repeat(keep_mask, e // cfg.n_group, axis=1), sel, -jnp.inf)
    _, idx = jax.lax.top_k(sel, cfg.num_experts_per_tok)
    if expert_ids is not None:
        given = expert_ids.astype(idx.dtype)
        free = jnp.any((given < 0) | (given >= cfg.n_routed_experts), axis=-1, keepdims=True)
        idx = jnp.where(free, idx, given)
    w = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


def _expert_ffn(xs, group_sizes, up, down, cfg: ModelConfig):
    """Expert-sorted rows ``xs [M, H]`` (``group_sizes [E]``; rows past their sum give zeros)
    -> ``relu(xs @ up[e])² @ down[e]`` per row, ``[M, H]``."""
    h = kernels.grouped_matmul(xs, up, group_sizes, impl=cfg.moe_impl, epilogue="relu2")
    return kernels.grouped_matmul(h, down, group_sizes, impl=cfg.moe_impl)


def moe_mixer(p, u, cfg: ModelConfig, *, expert_ids=None, return_expert_ids=False):
    """Dropless routed experts (sort by expert, one grouped matmul per projection, unsort,
    fp32-weighted sum of the k contributions) + shared expert on the same input.
    u [..., H] -> out [..., H] (and the expert ids [..., K] used, if asked). ``expert_ids
    [..., K]`` replays given experts (see :func:`route`)."""
    shape = u.shape
    k = cfg.num_experts_per_tok
    x = u.reshape(-1, shape[-1])
    if expert_ids is not None:
        if expert_ids.shape != (*shape[:-1], k):
            raise ValueError(f"routed_experts: expected expert ids of shape {(*shape[:-1], k)} "
                             f"for this MoE layer, got {expert_ids.shape}")
        expert_ids = expert_ids.reshape(-1, k)
    w, idx = route(p, x, cfg, expert_ids)
    ffn = functools.partial(_expert_ffn, cfg=cfg)
    ep = expert_parallel()
    if ep is not None:  # a mesh's per-device dispatch (cascade_jax.sharding.moe): tokens
        # exchanged to experts split over devices, or each device's own tokens against all experts
        routed = ep(x, w, idx, p["experts_up"], p["experts_down"], ffn)
    else:  # one program over all tokens (a single device, or tokens not split)
        order, group_sizes = moe_dispatch.sort_by_expert(idx, cfg.n_routed_experts)
        xs = moe_dispatch.permute(x, order, cfg.num_experts_per_tok)  # [n*k, H], expert-sorted
        ys = ffn(xs, group_sizes, p["experts_up"], p["experts_down"])
        routed = moe_dispatch.unpermute(ys, order, w, out_dtype=u.dtype)
    if cfg.n_shared_experts:
        routed = routed + relu2_mlp(x, p["shared_up"], p["shared_down"])
    if return_expert_ids:
        return routed.reshape(shape), idx.reshape(*shape[:-1], k)
    return routed.reshape(shape)


# --------------------------------------------------------------------------------------------
# Model


_RESIDUAL = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, H]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _per_kind_remat(layer, cfg: ModelConfig):
    """``layer(kind, lp, h, x)`` with each layer checkpointed on its own under its kind's
    policy (``cfg.remat`` per layer kind; ``none`` = not wrapped): inside a scanned group the
    backward then keeps the inputs of every layer of the group and recomputes one layer at a
    time, instead of recomputing the whole group body and holding all its layers'
    intermediates at once."""
    wrapped = {}
    for kind in set(cfg.pattern):
        policy = remat_for_kind(cfg.remat, kind)
        if policy != "none":
            wrapped[kind] = jax.checkpoint(functools.partial(layer, kind), policy=_REMAT_POLICIES[policy])

    def run(kind, lp, h, x):
        if kind in wrapped:
            return wrapped[kind](lp, h, x)
        return layer(kind, lp, h, x)
    return run


def _channel_mixer(kind, mp, u, cfg, expert_ids=None):
    """MoE (``E``) and dense MLP (``-``) layers: per-token, no decode state.
    Returns ``(out, expert ids [..., K] or None)``."""
    if kind == "E":
        return moe_mixer(mp, u, cfg, expert_ids=expert_ids, return_expert_ids=True)
    return relu2_mlp(u, mp["up_proj"], mp["down_proj"]), None


def _block(lp, h, cfg, mixer):
    """Pre-norm residual block ``h + mixer(RMSNorm(h))``; ``mixer(mp, u) -> (out, state)``."""
    u = rms_norm(h.astype(lp["norm"].dtype), lp["norm"], cfg.layer_norm_epsilon)
    out, state = mixer(lp["mixer"], u)
    return h + out.astype(h.dtype), state


def _layer(kind, lp, h, cfg, positions, segment_ids, expert_ids=None):
    """One layer of the full-sequence pass -> ``(h, expert ids [B,T,K] for MoE else None)``."""
    def mixer(mp, u):
        if kind == "M":
            return mamba_mixer(mp, u, cfg, segment_ids=segment_ids), None
        if kind == "*":
            return attention_mixer(mp, u, cfg, positions=positions, segment_ids=segment_ids)[0], None
        return _channel_mixer(kind, mp, u, cfg, expert_ids)
    return _block(lp, h, cfg, mixer)


def num_moe_layers(cfg: ModelConfig) -> int:
    """``L_moe``, the number of ``E`` layers (the third axis of routed-expert arrays)."""
    return cfg.pattern.count("E")


def _stack_experts(ids: list, lead: tuple, cfg: ModelConfig):
    """Per-MoE-layer ids ``[*lead, K]`` -> ``[*lead, L_moe, K]`` int32."""
    if not ids:
        return jnp.zeros((*lead, 0, cfg.num_experts_per_tok), jnp.int32)
    return jnp.stack(ids, axis=-2)


def _check_routed(routed_experts, lead: tuple, cfg: ModelConfig):
    want = (*lead, num_moe_layers(cfg), cfg.num_experts_per_tok)
    if tuple(routed_experts.shape) != want:
        raise ValueError(f"routed_experts: expected shape {want} ([B, T, L_moe, K]), "
                         f"got {tuple(routed_experts.shape)}")


def hidden_states(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  routed_experts=None, return_routed_experts: bool = False):
    """Final-normed hidden states ``[B, T, H]`` (params' dtype). ``positions`` [B,T] (default
    arange) order the causal mask; ``segment_ids`` [B,T] isolate packed documents.

    ``routed_experts [B, T, L_moe, K]`` int replays those experts in the MoE layers (a token
    whose ids in a layer are -1 is routed freely there); ``return_routed_experts=True``
    returns ``(h, experts [B, T, L_moe, K] int32)``, the experts actually used."""
    if positions is not None:  # None = arange, which lets fused kernels (cuDNN) take the causal path
        positions = positions.astype(jnp.int32)
    if routed_experts is not None:
        _check_routed(routed_experts, tokens.shape, cfg)
    h = constrain(params["embed"][tokens], _RESIDUAL)
    moe = [i for i, kind in enumerate(cfg.pattern) if kind == "E"]
    given = [None] * len(cfg.pattern)
    if routed_experts is not None:
        for m, i in enumerate(moe):
            given[i] = routed_experts[..., m, :]

    def layer(kind, lp, h, expert_ids):
        h, ids = _layer(kind, lp, h, cfg, positions, segment_ids, expert_ids)
        return constrain(h, _RESIDUAL), ids

    remat = None
    if isinstance(cfg.remat, str):  # one policy: every layer (loop) or every group body (scan)
        if cfg.remat != "none":
            remat = functools.partial(jax.checkpoint, policy=_REMAT_POLICIES[cfg.remat])
    else:
        layer = _per_kind_remat(layer, cfg)
    h, ids = run_layers(layer, params["layers"], h, cfg.pattern, xs=given, scan=cfg.scan_layers,
                        remat=remat)
    used = [ids[i] for i in moe]
    h = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon)
    if return_routed_experts:
        return h, _stack_experts(used, tokens.shape, cfg)
    return h


def logits_from_hidden(params, h):
    """``h @ lm_head`` with fp32 accumulation -> fp32 logits."""
    return jnp.dot(h, params["lm_head"], preferred_element_type=f32)


def forward(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
            routed_experts=None, return_routed_experts: bool = False):
    """Logits ``[B, T, V]`` (fp32). For RL log-probs over a large vocabulary use
    :func:`hidden_states` and chunk the ``lm_head`` product instead. ``routed_experts`` /
    ``return_routed_experts``: routing replay, see :func:`hidden_states` (returns
    ``(logits, experts)`` when asked)."""
    out = hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                        routed_experts=routed_experts, return_routed_experts=return_routed_experts)
    if return_routed_experts:
        return logits_from_hidden(params, out[0]), out[1]
    return logits_from_hidden(params, out)


# --------------------------------------------------------------------------------------------
# Decode


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> list:
    """Empty decode cache: per layer ``{"k","v": [B,S,Hkv,D]}`` (attention),
    ``{"conv": [B,K-1,C], "ssm": [B,Hm,P,N] fp32}`` (Mamba) or ``{}`` (MoE / MLP)."""
    cache = []
    for kind in cfg.pattern:
        if kind == "*":
            shp = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
            cache.append({"k": jnp.zeros(shp, dtype), "v": jnp.zeros(shp, dtype)})
        elif kind == "M":
            cache.append({
                "conv": jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
                "ssm": jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), f32),
            })
        else:
            cache.append({})
    return cache


def _cached_stack(params, h, cfg: ModelConfig, sequence_mixer, *, lead: tuple, last=None,
                  return_routed_experts: bool = False):
    """The layer stack of the cached programs (:func:`prefill`, :func:`prefill_continue`,
    :func:`decode_step`) over embedded tokens ``h [*lead, H]``: each Mamba (``"M"``) and
    attention (``"*"``) layer runs ``sequence_mixer(kind, i, mp, u) -> (out, layer cache)``, the
    channel mixers are shared. ``last [B]``: keep only those positions' hidden states (rows of
    ``h [B,T,H]``) before the head. Returns ``(logits, cache)`` plus the experts used
    ``[*lead, L_moe, K]`` with ``return_routed_experts``."""
    cache, used = [], []
    for i, kind in enumerate(cfg.pattern):
        def mixer(mp, u, kind=kind, i=i):
            if kind in ("M", "*"):
                return sequence_mixer(kind, i, mp, u)
            out, ids = _channel_mixer(kind, mp, u, cfg)
            return out, {} if ids is None else {"_experts": ids}
        h, state = _block(params["layers"][i], h, cfg, mixer)
        if "_experts" in state:
            used.append(state.pop("_experts"))
        cache.append(state)
    if last is not None:
        h = h[jnp.arange(h.shape[0]), last]
    h = rms_norm(h, params["norm_f"], cfg.layer_norm_epsilon)
    out = (logits_from_hidden(params, h), cache)
    return out + (_stack_experts(used, lead, cfg),) if return_routed_experts else out


def prefill(params, tokens, cfg: ModelConfig, *, lengths=None, max_len: Optional[int] = None,
            last_only: bool = False, return_routed_experts: bool = False):
    """Run right-padded prompts ``tokens [B,T]`` (valid lengths ``lengths [B]``, default T) and
    return ``(logits [B,T,V], cache)`` with room for ``max_len`` (default T) tokens per row.
    ``last_only=True`` returns only each row's next-token logits ``[B,V]`` (at ``lengths - 1``),
    skipping the ``[B,T,V]`` head product that sampling does not need.
    Rows continue with :func:`decode_step` at ``positions = lengths``.
    ``return_routed_experts=True`` appends the experts used, ``[B, T, L_moe, K]`` int32 (entries
    at padded positions are meaningless)."""
    b, t = tokens.shape
    max_len = t if max_len is None else max_len
    if max_len < t:
        raise ValueError(f"prefill: max_len ({max_len}) < prompt length ({t})")
    valid = None if lengths is None else jnp.arange(t)[None, :] < lengths[:, None]

    def sequence_mixer(kind, i, mp, u):
        if kind == "M":
            return mamba_mixer(mp, u, cfg, valid=valid, return_state=True)
        out, (k, v) = attention_mixer(mp, u, cfg)
        pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
        return out, {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}

    last = None
    if last_only:
        last = (jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)) - 1
    return _cached_stack(params, params["embed"][tokens], cfg, sequence_mixer, lead=(b, t), last=last,
                         return_routed_experts=return_routed_experts)


def mamba_continue(p, u, state, valid, cfg: ModelConfig):
    """Mamba2 mixer over a chunk that continues ``state`` (the decode state after the tokens
    before it). u [B,T,H], valid [B,T] (a prefix per row) -> (out [B,T,H], new state).

    The conv reads the cached window first: ``xbc' = [conv (K-1 rows); xbc_in]`` and
    ``out_t = Σ_k w[k]·xbc'[t+k] + b``; the scan starts from ``h_0 = state["ssm"]``
    (``kernels.ssd(initial_state=...)``); padded positions have ``dt = 0`` so the state is
    untouched by them. The new conv window is the last ``K-1`` rows of ``xbc'`` up to the last
    valid token. With a zero state this equals :func:`mamba_mixer` exactly (zero padding)."""
    dtype = u.dtype
    n = cfg.conv_kernel - 1
    z, xbc_in, dt_raw = _mamba_in(p, u)
    full = jnp.concatenate([state["conv"].astype(xbc_in.dtype), xbc_in], axis=1)  # [B,n+T,C]
    conv = causal_conv(full, p["conv_w"], p["conv_b"], None)[:, n:]
    xbc = jax.nn.silu(conv)
    x, bm, cm = _split_xbc(xbc, cfg)
    dt = jnp.where(valid[..., None], _dt(p, dt_raw, cfg), 0.0)
    A = -jnp.exp(p["A_log"].astype(f32))
    y, ssm = kernels.ssd(x, dt, A, bm, cm, chunk_size=cfg.chunk_size,
                         initial_state=state["ssm"].astype(f32), impl=cfg.ssd_impl)
    out = _mamba_out(p, y, x, z, cfg, dtype)
    full_valid = jnp.concatenate([jnp.ones((u.shape[0], n), bool), valid], axis=1)
    return out, {"conv": _last_inputs(full, full_valid, n), "ssm": ssm}


def attention_continue(p, u, state, starts, valid, cfg: ModelConfig):
    """Attention over a chunk at positions ``starts[b] + [0, T)`` that continues the cached K/V
    ``state {"k","v": [B,S,Hkv,D]}`` (positions ``< starts`` filled). The chunk's K/V are written
    at their positions (positions ``>= S`` dropped), then query ``t`` attends every key at a
    position ``<= starts + t`` (cached keys and the chunk causally); keys past the row's valid
    end are masked. u [B,T,H] -> (out [B,T,H], new state)."""
    b, t = u.shape[:2]
    q, k, v = _qkv(p, u, cfg)
    pos = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B,T]
    bidx = jnp.arange(b)[:, None]
    kc = state["k"].at[bidx, pos].set(k.astype(state["k"].dtype), mode="drop")
    vc = state["v"].at[bidx, pos].set(v.astype(state["v"].dtype), mode="drop")
    s = kc.shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    end = starts + jnp.sum(valid, axis=1, dtype=jnp.int32)
    o = kernels.attention(q, kc.astype(q.dtype), vc.astype(q.dtype), q_positions=pos,
                          kv_positions=kv_pos, kv_valid=kv_pos < end[:, None],
                          impl=cfg.attention_impl)
    return o.reshape(b, t, -1) @ p["o_proj"], {"k": kc, "v": vc}


def prefill_continue(params, cache, tokens, starts, cfg: ModelConfig, *, lengths=None,
                     last_only: bool = False, return_routed_experts: bool = False):
    """Prefill a chunk that continues each row's cache (chunked prefill, multi-turn).

    ``cache``: per-row decode state after the first ``starts [B]`` tokens of each row (as left
    by :func:`prefill` / earlier calls / :func:`decode_step`; K/V ``[B,S,Hkv,D]``); ``tokens
    [B,T]`` right-padded, valid lengths ``lengths [B]`` (default T), occupying positions
    ``starts + [0, lengths)``. Returns ``(logits [B,T,V], cache)`` (``[B,V]`` at ``lengths - 1``
    with ``last_only``; plus the experts ``[B,T,L_moe,K]`` with ``return_routed_experts``) such
    that prefilling a sequence in chunks equals one :func:`prefill` of the whole (the split
    changes only summation order: the SSD scan's chunk boundaries)."""
    b, t = tokens.shape
    starts = starts.astype(jnp.int32)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    valid = jnp.arange(t)[None, :] < lengths[:, None]

    def sequence_mixer(kind, i, mp, u):
        if kind == "M":
            return mamba_continue(mp, u, cache[i], valid, cfg)
        return attention_continue(mp, u, cache[i], starts, valid, cfg)

    return _cached_stack(params, params["embed"][tokens], cfg, sequence_mixer, lead=(b, t),
                         last=jnp.maximum(lengths - 1, 0) if last_only else None,
                         return_routed_experts=return_routed_experts)


def decode_step(params, cache, tokens, positions, cfg: ModelConfig, *,
                return_routed_experts: bool = False):
    """One token per row: ``tokens [B]`` at ``positions [B]`` -> ``(logits [B,V], cache)``
    (and the experts used, ``[B, L_moe, K]`` int32, when ``return_routed_experts``)."""
    positions = positions.astype(jnp.int32)

    def sequence_mixer(kind, i, mp, u):
        if kind == "M":
            return mamba_step(mp, u, cache[i], cfg)
        return attention_step(mp, u, cache[i], positions, cfg)

    return _cached_stack(params, params["embed"][tokens], cfg, sequence_mixer, lead=tokens.shape,
                         return_routed_experts=return_routed_experts)
