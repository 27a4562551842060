"""Grouped matmul over expert-sorted rows: XLA reference (what CPU runs).

``gmm(lhs [M, K], rhs [E, K, N], group_sizes [E]) -> [M, N]`` where rows
``[off_e, off_e + group_sizes[e])`` of ``lhs`` (``off`` = exclusive cumsum) are multiplied by
``rhs[e]``; rows past ``sum(group_sizes)`` produce zeros. ``tgmm(lhs [M, K], dout [M, N],
group_sizes) -> [E, K, N]`` is the transposed grouped matmul (the weight gradient).

Memory stays O(M·(K+N)): the work is a loop over "visits" — (row tile, group) pairs, at most
``ceil(M / tile) + E - 1`` of them — each a ``[tile, K] × [K, N]`` matmul whose rows outside the
group are masked. Never ``lax.ragged_dot`` (it expands densely over all experts on CPU/GPU) and
never an all-experts dense product. Gradients use the same loops (custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["gmm", "tgmm", "group_offsets", "visit_schedule"]


def group_offsets(group_sizes):
    """``(starts [E], ends [E])`` row ranges of the groups (int32)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    return ends - sizes, ends


def visit_schedule(group_sizes: jax.Array, m: int, tile: int):
    """Static-length schedule of (tile, group) visits covering every row once.

    Returns ``(tile_ids [V], group_ids [V], valid [V])`` with ``V = ceil(m/tile) + E - 1``;
    visits are ordered by group, then tile. Empty groups get no visit.
    """
    e = group_sizes.shape[0]
    num_tiles = -(-m // tile)
    v = num_tiles + e - 1
    sizes = group_sizes.astype(jnp.int32)
    starts, ends = group_offsets(sizes)
    first = starts // tile
    last = (jnp.maximum(ends, 1) - 1) // tile
    n_visits = jnp.where(sizes > 0, last - first + 1, 0)
    cum = jnp.cumsum(n_visits)
    idx = jnp.arange(v, dtype=jnp.int32)
    gid = jnp.minimum(jnp.searchsorted(cum, idx, side="right"), e - 1).astype(jnp.int32)
    tid = first[gid] + idx - (cum[gid] - n_visits[gid])
    valid = idx < cum[-1]
    return jnp.where(valid, tid, 0), gid, valid


def _row_mask(starts, ends, gid, tid, tile, valid):
    rows = tid * tile + jnp.arange(tile)
    return (rows >= starts[gid]) & (rows < ends[gid]) & valid


def _tile_for(m: int, tile: int) -> int:
    return max(1, min(tile, m))


def _gmm_fwd_impl(lhs, rhs, group_sizes, tile, out_dtype):
    m, k = lhs.shape
    n = rhs.shape[-1]
    tile = _tile_for(m, tile)
    num_tiles = -(-m // tile)
    mp = num_tiles * tile
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    tids, gids, valid = visit_schedule(group_sizes, m, tile)
    starts, ends = group_offsets(group_sizes)

    def body(i, out):
        t, g = tids[i], gids[i]
        x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)
        y = jnp.dot(x, rhs[g], preferred_element_type=jnp.float32)
        mask = _row_mask(starts, ends, g, t, tile, valid[i])
        cur = jax.lax.dynamic_slice_in_dim(out, t * tile, tile, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, cur + jnp.where(mask[:, None], y, 0.0), t * tile, 0)

    out = jax.lax.fori_loop(0, tids.shape[0], body, jnp.zeros((mp, n), jnp.float32))
    return out[:m].astype(out_dtype)


def _tgmm_impl(lhs, dout, group_sizes, tile, out_dtype):
    m, k = lhs.shape
    n = dout.shape[-1]
    e = group_sizes.shape[0]
    tile = _tile_for(m, tile)
    num_tiles = -(-m // tile)
    mp = num_tiles * tile
    lhs_p = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    dout_p = jnp.pad(dout, ((0, mp - m), (0, 0)))
    tids, gids, valid = visit_schedule(group_sizes, m, tile)
    starts, ends = group_offsets(group_sizes)

    def body(i, acc):
        t, g = tids[i], gids[i]
        mask = _row_mask(starts, ends, g, t, tile, valid[i])
        x = jax.lax.dynamic_slice_in_dim(lhs_p, t * tile, tile, 0)
        dy = jax.lax.dynamic_slice_in_dim(dout_p, t * tile, tile, 0)
        x = jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
        contrib = jnp.dot(x.T, dy, preferred_element_type=jnp.float32)
        return acc.at[g].add(contrib)

    acc = jax.lax.fori_loop(0, tids.shape[0], body, jnp.zeros((e, k, n), jnp.float32))
    return acc.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, tile):
    return _gmm_fwd_impl(lhs, rhs, group_sizes, tile, lhs.dtype)


def _gmm_fwd(lhs, rhs, group_sizes, tile):
    return _gmm(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _gmm_bwd(tile, res, dout):
    lhs, rhs, group_sizes = res
    dlhs = _gmm_fwd_impl(dout, jnp.swapaxes(rhs, 1, 2), group_sizes, tile, lhs.dtype)
    drhs = _tgmm_impl(lhs, dout, group_sizes, tile, rhs.dtype)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 128) -> jax.Array:
    """``out[r] = lhs[r] @ rhs[group(r)]`` for expert-sorted rows; fp32 accumulation, output in
    ``lhs.dtype``. Differentiable in ``lhs`` and ``rhs``."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] or group_sizes.shape != rhs.shape[:1]:
        raise ValueError(f"gmm: bad shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), tile)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, tile: int = 128) -> jax.Array:
    """``out[e] = lhs[rows_e].T @ dout[rows_e]`` -> ``[E, K, N]`` (fp32 accumulation)."""
    return _tgmm_impl(lhs, dout, group_sizes.astype(jnp.int32), tile, lhs.dtype)
