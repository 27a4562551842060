"""The MoE's sharded dispatch: token-local on data / fsdp / context meshes, expert-parallel
with an ``expert`` axis. Both are installed as the model's MoE hook (:func:`make_moe_dispatch`,
read by ``models/nemotron_h/model.py::moe_mixer``) with the signature
``hook(x [n, H], w [n, k], idx [n, k], up [E, H, I], down [E, I, H], expert_ffn) -> [n, H]``;
routing (and the shared expert) stay outside, in the global program.

Token-local dispatch (no ``expert`` axis, tokens split over ``data`` / ``fsdp`` / ``context``).
Every token's output depends only on that token and the expert weights, so each device can
sort, permute and multiply its own ``n_loc = n / (data·fsdp·context)`` tokens. Inside
``shard_map`` over the token axes, per device::

    order, counts = sort_by_expert(idx_loc)                 # [m_loc = n_loc·k], [E]
    ys  = expert_ffn(x_loc[order // k], counts, up, down)   # [m_loc, H] grouped matmuls
    out = Σ_j w_loc[t, j] · ys[inv_order[t·k + j]]           # fp32 (moe_dispatch.unpermute)

against the full expert weights: ``up`` / ``down`` enter unsplit along their fsdp-sharded
hidden dim, so the compiler all-gathers them from their fsdp shards before the layer (what
FSDP does for every weight) and reduce-scatters their gradients after it. With a ``tensor``
axis on the expert width (``expert_mlp``) each device holds ``I / tp`` columns; the
down-projection's partial sums are combined after the unpermute, in fp32, by a ``psum`` over
the tensor axes (``[n_loc, H]``, k times fewer rows than ``ys``). Without this hook the compiler
all-gathers the tokens and every device sorts and multiplies the *global* batch (the
planner's temporaries then grow with the device count, see docs/sharding.md). The trade: every
device holds one layer's gathered experts (``2·E·H·I`` elements) and their gradients while the
layer runs, instead of ``n·k`` global token rows; with few tokens per device (the tiny model's
tests) the global dispatch needs less memory, at the 30B's 8K tokens per device far more.
(Gathering inside the body instead, ``all_gather`` on the fsdp shards with a reduce-scatter as
its transpose, planned 48 GiB more temporaries for the 30B without remat — the gathered
weights are kept for the backward of every layer — and 2 GiB less with full remat.)

Expert-parallel dispatch (``expert`` axis > 1). Local-expert contract: each device holds
``E_loc = E / ep`` experts (``experts`` weights rule)
and its own tokens (the batch / sequence rules). Inside ``shard_map``, per device (``n`` tokens,
``k`` choices, ``m = n·k`` token copies, ``H`` hidden):

1. the ``m`` copies are sorted by global expert id (:func:`dispatch`), so the copies for expert
   shard ``d`` (experts ``[d·E_loc, (d+1)·E_loc)``) are one contiguous run of ``C[me, d]`` rows;
2. they are exchanged by one of two dropless all-to-alls (``a2a``):

   * ``"ragged"`` (GPU/TPU; :func:`jax.lax.ragged_all_to_all` is unimplemented on XLA:CPU):
     the per-expert counts ``[E]`` of every device are all-gathered (``[ep, E]``, a few hundred
     integers) and :func:`ragged_plan` turns them into the collective's offsets and sizes. Only
     the real rows move; the receive buffer has the static worst-case size ``ep·m`` (every
     device sending all its copies to one shard), so nothing is ever dropped;
   * ``"padded"`` (everywhere, CPU included: the tested path): every device sends an
     ``[ep, m, H]`` buffer whose block ``d`` holds its copies for shard ``d`` padded to ``m``
     rows, plus the local expert id of each row (``E_loc`` = padding). It moves ``ep`` times the rows
     of the ragged exchange;
3. the received rows are sorted by local expert (padding last) and run through the model's
   ``expert_ffn(rows, group_sizes, up, down)`` (the grouped matmuls; rows past
   ``Σ group_sizes`` come out zero); with a ``tensor`` axis on the expert width the
   down-projection partial sums are ``psum``-ed;
4. the outputs return by the reverse exchange into the senders' slots and are combined with the
   router weights in fp32 (``moe_dispatch.unpermute``), exactly as the unsharded layer.

``a2a="auto"`` (the config's ``mesh.a2a``) picks ``ragged`` when the mesh's devices are GPUs or TPUs and ``padded`` on CPU
(:func:`.mesh.resolve_a2a`). Routing (and the shared expert) stay outside, in the global program.

Verification status: the token-local and the padded paths are checked numerically on
simulated CPU devices (tests/test_sharding_moe.py). The ragged path cannot compile on CPU; its offsets/sizes
(:func:`ragged_plan`) are checked against a numpy emulation of the collective's documented
semantics, the whole ragged algorithm (dispatch → plan → exchange → experts → reverse exchange
→ combine) is checked against the unsharded layer with that emulated collective standing in
for the real one, and the ``shard_map`` program (forward and backward) is checked to lower to
StableHLO on CPU. It has not been run on a GPU or TPU.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from cascade_jax.config import A2A_MODES
from kernels import moe_dispatch

from .mesh import mesh_shape, resolve_a2a
from .rules import RULES, Rules

__all__ = ["make_moe_dispatch", "token_local_moe", "expert_parallel_moe", "make_expert_parallel",
           "resolve_a2a", "ragged_plan", "RaggedPlan", "dispatch", "A2A_MODES"]


def _active(axes, shape):
    return tuple(a for a in axes if shape.get(a, 1) > 1)


def _spec_axes(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


# --------------------------------------------------------------------------------------------
# The pieces of the exchange (pure; the shard_map bodies below compose them with collectives)


def dispatch(x, idx, num_experts: int):
    """``x [n, H]``, ``idx [n, k]`` -> ``(order [m], xs [m, H], counts [E])``: the ``m = n·k``
    copies sorted (stably) by global expert, ``xs = x[order // k]``, ``counts[e]`` copies of
    expert ``e``."""
    order, counts = moe_dispatch.sort_by_expert(idx, num_experts)
    return order, moe_dispatch.permute(x, order, idx.shape[1]), counts


class RaggedPlan(NamedTuple):
    """Arguments of the two ``ragged_all_to_all`` calls of one device (all int32).

    Forward (tokens to experts): ``ragged_all_to_all(xs, zeros[R, H], input_offsets,
    send_sizes, output_offsets, recv_sizes)``. Reverse (results back):
    ``ragged_all_to_all(ys, zeros[m, H], recv_offsets, recv_sizes, back_output_offsets,
    send_sizes)``."""

    input_offsets: jax.Array  # [ep] where my rows for shard d start in my sorted xs
    send_sizes: jax.Array  # [ep] my rows for shard d
    output_offsets: jax.Array  # [ep] where my rows land in shard d's receive buffer
    recv_sizes: jax.Array  # [ep] rows I receive from shard s
    recv_offsets: jax.Array  # [ep] where shard s's rows land in my receive buffer
    back_output_offsets: jax.Array  # [ep] where shard s's rows started in s's sorted xs
    recv_local_expert: jax.Array  # [R] local expert of each received row (E_loc = no row)
    recv_group_sizes: jax.Array  # [E_loc] received rows per local expert


def ragged_plan(all_counts, me, recv_rows: int) -> RaggedPlan:
    """Offsets and sizes of the ragged exchange from the all-gathered counts.

    ``all_counts [ep, E]``: ``all_counts[s, e]`` = copies device ``s`` routes to global expert
    ``e`` (its rows are sorted by expert); ``me``: this device's index on the expert axis
    (traced is fine); ``recv_rows``: static receive-buffer length (``ep·m`` for dropless).
    With ``E_loc = E / ep`` and ``C[s, d] = Σ_{e in shard d} all_counts[s, e]``::

        send_sizes[d]          = C[me, d]          input_offsets[d]       = Σ_{d'<d} C[me, d']
        recv_sizes[s]          = C[s, me]          recv_offsets[s]        = Σ_{s'<s} C[s', me]
        output_offsets[d]      = Σ_{s<me} C[s, d]  (offset in the *receiver* d's buffer)
        back_output_offsets[s] = Σ_{d<me} C[s, d]  (where s's rows for me sit in s's xs)

    The received buffer holds sender 0's rows, then sender 1's, ...; within a sender's block
    the rows are in local-expert order with ``all_counts[s, me·E_loc + j]`` rows of expert
    ``j``; rows past ``Σ recv_sizes`` are unused (``recv_local_expert = E_loc``)."""
    ep, n_exp = all_counts.shape
    e_loc = n_exp // ep
    counts = all_counts.astype(jnp.int32)
    c = counts.reshape(ep, ep, e_loc).sum(-1)  # [s, d]
    excl_d = jnp.cumsum(c, axis=1) - c  # Σ_{d'<d} C[s, d']
    excl_s = jnp.cumsum(c, axis=0) - c  # Σ_{s'<s} C[s', d]
    send = c[me]
    recv = c[:, me]
    recv_off = jnp.cumsum(recv) - recv
    mine = jax.lax.dynamic_slice_in_dim(counts, me * e_loc, e_loc, axis=1)  # [ep, E_loc]
    # local expert of received row r: its sender block s, then its expert within the block
    r = jnp.arange(recv_rows, dtype=jnp.int32)
    s_of = jnp.minimum(jnp.searchsorted(recv_off + recv, r, side="right"), ep - 1)
    within = r - recv_off[s_of]
    ends = jnp.cumsum(mine, axis=1)  # [ep, E_loc]
    j_of = jax.vmap(lambda e, p: jnp.searchsorted(e, p, side="right"))(ends[s_of], within)
    j_of = jnp.where(r < recv.sum(), j_of, e_loc).astype(jnp.int32)
    return RaggedPlan(
        input_offsets=excl_d[me], send_sizes=send, output_offsets=excl_s[me], recv_sizes=recv,
        recv_offsets=recv_off, back_output_offsets=excl_d[:, me],
        recv_local_expert=j_of, recv_group_sizes=mine.sum(0))


def _experts(rows, local_expert, e_loc, up, down, expert_ffn, tp_axes):
    """Received ``rows [R, H]`` with ``local_expert [R]`` (``E_loc`` = unused) -> expert
    outputs ``[R, H]`` in the same row order (unused rows zero)."""
    order2, sizes = moe_dispatch.sort_by_expert(local_expert[:, None], e_loc + 1)
    ys = expert_ffn(rows[order2], sizes[:e_loc], up, down)
    if tp_axes:
        ys = jax.lax.psum(ys, tp_axes)
    return jnp.zeros_like(ys).at[order2].set(ys)


def _ragged_local(x, w, idx, up, down, *, ep, ep_name, e_loc, tp_axes, expert_ffn,
                  collectives=None):
    """Per-device body of the ragged path (``ep`` shards). ``collectives`` = ``(all_gather,
    axis_index, ragged_all_to_all)`` replaces the real ones (a test runs this body with an
    emulated exchange): ``all_gather(counts [E]) -> [ep, E]``, ``axis_index() -> me``,
    ``ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
    recv_sizes)``."""
    if collectives is None:
        collectives = (lambda c: jax.lax.all_gather(c, ep_name), lambda: jax.lax.axis_index(ep_name),
                       functools.partial(jax.lax.ragged_all_to_all, axis_name=ep_name))
    all_gather, axis_index, ragged_a2a = collectives
    n, k = idx.shape
    m, hid = n * k, x.shape[-1]
    order, xs, counts = dispatch(x, idx, ep * e_loc)
    pl = ragged_plan(all_gather(counts), axis_index(), ep * m)
    recv = ragged_a2a(xs, jnp.zeros((ep * m, hid), xs.dtype), pl.input_offsets, pl.send_sizes,
                      pl.output_offsets, pl.recv_sizes)
    ys = _experts(recv, pl.recv_local_expert, e_loc, up, down, expert_ffn, tp_axes)
    back = ragged_a2a(ys, jnp.zeros((m, ys.shape[-1]), ys.dtype), pl.recv_offsets, pl.recv_sizes,
                      pl.back_output_offsets, pl.send_sizes)
    return moe_dispatch.unpermute(back, order, w, out_dtype=x.dtype)


def _padded_local(x, w, idx, up, down, *, ep, ep_name, e_loc, tp_axes, expert_ffn):
    """Per-device body of the padded path: blocks of ``m`` rows per destination shard."""
    n, k = idx.shape
    m, hid = n * k, x.shape[-1]
    order, xs, _ = dispatch(x, idx, ep * e_loc)
    e_sorted = idx.reshape(-1)[order]
    dest = e_sorted // e_loc  # [m] target shard, non-decreasing
    counts = jnp.bincount(dest, length=ep)
    slot = jnp.arange(m, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[dest]
    send = jnp.zeros((ep, m, hid), x.dtype).at[dest, slot].set(xs)
    send_ids = jnp.full((ep, m), e_loc, jnp.int32).at[dest, slot].set(e_sorted % e_loc)
    recv = jax.lax.all_to_all(send, ep_name, 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, ep_name, 0, 0, tiled=True)
    ys = _experts(recv.reshape(ep * m, hid), recv_ids.reshape(-1), e_loc, up, down, expert_ffn,
                  tp_axes)
    back = jax.lax.all_to_all(ys.reshape(ep, m, -1), ep_name, 0, 0, tiled=True)
    return moe_dispatch.unpermute(back[dest, slot], order, w, out_dtype=x.dtype)


def expert_parallel_moe(mesh: Mesh, rules: Rules, x, w, idx, up, down, expert_ffn: Callable, *,
                        a2a: str = "padded"):
    """``x [n, H]``, router ``w [n, k]`` / ``idx [n, k]``, ``up [E, H, I]``, ``down [E, I, H]``
    -> the routed-expert output ``[n, H]`` (``x.dtype``), computed expert-parallel with the
    ``a2a`` exchange (``"padded"`` | ``"ragged"``, already resolved: this function does not
    check the platform, so the ragged program can be lowered from a CPU host)."""
    if a2a not in ("padded", "ragged"):
        raise ValueError(f"a2a: expert_parallel_moe takes a resolved 'padded' or 'ragged', got {a2a!r}")
    shape = mesh_shape(mesh)
    ep_axes = _active(rules.weights["experts"], shape)
    tp_axes = _active(rules.weights["expert_mlp"], shape)
    tok_axes = _active(tuple(rules.activations["batch"]) + tuple(rules.activations["seq"]), shape)
    ep = 1
    for a in ep_axes:
        ep *= shape[a]
    body = _ragged_local if a2a == "ragged" else _padded_local
    local = functools.partial(body, ep=ep, ep_name=ep_axes if len(ep_axes) != 1 else ep_axes[0],
                              e_loc=up.shape[0] // ep, tp_axes=tp_axes, expert_ffn=expert_ffn)
    tok = P(_spec_axes(tok_axes))
    exp_up = P(_spec_axes(ep_axes), None, _spec_axes(tp_axes))
    exp_down = P(_spec_axes(ep_axes), _spec_axes(tp_axes), None)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, exp_up, exp_down), out_specs=tok,
                         check_vma=False)(x, w, idx, up, down)


def _token_local(x, w, idx, up, down, *, tp_axes, expert_ffn):
    """Per-device body of the token-local path: this device's ``x [n_loc, H]``, ``w`` / ``idx
    [n_loc, k]`` against every expert (``up [E, H, I_loc]``, ``down [E, I_loc, H]``)."""
    order, xs, counts = dispatch(x, idx, up.shape[0])
    ys = expert_ffn(xs, counts, up, down)
    if not tp_axes:
        return moe_dispatch.unpermute(ys, order, w, out_dtype=x.dtype)
    part = moe_dispatch.unpermute(ys, order, w, out_dtype=jnp.float32)  # linear in ys: sum after
    return jax.lax.psum(part, tp_axes).astype(x.dtype)


def token_local_moe(mesh: Mesh, rules: Rules, x, w, idx, up, down, expert_ffn: Callable):
    """``x [n, H]``, router ``w [n, k]`` / ``idx [n, k]``, ``up [E, H, I]``, ``down [E, I, H]``
    -> the routed-expert output ``[n, H]`` (``x.dtype``): each device dispatches only its own
    tokens (split over the mesh's batch and sequence axes) against all ``E`` experts."""
    shape = mesh_shape(mesh)
    tok_axes = _active(tuple(rules.activations["batch"]) + tuple(rules.activations["seq"]), shape)
    tp_axes = _active(rules.weights["expert_mlp"], shape)
    if _active(rules.weights["experts"], shape):
        raise ValueError("token_local_moe: the experts are split over "
                         f"{_active(rules.weights['experts'], shape)}; use expert_parallel_moe")
    tok = P(_spec_axes(tok_axes))
    w_up, w_down = P(None, None, _spec_axes(tp_axes)), P(None, _spec_axes(tp_axes), None)
    local = functools.partial(_token_local, tp_axes=tp_axes, expert_ffn=expert_ffn)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_up, w_down), out_specs=tok,
                         check_vma=False)(x, w, idx, up, down)


