"""The GRPO / MOPD / SFT train steps compiled for a mesh.

``compile_train_step(objective, mesh=..., state=..., batch=..., model_cfg=..., **static)``
returns ``jax.jit(step, in_shardings=(state, batch), out_shardings=(state, replicated metrics),
donate_argnums=0)``: the train state (fp32 master params + Adam moments) is updated in place,
no second copy of it is alive across a step. The step is traced under the activation
partitioner (:func:`activation_partitioner`), so the model's logical ``constrain`` calls become
sharding constraints on this mesh, the MoE layers dispatch their tokens per device (:mod:`.moe`:
expert-parallel with an ``expert`` axis, token-local on data / fsdp / context), with a ``context`` axis the sequence kernels run context-parallel
(:mod:`.context`); without a mesh the same step function is plain ``jax.jit``.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from cascade_jax.rl.batch import SFTBatch
from cascade_jax.rl.logprobs import token_logprobs
from cascade_jax.rl.steps import make_train_step
from models.nemotron_h.partitioning import use_partitioner

from .mesh import mesh_shape
from .context import make_context_parallel
from .moe import make_moe_dispatch
from .rules import RULES, Rules, logical_to_spec
from .state import batch_shardings, param_shardings, replicated, state_shardings

__all__ = ["activation_partitioner", "compile_train_step", "reference_logprobs", "compile_reference_logprobs"]


def activation_partitioner(mesh: Mesh, rules: Rules = RULES) -> Callable:
    """``fn(x, names)``: ``x`` with a sharding constraint from ``rules.activations``."""
    shape = mesh_shape(mesh)

    def fn(x, names):
        spec = logical_to_spec(names, rules.activations, mesh_shape=shape, shape=x.shape,
                               what=f"activation {names}")
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return fn


def compile_train_step(objective: str, *, mesh: Mesh, state, batch, model_cfg, rules: Rules = RULES,
                       donate: bool = True, a2a: str = "auto", **static) -> Callable:
    """``step(state, batch) -> (state, metrics)`` jitted for ``mesh``.

    ``state`` / ``batch``: concrete arrays or ``jax.ShapeDtypeStruct`` pytrees (only shapes
    and structure are read; for ahead-of-time planning call ``.lower(state, batch)`` on the
    result). ``static``: the keyword arguments of the objective's step (``settings``,
    ``grad_accum``, ``opt_cfg``, ``compute_dtype``, ...). ``a2a``: the expert-parallel token
    exchange, ``auto`` | ``ragged`` | ``padded`` (the config's ``mesh.a2a``;
    :func:`.mesh.resolve_a2a`)."""
    step = make_train_step(objective, jit=False, model_cfg=model_cfg, **static)
    partitioner = activation_partitioner(mesh, rules)
    ep = make_moe_dispatch(mesh, rules, a2a=a2a)
    cp = make_context_parallel(mesh, rules)

    @functools.wraps(step)
    def traced(state, batch):
        with use_partitioner(partitioner, ep, cp):
            return step(state, batch)

    s_sh = state_shardings(state, model_cfg, mesh, rules)
    b_sh = batch_shardings(batch, mesh, rules)
    return jax.jit(traced, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def reference_logprobs(params, batch, *, model_cfg, temperature: float = 1.0, grad_accum: int = 1):
    """``ref_logp [B, T] = log softmax(z / τ)[y] · loss_mask`` of ``batch`` (``tokens``,
    ``positions``, ``segment_ids``, ``loss_mask``) under ``params`` (the KL reference), computed
    ``grad_accum`` micro-batches at a time (a ``lax.map`` over the train step's strided
    micro-batches: micro-batch ``j`` = rows ``j, j+k, ...``, so each stays spread over the
    data-parallel devices) and put back in row order. Same values as one call on the whole
    batch; the live activations are one micro-batch's, as in the train step."""
    B, T = batch.tokens.shape
    k = grad_accum
    if B % k:
        raise ValueError(f"batch dim {B} is not divisible by grad_accum={k}")

    def one(tokens, positions, segment_ids):
        view = SFTBatch(tokens=tokens, positions=positions, segment_ids=segment_ids, loss_mask=None)
        return token_logprobs(params, view, model_cfg, temperature=temperature)[0]

    if k == 1:
        lp = one(batch.tokens, batch.positions, batch.segment_ids)
    else:
        split = lambda x: jnp.swapaxes(x.reshape(B // k, k, T), 0, 1)  # [k, B/k, T]
        lp = jax.lax.map(lambda a: one(*a), (split(batch.tokens), split(batch.positions),
                                             split(batch.segment_ids)))
        lp = jnp.swapaxes(lp, 0, 1).reshape(B, T)
    return lp * batch.loss_mask


def compile_reference_logprobs(*, mesh: Mesh, params, batch, model_cfg, temperature: float = 1.0,
                               grad_accum: int = 1, rules: Rules = RULES, a2a: str = "auto") -> Callable:
    """:func:`reference_logprobs` jitted for ``mesh`` as the train step is (same activation
    partitioner, MoE dispatch and context parallelism; the reference weights on the params'
    shardings, the batch and the ``[B, T]`` output on the batch's). ``params`` / ``batch``:
    arrays or ``ShapeDtypeStruct`` pytrees (shapes only)."""
    partitioner = activation_partitioner(mesh, rules)
    ep = make_moe_dispatch(mesh, rules, a2a=a2a)
    cp = make_context_parallel(mesh, rules)

    def traced(p, b):
        with use_partitioner(partitioner, ep, cp):
            return reference_logprobs(p, b, model_cfg=model_cfg, temperature=temperature,
                                      grad_accum=grad_accum)

    b_sh = batch_shardings(batch, mesh, rules)
    return jax.jit(traced, in_shardings=(param_shardings(model_cfg, mesh, rules), b_sh),
                   out_shardings=b_sh.loss_mask)
