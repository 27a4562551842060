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
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding

from cascade_jax.rl.steps import make_train_step
from models.nemotron_h.partitioning import use_partitioner

from .mesh import mesh_shape
from .context import make_context_parallel
from .moe import make_moe_dispatch
from .rules import RULES, Rules, logical_to_spec
from .state import batch_shardings, replicated, state_shardings

__all__ = ["activation_partitioner", "compile_train_step"]


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
    result). ``static``: the keyword arguments of the objective's step (``stage``,
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
