"""Mamba2 SSD chunked scan as one fused Pallas kernel per (batch, head), forward + backward.

Same contract as :func:`kernels.xla_ssd.ssd` (fp32 math, returns ``(y [B,T,H,P] fp32,
final_state [B,H,P,N] fp32)``)::

    S_t = exp(dt_t·A_h)·S_{t-1} + (dt_t·x_t) ⊗ B_t,   y_t = S_t·C_t,   S reset at segment starts.

The wrapper computes (plain JAX, differentiated by JAX) the in-chunk inclusive cumsum
``Acum = cumsum_chunk(dt·A)`` and the in-chunk reset counts ``rc``; the kernel walks the chunks of
one (b, h) sequentially, keeping the ``[P, N]`` state on chip. Per chunk (length Q, ``x̄ = dt·x``)::

    M[l,s]  = (s <= l) & (rc_l == rc_s)          Lm = M ∘ exp(Acum_l − Acum_s)
    G       = (C Bᵀ) ∘ Lm                         w_l = exp(Acum_l)·[rc_l = 0]
    e_s     = exp(Acum_Q − Acum_s)·[rc_s = rc_Q]  c = exp(Acum_Q)·[rc_Q = 0]
    y       = G x̄ + diag(w) C S_inᵀ
    S_out   = c·S_in + (diag(e) x̄)ᵀ B

The backward kernel runs the chunks in reverse with ``dS`` (the gradient of ``S_out``), re-using
the chunk-entry states the forward saved (``[B, H, T/Q, P, N]`` fp32)::

    dx̄   = Gᵀ dy + diag(e) B dSᵀ                 dG = dy x̄ᵀ,  Z = dG ∘ G
    dC   = (dG ∘ Lm) B + diag(w) dy S_in          dB = (dG ∘ Lm)ᵀ C + diag(e) x̄ dS
    dAcum = rowsum(Z) − colsum(Z) + w∘rowsum(dy ∘ C S_inᵀ) − e∘rowsum(x̄ ∘ B dSᵀ)
            + 1_{l=Q}·(Σ_s e_s·rowsum(x̄ ∘ B dSᵀ)_s + c·⟨dS, S_in⟩)
    dS_in = c·dS + (diag(w) dy)ᵀ C

Per-head ``dB``/``dC`` are summed over the heads of a group by the wrapper.

Context parallelism: :func:`ssd_context_parallel` (inside ``shard_map``, sequence sharded) runs
the local scan from a zero state, all-gathers each shard's ``(decay, final state, boundary reset)``
and combines them in order to get the true entering state ``E_i`` of every shard, then adds
its contribution ``y_t += exp(Σ_{u<=t} a_u)·[no reset in shard start..t]·C_t·E_i`` and returns
the global final state on every shard.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tuning
from ._common import on_cpu, pad_to, pallas_call, triton_params
from .xla_ssd import segment_resets

__all__ = ["ssd", "ssd_context_parallel"]

f32 = jnp.float32


def _dot_t(a, b):
    """a [X, K] · b [Y, K]ᵀ -> [X, Y] (fp32)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _tdot(a, b):
    """a [K, X]ᵀ · b [K, Y] -> [X, Y] (fp32)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _chunk_terms(acum, rc, q):
    """Lm [Q,Q], w [Q], e [Q], carry scalar, last-position one-hot [Q]."""
    li = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    si = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    mask = (si <= li) & (rc[:, None] == rc[None, :])
    diff = acum[:, None] - acum[None, :]
    lm = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
    onehot = jax.lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1
    a_last = jnp.sum(jnp.where(onehot, acum, 0.0))
    rc_last = jnp.sum(jnp.where(onehot, rc, 0))
    w = jnp.where(rc == 0, jnp.exp(acum), 0.0)
    e = jnp.where(rc == rc_last, jnp.exp(a_last - acum), 0.0)
    carry = jnp.where(rc_last == 0, jnp.exp(a_last), 0.0)
    return lm, w, e, carry, onehot


def _fwd_kernel(x_ref, dt_ref, acum_ref, b_ref, c_ref, rc_ref, s0_ref, y_ref, sf_ref, st_ref,
                *, q, nc, save_states):
    def body(ci, s):
        sl = pl.ds(ci * q, q)
        xb = x_ref[sl, :].astype(f32) * dt_ref[sl].astype(f32)[:, None]  # [Q, P]
        bm = b_ref[sl, :].astype(f32)
        cm = c_ref[sl, :].astype(f32)
        lm, w, e, carry, _ = _chunk_terms(acum_ref[sl], rc_ref[sl], q)
        g = _dot_t(cm, bm) * lm
        y = jnp.dot(g, xb, preferred_element_type=f32) + w[:, None] * _dot_t(cm, s)
        y_ref[sl, :] = y.astype(y_ref.dtype)
        if save_states:
            st_ref[ci] = s
        return carry * s + _tdot(xb * e[:, None], bm)

    sf_ref[...] = jax.lax.fori_loop(0, nc, body, s0_ref[...].astype(f32))


def _bwd_kernel(x_ref, dt_ref, acum_ref, b_ref, c_ref, rc_ref, st_ref, dy_ref, dsf_ref,
                dx_ref, ddt_ref, dacum_ref, db_ref, dc_ref, ds0_ref, *, q, nc):
    def body(i, ds):
        ci = nc - 1 - i
        sl = pl.ds(ci * q, q)
        xr = x_ref[sl, :].astype(f32)
        dtc = dt_ref[sl].astype(f32)
        xb = xr * dtc[:, None]
        bm = b_ref[sl, :].astype(f32)
        cm = c_ref[sl, :].astype(f32)
        s_in = st_ref[ci]
        dy = dy_ref[sl, :].astype(f32)
        lm, w, e, carry, onehot = _chunk_terms(acum_ref[sl], rc_ref[sl], q)
        cb = _dot_t(cm, bm)
        g = cb * lm
        bds = _dot_t(bm, ds)  # [Q, P]
        dxb = _tdot(g, dy) + e[:, None] * bds
        dg = _dot_t(dy, xb)  # [Q, Q]
        dcb = dg * lm
        z = dg * g
        cs = _dot_t(cm, s_in)  # [Q, P]
        dc = jnp.dot(dcb, bm, preferred_element_type=f32) + w[:, None] * jnp.dot(dy, s_in, preferred_element_type=f32)
        db = _tdot(dcb, cm) + jnp.dot(xb * e[:, None], ds, preferred_element_type=f32)
        de = jnp.sum(xb * bds, axis=1) * e
        dw = jnp.sum(dy * cs, axis=1) * w
        dcarry = jnp.sum(ds * s_in) * carry
        dacum = (jnp.sum(z, axis=1) - jnp.sum(z, axis=0) + dw - de
                 + jnp.where(onehot, jnp.sum(de) + dcarry, 0.0))
        dx_ref[sl, :] = (dxb * dtc[:, None]).astype(dx_ref.dtype)
        ddt_ref[sl] = jnp.sum(dxb * xr, axis=1)
        dacum_ref[sl] = dacum
        db_ref[sl, :] = db
        dc_ref[sl, :] = dc
        return carry * ds + _tdot(dy * w[:, None], cm)

    ds0_ref[...] = jax.lax.fori_loop(0, nc, body, dsf_ref[...].astype(f32))


def _specs(tp, p, n, rep):
    seq_x = pl.BlockSpec((None, tp, None, p), lambda b, h: (b, 0, h, 0))
    seq_h = pl.BlockSpec((None, tp, None), lambda b, h: (b, 0, h))
    seq_g = pl.BlockSpec((None, tp, None, n), lambda b, h: (b, 0, h // rep, 0))
    seq_hn = pl.BlockSpec((None, tp, None, n), lambda b, h: (b, 0, h, 0))
    seq_b = pl.BlockSpec((None, tp), lambda b, h: (b, 0))
    state = pl.BlockSpec((None, None, p, n), lambda b, h: (b, h, 0, 0))
    return seq_x, seq_h, seq_g, seq_hn, seq_b, state


def _fwd_call(x, dt, acum, bm, cm, rc, s0, cfg, save_states):
    q, interpret, warps_fwd, _ = cfg
    b, tp, h, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    nc = tp // q
    seq_x, seq_h, seq_g, _, seq_b, state = _specs(tp, p, n, h // g)
    st_shape = (b, h, nc, p, n) if save_states else (1, 1, 1, p, n)
    st_spec = (pl.BlockSpec((None, None, nc, p, n), lambda b_, h_: (b_, h_, 0, 0, 0)) if save_states
               else pl.BlockSpec((None, None, 1, p, n), lambda b_, h_: (0, 0, 0, 0, 0)))
    flops = b * h * nc * (2 * q * q * n + 2 * q * q * p + 4 * q * p * n)
    return pallas_call(
        functools.partial(_fwd_kernel, q=q, nc=nc, save_states=save_states),
        grid=(b, h),
        in_specs=[seq_x, seq_h, seq_h, seq_g, seq_g, seq_b, state],
        out_specs=[seq_x, state, st_spec],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, p), f32), jax.ShapeDtypeStruct((b, h, p, n), f32),
                   jax.ShapeDtypeStruct(st_shape, f32)],
        interpret=interpret,
        compiler_params=triton_params(interpret, warps_fwd, 1),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * h * tp * (q + 2),
                                      bytes_accessed=x.nbytes + 4 * b * tp * h * p + h // g * (bm.nbytes + cm.nbytes)),
        name="ssd_fwd",
    )(x, dt, acum, bm, cm, rc, s0)


def _bwd_call(x, dt, acum, bm, cm, rc, states, dy, dsf, cfg):
    q, interpret, _, warps_bwd = cfg
    b, tp, h, p = x.shape
    g, n = bm.shape[2], bm.shape[3]
    nc = tp // q
    seq_x, seq_h, seq_g, seq_hn, seq_b, state = _specs(tp, p, n, h // g)
    st_spec = pl.BlockSpec((None, None, nc, p, n), lambda b_, h_: (b_, h_, 0, 0, 0))
    flops = b * h * nc * (6 * q * q * n + 6 * q * q * p + 12 * q * p * n)
    return pallas_call(
        functools.partial(_bwd_kernel, q=q, nc=nc),
        grid=(b, h),
        in_specs=[seq_x, seq_h, seq_h, seq_g, seq_g, seq_b, st_spec, seq_x, state],
        out_specs=[seq_x, seq_h, seq_h, seq_hn, seq_hn, state],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, tp, h), f32),
                   jax.ShapeDtypeStruct((b, tp, h), f32), jax.ShapeDtypeStruct((b, tp, h, n), f32),
                   jax.ShapeDtypeStruct((b, tp, h, n), f32), jax.ShapeDtypeStruct((b, h, p, n), f32)],
        interpret=interpret,
        compiler_params=triton_params(interpret, warps_bwd, 1),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * h * tp * (q + 2),
                                      bytes_accessed=2 * x.nbytes + 8 * b * tp * h * (p + n) + states.nbytes),
        name="ssd_bwd",
    )(x, dt, acum, bm, cm, rc, states, dy, dsf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd_core(x, dt, acum, bm, cm, rc, s0, cfg):
    y, sf, _ = _fwd_call(x, dt, acum, bm, cm, rc, s0, cfg, save_states=False)
    return y, sf


def _ssd_core_fwd(x, dt, acum, bm, cm, rc, s0, cfg):
    y, sf, states = _fwd_call(x, dt, acum, bm, cm, rc, s0, cfg, save_states=True)
    return (y, sf), (x, dt, acum, bm, cm, rc, states)


def _ssd_core_bwd(cfg, res, cts):
    x, dt, acum, bm, cm, rc, states = res
    dy, dsf = cts
    dx, ddt, dacum, db_h, dc_h, ds0 = _bwd_call(x, dt, acum, bm, cm, rc, states, dy, dsf, cfg)
    b, tp, h, _ = x.shape
    g, n = bm.shape[2], bm.shape[3]
    db = db_h.reshape(b, tp, g, h // g, n).sum(axis=3).astype(bm.dtype)
    dc = dc_h.reshape(b, tp, g, h // g, n).sum(axis=3).astype(cm.dtype)
    return dx, ddt.astype(dt.dtype), dacum, db, dc, None, ds0


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def _prepare(x, dt, A, Bm, Cm, chunk_size, segment_ids):
    """Pads T to a multiple of Q; returns padded inputs, in-chunk Acum [B,Tp,H] and rc [B,Tp]."""
    b, t, h, p = x.shape
    q = chunk_size
    pad = (-t) % q
    tp = t + pad

    def padt(z):
        return pad_to(z, 1, tp)

    dt = padt(dt.astype(f32))
    a = dt * A.astype(f32)[None, None, :]
    acum = jnp.cumsum(a.reshape(b, tp // q, q, h), axis=2).reshape(b, tp, h)
    resets = jnp.zeros((b, t), bool) if segment_ids is None else segment_resets(segment_ids)
    rc = jnp.cumsum(padt(resets.astype(jnp.int32)).reshape(b, tp // q, q), axis=2).reshape(b, tp)
    return padt(x), dt, acum, padt(Bm), padt(Cm), rc


def ssd(x, dt, A, Bm, Cm, *, chunk_size, segment_ids=None, initial_state=None,
        interpret: Optional[bool] = None, num_warps_fwd: Optional[int] = None,
        num_warps_bwd: Optional[int] = None):
    """Pallas SSD scan (see module docstring). Returns ``(y [B,T,H,P] fp32, final [B,H,P,N] fp32)``.

    ``num_warps_fwd`` / ``num_warps_bwd`` (compiled Triton launches): default from the tuning
    table (``ssd`` at ``(t, p, n)``, :func:`kernels.tuning.lookup`), else 4 / 8."""
    b, t, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    if h % g:
        raise ValueError(f"ssd: {h} heads not a multiple of {g} groups")
    interpret = on_cpu() if interpret is None else interpret
    xp, dtp, acum, bp, cp, rc = _prepare(x, dt, A, Bm, Cm, chunk_size, segment_ids)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    tuned = tuning.lookup("ssd", t=t, p=p, n=n)
    cfg = (chunk_size, interpret, num_warps_fwd or tuned.get("num_warps_fwd", 4),
           num_warps_bwd or tuned.get("num_warps_bwd", 8))
    y, sf = _ssd_core(xp, dtp, acum, bp, cp, rc, s0, cfg)
    return y[:, :t], sf


# ------------------------------------------------------------------------------------------
# Context parallelism: cross-device state passing


def ssd_context_parallel(x, dt, A, Bm, Cm, *, axis_name: str, chunk_size, segment_ids=None,
                         initial_state=None, ssd_fn=None, **kw):
    """Call inside ``shard_map`` with the sequence (dim 1) sharded over ``axis_name`` in order.

    With shard ``i`` holding tokens ``[i·T_l, (i+1)·T_l)``: ``F_i, y_i`` = local scan from zero;
    ``d_i = exp(Σ_shard a)·[no reset inside shard i]`` (``[B, H]``); ``r_i`` = a segment starts
    at the shard's first token. Entering states ``E_0 = initial_state``,
    ``E_i = (1 − r_i)·(d_{i−1}·E_{i−1} + F_{i−1})``; the output correction is
    ``y_t += exp(cumsum(a)_t)·[no reset in [start, t]]·(C_t · E_i)`` and the final state
    ``d_last·E_last + F_last`` (returned on every shard). ``initial_state`` is read on shard 0
    only. ``ssd_fn`` defaults to this module's Pallas scan (any ``ssd`` signature works).
    """
    ssd_fn = ssd_fn or ssd
    b, t, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    idx = jax.lax.axis_index(axis_name)
    nsh = jax.lax.axis_size(axis_name)  # static
    y, fin = ssd_fn(x, dt, A, Bm, Cm, chunk_size=chunk_size, segment_ids=segment_ids, **kw)
    a = dt.astype(f32) * A.astype(f32)  # [B, T, H]
    cum = jnp.cumsum(a, axis=1)
    if segment_ids is None:
        inner_reset = jnp.zeros((b, t), bool)
        boundary = jnp.zeros((b,), bool)
    else:
        inner_reset = segment_resets(segment_ids)
        prev_last = jax.lax.ppermute(segment_ids[:, -1], axis_name,
                                     [(i, (i + 1) % nsh) for i in range(nsh)])
        boundary = (idx > 0) & (prev_last != segment_ids[:, 0])
    no_reset = jnp.cumsum(inner_reset.astype(jnp.int32), axis=1) == 0  # [B, T]
    decay = jnp.exp(cum[:, -1]) * no_reset[:, -1][:, None]  # [B, H]
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    all_d = jax.lax.all_gather(decay, axis_name)  # [nsh, B, H]
    all_f = jax.lax.all_gather(fin, axis_name)  # [nsh, B, H, P, N]
    all_r = jax.lax.all_gather(boundary, axis_name)  # [nsh, B]
    s0_first = jax.lax.all_gather(s0, axis_name)[0]

    entering_all = [s0_first]  # E_0 .. E_{nsh-1}, static loop (differentiable)
    for i in range(nsh - 1):
        nxt = all_d[i][..., None, None] * entering_all[-1] + all_f[i]
        entering_all.append(jnp.where(all_r[i + 1][:, None, None, None], 0.0, nxt))
    entering = jnp.stack(entering_all)[idx]
    w = jnp.exp(cum) * no_reset[..., None]  # [B, T, H]
    cm = Cm.astype(f32).reshape(b, t, g, 1, n)
    e_g = entering.reshape(b, g, h // g, p, n)
    corr = jnp.einsum("btgn,bgrpn->btgrp", cm[:, :, :, 0], e_g).reshape(b, t, h, p) * w[..., None]
    final = all_d[nsh - 1][..., None, None] * entering_all[-1] + all_f[nsh - 1]
    return y + corr, final
