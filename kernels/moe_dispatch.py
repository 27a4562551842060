"""Permutation helpers around the grouped matmul: sort token copies by expert and back.

For ``n`` tokens routed to ``k`` experts each (``expert_ids [n, k]``) the ``n·k`` copies are
sorted by expert (stable, so copies of one expert keep token order)::

    order = argsort(expert_ids.ravel())            # [n·k], sorted slot -> flat (token, j) index
    xs    = x[order // k]                          # [n·k, H] expert-sorted rows
    group_sizes[e] = #{(t, j) : expert_ids[t, j] = e}
    out[t] = Σ_j w[t, j] · ys[inv_order[t·k + j]]  # fp32 accumulation (unpermute)

Optionally each group is padded to a multiple of a row tile (``padded_layout``), so that no row
tile of the grouped matmul straddles two experts (every tile is one full matmul; padding rows
are zeros and cost ``< E·tile`` extra rows). Expert widths that are not a multiple of the column
tile (1856 = 29·64 is not a multiple of 128) can be padded with :func:`pad_columns` (e.g. to
1920 = 15·128), or left alone: the kernels then pick 64-wide column tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import pad_to, round_up

__all__ = ["sort_by_expert", "permute", "unpermute", "padded_layout", "pad_columns"]


def sort_by_expert(expert_ids: jax.Array, num_experts: int):
    """``expert_ids [n, k]`` -> ``(order [n·k] int32, group_sizes [E] int32)``."""
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def permute(x: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """``x [n, H]`` -> expert-sorted copies ``[n·k, H]``."""
    return x[order // k]


def unpermute(ys: jax.Array, order: jax.Array, weights: jax.Array, out_dtype=None) -> jax.Array:
    """``ys [n·k, N]`` expert-sorted -> ``Σ_j weights[t, j]·y[t, j]`` as ``[n, N]`` (fp32 sum)."""
    n, k = weights.shape
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    out = jnp.sum(y.astype(jnp.float32) * weights.astype(jnp.float32)[..., None], axis=1)
    return out.astype(out_dtype or ys.dtype)


def padded_layout(group_sizes: jax.Array, num_rows: int, tile: int):
    """Row layout with every group starting on a tile boundary.

    Returns ``(dest [num_rows] int32, padded_group_sizes [E] int32, padded_rows)``: sorted row ``r``
    of group ``g`` goes to ``dest[r] = pstart[g] + r − start[g]`` where ``pstart`` is the exclusive
    cumsum of ``round_up(group_sizes, tile)``; ``padded_rows = round_up(num_rows + E·(tile−1), tile)``
    is a static bound. Rows ``>= sum(group_sizes)`` map past the used rows (dropped by callers).
    """
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + tile - 1) // tile * tile
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    pstarts = jnp.cumsum(padded) - padded
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)
    dest = pstarts[g] + rows - starts[g]
    bound = -(-(num_rows + e * (tile - 1)) // tile) * tile
    dest = jnp.where(rows < ends[-1], dest, bound)  # out of range -> dropped by .at[].set(mode="drop")
    return dest.astype(jnp.int32), padded.astype(jnp.int32), bound


def pad_columns(w: jax.Array, multiple: int, axis: int = -1) -> jax.Array:
    """Zero-pad ``axis`` of ``w`` up to a multiple (e.g. expert width 1856 -> 1920 for 128 tiles)."""
    return pad_to(w, axis, round_up(w.shape[axis], multiple))
