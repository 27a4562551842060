"""Activation annotations by logical axis names; the model never names a mesh axis.

The model calls ``constrain(x, ("batch", "seq", "embed"))`` at a few points (the residual
stream, attention heads, MLP widths). With no partitioner installed (the default, and every
single-device path) it returns ``x`` unchanged, so numerics and the traced program are
untouched. A trainer that owns a mesh installs one for the duration of a trace::

    with use_partitioner(fn):          # fn(x, names) -> x with a sharding constraint
        jax.jit(step).lower(...)

``names`` has one entry per dim of ``x``: a logical name or ``None`` (no constraint on that
dim). The mapping from logical names to mesh axes lives in one table outside the model
(``cascade_jax.sharding.rules``).

The MoE dispatch uses the same mechanism: ``use_partitioner(fn, expert_parallel=hook)`` makes
the MoE layer hand its routed tokens to ``hook(x [n,H], w [n,k], idx [n,k], up, down,
expert_ffn) -> [n,H]``, which calls back ``expert_ffn(rows, group_sizes, up, down)`` (the
grouped matmuls) on each device. The hook (despite the keyword's name) is either of the two
dispatches of ``cascade_jax.sharding.moe`` (``make_moe_dispatch`` picks one per mesh):
expert-parallel (``expert_parallel_moe``: experts split over the ``expert`` axis, tokens
exchanged between devices by an all-to-all, each device running its local experts) or
token-local (``token_local_moe``: experts not split, each device sorting only its own tokens,
those of its batch / sequence shard, against all experts, instead of one global sort over every
token). Without a hook the layer sorts all tokens over all experts in the global program.

Context parallelism likewise: ``use_partitioner(fn, context_parallel=cp)`` routes the two
sequence-mixing kernels through ``cp.attention(q, k, v, positions, segment_ids, attention_fn)``
and ``cp.ssd(x, dt, A, Bm, Cm, chunk_size, segment_ids, ssd_fn)`` (sequence split over devices:
K/V all-gathered, SSD states passed between shards); everything else in the model is per token
or a short causal conv that the compiler partitions itself.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional, Sequence

__all__ = ["constrain", "use_partitioner", "active_partitioner", "expert_parallel",
           "context_parallel"]

_PARTITIONER: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar(
    "nemotron_h_partitioner", default=None)
_EXPERT_PARALLEL: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar(
    "nemotron_h_expert_parallel", default=None)
_CONTEXT_PARALLEL: contextvars.ContextVar = contextvars.ContextVar(
    "nemotron_h_context_parallel", default=None)


def constrain(x, names: Sequence[Optional[str]]):
    """``x`` constrained to the sharding of its logical ``names`` (identity when no
    partitioner is active)."""
    fn = _PARTITIONER.get()
    if fn is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for a rank-{x.ndim} array")
    return fn(x, tuple(names))


def active_partitioner() -> Optional[Callable]:
    return _PARTITIONER.get()


def expert_parallel() -> Optional[Callable]:
    """The active MoE dispatch hook (expert-parallel or token-local, see the module docstring),
    or None (one global dispatch of all tokens over all experts)."""
    return _EXPERT_PARALLEL.get()


def context_parallel():
    """The active context-parallel kernels (``.attention``, ``.ssd``), or None."""
    return _CONTEXT_PARALLEL.get()


@contextlib.contextmanager
def use_partitioner(fn: Optional[Callable], expert_parallel: Optional[Callable] = None,
                    context_parallel=None):
    """Install ``fn(x, names) -> x`` as the activation partitioner (and optionally the MoE
    dispatch hook ``expert_parallel``, expert-parallel or token-local, and the context-parallel
    kernels) inside the block."""
    tokens = (_PARTITIONER.set(fn), _EXPERT_PARALLEL.set(expert_parallel),
              _CONTEXT_PARALLEL.set(context_parallel))
    try:
        yield
    finally:
        _PARTITIONER.reset(tokens[0])
        _EXPERT_PARALLEL.reset(tokens[1])
        _CONTEXT_PARALLEL.reset(tokens[2])
