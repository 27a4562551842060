"""Expert-parallel MoE: routed experts split over the ``expert`` mesh axis, tokens exchanged.

Local-expert contract. Each device holds ``E_loc = E / ep`` experts (``experts`` weights rule)
and its own tokens (the batch / sequence rules). Inside ``shard_map``, per device:

1. the ``n·k`` (token, choice) copies are sorted by global expert id, so copies for expert
   shard ``s`` (experts ``[s·E_loc, (s+1)·E_loc)``) are contiguous;
2. **dropless padded all-to-all** (the path that runs everywhere, CPU included, where the ragged
   collective is unimplemented): every device sends an ``[ep, n·k, H]`` buffer whose block ``s``
   holds its copies for shard ``s`` (padded to ``n·k`` rows, the worst case: every copy to one
   shard, so nothing is ever dropped) and the local expert id of each row (-1 = padding);
3. the received rows are sorted by local expert and run through the model's
   ``expert_ffn(rows, group_sizes, up, down)`` (the grouped matmuls; padding rows sort last,
   past ``Σ group_sizes``, and come out zero); with a ``tensor`` axis on the expert width the
   down-projection partial sums are ``psum``-ed;
4. the outputs return by the reverse all-to-all into the same slots and are combined with the
   router weights in fp32 (``moe_dispatch.unpermute``), exactly as the unsharded layer.

The padded exchange moves ``ep`` times the rows a ragged exchange would; a ragged all-to-all
(``jax.lax.ragged_all_to_all``) for GPU/TPU is future work. Routing (and the shared expert)
stay outside, in the global program.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from kernels import moe_dispatch

from .mesh import mesh_shape
from .rules import RULES, Rules

__all__ = ["expert_parallel_moe", "make_expert_parallel"]


def _active(axes, shape):
    return tuple(a for a in axes if shape.get(a, 1) > 1)


def _spec_axes(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def expert_parallel_moe(mesh: Mesh, rules: Rules, x, w, idx, up, down, expert_ffn: Callable):
    """``x [n, H]``, router ``w [n, k]`` / ``idx [n, k]``, ``up [E, H, I]``, ``down [E, I, H]``
    -> the routed-expert output ``[n, H]`` (``x.dtype``), computed expert-parallel."""
    shape = mesh_shape(mesh)
    ep_axes = _active(rules.weights["experts"], shape)
    tp_axes = _active(rules.weights["expert_mlp"], shape)
    tok_axes = _active(tuple(rules.activations["batch"]) + tuple(rules.activations["seq"]), shape)
    ep = 1
    for a in ep_axes:
        ep *= shape[a]
    n_exp = up.shape[0]
    e_loc = n_exp // ep
    ep_name = ep_axes if len(ep_axes) != 1 else ep_axes[0]

    def local(x, w, idx, up, down):
        n, k = idx.shape
        m = n * k
        hid = x.shape[-1]
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)
        e_sorted = flat[order]
        dest = e_sorted // e_loc  # [m] target shard, non-decreasing
        counts = jnp.bincount(dest, length=ep)
        starts = jnp.cumsum(counts) - counts
        slot = jnp.arange(m, dtype=jnp.int32) - starts[dest]
        xs = moe_dispatch.permute(x, order, k)
        send = jnp.zeros((ep, m, hid), x.dtype).at[dest, slot].set(xs)
        send_ids = jnp.full((ep, m), -1, jnp.int32).at[dest, slot].set(e_sorted % e_loc)
        recv = jax.lax.all_to_all(send, ep_name, 0, 0, tiled=True)
        recv_ids = jax.lax.all_to_all(send_ids, ep_name, 0, 0, tiled=True)
        rows = recv.reshape(ep * m, hid)
        key = jnp.where(recv_ids.reshape(-1) < 0, e_loc, recv_ids.reshape(-1))
        order2, sizes = moe_dispatch.sort_by_expert(key[:, None], e_loc + 1)
        ys = expert_ffn(rows[order2], sizes[:e_loc], up, down)
        if tp_axes:
            ys = jax.lax.psum(ys, tp_axes)
        back = jnp.zeros_like(ys).at[order2].set(ys).reshape(ep, m, -1)
        back = jax.lax.all_to_all(back, ep_name, 0, 0, tiled=True)
        return moe_dispatch.unpermute(back[dest, slot], order, w, out_dtype=x.dtype)

    tok = P(_spec_axes(tok_axes))
    exp_up = P(_spec_axes(ep_axes), None, _spec_axes(tp_axes))
    exp_down = P(_spec_axes(ep_axes), _spec_axes(tp_axes), None)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp_up, exp_down), out_specs=tok,
                         check_vma=False)(x, w, idx, up, down)


def make_expert_parallel(mesh: Mesh, rules: Rules = RULES):
    """The model's expert-parallel hook for ``mesh`` (None when the experts are not split)."""
    shape = mesh_shape(mesh)
    if not _active(rules.weights["experts"], shape):
        return None
    return functools.partial(expert_parallel_moe, mesh, rules)
