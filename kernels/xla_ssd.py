"""Mamba2 chunked SSD (state-space duality) scan: XLA reference (what CPU runs).

``ssd(x [B, T, H, P], dt [B, T, H], A [H], Bm [B, T, G, N], Cm [B, T, G, N], *, chunk_size,
segment_ids [B, T] | None, initial_state [B, H, P, N] | None) -> (y [B, T, H, P], final_state)``

Computes (fp32 throughout), per head h with group ``g = h // (H/G)``::

    a_t = dt_t · A_h   (≤ 0),   x̄_t = dt_t · x_t
    S_t = exp(a_t) · S_{t-1} + x̄_t ⊗ B_t         (S is [P, N]; S_{-1} = initial_state)
    y_t = S_t · C_t

with the state reset (``S_{t-1}`` dropped) where ``segment_ids[t] != segment_ids[t-1]``.
No ``D`` skip term (the caller adds ``D·x``). Positions with ``dt = 0`` leave the state
unchanged, which is how padding is expressed.

Chunked evaluation with chunk length Q and ``Acum`` the in-chunk inclusive cumsum of ``a``:
intra-chunk ``Y_diag[l] = Σ_{s≤l, same segment} (C_l·B_s) exp(Acum_l − Acum_s) x̄_s``, the state
entering the chunk contributes ``Y_off[l] = exp(Acum_l) C_l·S_in`` (if no reset in [start, l]),
and the chunk-end state is ``S_out = exp(Acum_last)·S_in + Σ_s exp(Acum_last − Acum_s) x̄_s ⊗ B_s``.
Chunks are visited by ``lax.scan`` (O(T) memory, no O(chunks²) matrix), with the body
rematerialised in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ssd", "segment_resets"]


def segment_resets(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` bool: True where a new segment starts (never at t = 0)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


def _chunk(x, dt, A, Bm, Cm, rc, s_in):
    """One chunk. x [B,Q,G,R,P] (already dt·x), a [B,Q,G,R], Bm/Cm [B,Q,G,N], rc [B,Q] in-chunk
    reset count (inclusive), s_in [B,G,R,P,N]."""
    a = dt * A  # [B,Q,G,R]
    acum = jnp.cumsum(a, axis=1)
    q = x.shape[1]
    causal = jnp.tril(jnp.ones((q, q), bool))
    same = rc[:, :, None] == rc[:, None, :]  # [B,l,s]
    mask = causal[None] & same  # [B,l,s]
    diff = acum[:, :, None] - acum[:, None, :]  # [B,l,s,G,R]
    L = jnp.exp(jnp.where(mask[..., None, None], diff, -jnp.inf))
    cb = jnp.einsum("blgn,bsgn->blsg", Cm, Bm)
    y_diag = jnp.einsum("blsg,blsgr,bsgrp->blgrp", cb, L, x)
    no_reset = rc == 0  # [B,Q]: no reset in [start, l]
    decay_in = jnp.exp(acum) * no_reset[..., None, None]
    y_off = jnp.einsum("blgn,bgrpn,blgr->blgrp", Cm, s_in, decay_in)
    last = acum[:, -1]  # [B,G,R]
    to_end = jnp.exp(last[:, None] - acum) * (rc == rc[:, -1:])[..., None, None]
    st = jnp.einsum("bsgr,bsgn,bsgrp->bgrpn", to_end, Bm, x)
    carry = jnp.exp(last) * (rc[:, -1] == 0)[:, None, None]
    s_out = carry[..., None, None] * s_in + st
    return y_diag + y_off, s_out


def ssd(x, dt, A, Bm, Cm, *, chunk_size, segment_ids=None, initial_state=None):
    b, t, h, p = x.shape
    g, n = Bm.shape[2], Bm.shape[3]
    if h % g:
        raise ValueError(f"ssd: {h} heads not a multiple of {g} groups")
    r = h // g
    q = chunk_size
    pad = (-t) % q
    nc = (t + pad) // q
    f32 = jnp.float32
    dt = dt.astype(f32)
    xb = x.astype(f32) * dt[..., None]  # x̄ = dt·x
    resets = (jnp.zeros((b, t), bool) if segment_ids is None else segment_resets(segment_ids))

    def chunks(z, fill=0):
        z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2), constant_values=fill)
        return jnp.moveaxis(z.reshape(b, nc, q, *z.shape[2:]), 1, 0)  # [nc, B, Q, ...]

    xs = chunks(xb.reshape(b, t, g, r, p))
    dts = chunks(dt.reshape(b, t, g, r))
    bs = chunks(Bm.astype(f32))
    cs = chunks(Cm.astype(f32))
    rcs = jnp.cumsum(chunks(resets.astype(jnp.int32)), axis=2)
    A_ = A.astype(f32).reshape(g, r)
    if initial_state is None:
        s0 = jnp.zeros((b, g, r, p, n), f32)
    else:
        s0 = initial_state.astype(f32).reshape(b, g, r, p, n)

    @jax.checkpoint
    def step(s, inp):
        xc, dtc, bc, cc, rcc = inp
        y, s = _chunk(xc, dtc, A_, bc, cc, rcc, s)
        return s, y

    s_final, ys = jax.lax.scan(step, s0, (xs, dts, bs, cs, rcs))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, nc * q, h, p)[:, :t]
    return y, s_final.reshape(b, h, p, n)