def make_moe_dispatch(mesh: Mesh, rules: Rules = RULES, a2a: str = "auto"):
    """The model's MoE hook for ``mesh``: expert-parallel (:func:`expert_parallel_moe`, the
    ``a2a`` exchange resolved for the mesh's platform) when the experts are split; else
    token-local (:func:`token_local_moe`) when the tokens are split over batch / sequence axes;
    else None (one token set on every device: the layer's own global dispatch)."""
    ep = make_expert_parallel(mesh, rules, a2a=a2a)
    if ep is not None:
        return ep
    shape = mesh_shape(mesh)
    if _active(tuple(rules.activations["batch"]) + tuple(rules.activations["seq"]), shape):
        return functools.partial(token_local_moe, mesh, rules)
    return None


def make_expert_parallel(mesh: Mesh, rules: Rules = RULES, a2a: str = "auto"):
    """The model's expert-parallel hook for ``mesh`` (None when the experts are not split).
    ``a2a`` in ``A2A_MODES``, resolved for the mesh's device platform (:func:`resolve_a2a`)."""
    shape = mesh_shape(mesh)
    mode = resolve_a2a(a2a, mesh.devices.flat[0].platform)
    if not _active(rules.weights["experts"], shape):
        return None
    return functools.partial(expert_parallel_moe, mesh, rules, a2a=mode)
