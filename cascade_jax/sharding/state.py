"""Shardings of parameters, optimizer state and batches; sharded init and checkpoint load.

Parameters follow their ``ParamSpec`` logical axes through ``rules.weights``. The optimizer
state mirrors them: every sub-tree of the optax state with the params' structure (Adam's
``mu`` / ``nu``) takes the params' shardings, every other leaf (step counts) is replicated.
Per-token batch arrays ``[B, T, ...]`` are sharded ``("batch", "seq")``; per-sequence arrays
``[N]`` (rewards, group ids) are small and replicated, since the advantage statistics need
whole groups.

Nothing here builds a full host copy of the model: :func:`init_params` and
:func:`init_train_state` run the initializer under ``jit`` with ``out_shardings``, so each
device materializes only its shards; :func:`load_params` reads each device's slice of each
checkpoint tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cascade_jax.config import OptimizerConfig
from cascade_jax.rl.optim import TrainState, lr_schedule, make_optimizer
from models import nemotron_h as nh
from models.nemotron_h.params import ParamSpec

from .mesh import mesh_shape
from .rules import RULES, Rules, ShardingError, logical_to_spec

__all__ = ["param_shardings", "validate_model_mesh", "init_params", "load_params",
           "opt_state_shardings", "state_shardings", "init_train_state", "shard_train_state",
           "batch_shardings", "shard_batch", "global_batch", "replicated"]


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def validate_model_mesh(model_cfg: nh.ModelConfig, mesh: Mesh, rules: Rules = RULES) -> None:
    """Model-level layout conditions beyond divisibility: tensor parallelism splits whole
    attention heads, whole KV heads, whole Mamba heads and whole B/C groups; expert
    parallelism whole experts. Raises :class:`ShardingError` naming the mesh axis."""
    shape = mesh_shape(mesh)

    def size(logical):
        n = 1
        for a in rules.weights.get(logical, ()):
            n *= shape.get(a, 1)
        return n, "x".join(rules.weights.get(logical, ())) or "-"

    checks = []
    if "*" in model_cfg.pattern:
        checks += [("q_heads", model_cfg.num_attention_heads, "num_attention_heads"),
                   ("kv_heads", model_cfg.num_key_value_heads, "num_key_value_heads")]
    if "M" in model_cfg.pattern:
        checks += [("ssm_heads", model_cfg.mamba_num_heads, "mamba_num_heads"),
                   ("ssm_bc", model_cfg.n_groups, "n_groups")]
    if "E" in model_cfg.pattern:
        checks += [("experts", model_cfg.n_routed_experts, "n_routed_experts")]
    for logical, count, field in checks:
        n, axes = size(logical)
        if count % n:
            raise ShardingError(f"mesh axis {axes!r} (size {n}) does not divide {field}={count} "
                                f"(logical axis {logical!r} must split whole units)")


def param_shardings(model_cfg: nh.ModelConfig, mesh: Mesh, rules: Rules = RULES) -> Any:
    """Pytree (the params' structure) of ``NamedSharding`` from each ``ParamSpec``'s axes."""
    validate_model_mesh(model_cfg, mesh, rules)
    shape = mesh_shape(mesh)
    specs = nh.param_specs(model_cfg)

    def one(path, s):
        spec = logical_to_spec(s.axes, rules.weights, mesh_shape=shape, shape=s.shape,
                               what=f"param {jax.tree_util.keystr(path)}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=_is_spec)


def init_params(model_cfg: nh.ModelConfig, key: jax.Array, mesh: Mesh, *, dtype=jnp.bfloat16,
                rules: Rules = RULES) -> Any:
    """``nh.init_params`` with every leaf created directly in its shards (same values)."""
    shardings = param_shardings(model_cfg, mesh, rules)
    return jax.jit(lambda k: nh.init_params(model_cfg, k, dtype), out_shardings=shardings)(key)


def load_params(path, mesh: Mesh, *, dtype=None, rules: Rules = RULES,
                overrides: Optional[dict] = None) -> tuple:
    """``(model_cfg, params)`` from a Hub-layout checkpoint, each device reading only its slice
    of each tensor. ``overrides``: JAX-only ``ModelConfig`` fields (e.g. ``remat``)."""
    cfg = nh.ModelConfig.from_json_file(Path(path) / "config.json")
    if overrides:
        cfg = nh.with_overrides(cfg, **overrides)
    loaded_cfg, params = nh.load_checkpoint(path, dtype=dtype,
                                            sharding=param_shardings(cfg, mesh, rules))
    if overrides:
        loaded_cfg = nh.with_overrides(loaded_cfg, **overrides)
    return loaded_cfg, params


def opt_state_shardings(opt_state_shapes, params_shardings, mesh: Mesh) -> Any:
    """Shardings for an optax state: sub-trees shaped like the params take the params'
    shardings, everything else is replicated."""
    pdef = jax.tree.structure(params_shardings)

    def is_param_tree(x):
        return jax.tree.structure(x) == pdef

    def one(x):
        if is_param_tree(x):
            return params_shardings
        return replicated(mesh)

    return jax.tree.map(one, opt_state_shapes, is_leaf=is_param_tree)


def _train_state_shape(model_cfg, opt_cfg):
    specs = nh.param_specs(model_cfg)
    tx = make_optimizer(opt_cfg, specs)
    fn = lambda k: TrainState.create(nh.init_params(model_cfg, k, jnp.float32), tx, lr_schedule(opt_cfg))
    return fn, jax.eval_shape(fn, jax.random.key(0))


def state_shardings(state_shape: TrainState, model_cfg: nh.ModelConfig, mesh: Mesh,
                    rules: Rules = RULES) -> TrainState:
    """A ``TrainState`` pytree of shardings for ``state_shape`` (arrays or ShapeDtypeStructs)."""
    ps = param_shardings(model_cfg, mesh, rules)
    return TrainState(params=ps, opt_state=opt_state_shardings(state_shape.opt_state, ps, mesh),
                      step=replicated(mesh), tx=state_shape.tx, lr_fn=state_shape.lr_fn)


def init_train_state(model_cfg: nh.ModelConfig, opt_cfg: OptimizerConfig, key: jax.Array,
                     mesh: Mesh, rules: Rules = RULES) -> TrainState:
    """Random fp32 master params + AdamW state, created sharded (no host copy). Equal to
    ``TrainState.from_config(nh.init_params(model_cfg, key, float32), opt_cfg, specs)``."""
    fn, shape = _train_state_shape(model_cfg, opt_cfg)
    return jax.jit(fn, out_shardings=state_shardings(shape, model_cfg, mesh, rules))(key)


def shard_train_state(state: TrainState, model_cfg: nh.ModelConfig, mesh: Mesh,
                      rules: Rules = RULES) -> TrainState:
    """An existing state moved onto the mesh (e.g. after loading fp32 master weights)."""
    return jax.device_put(state, state_shardings(state, model_cfg, mesh, rules))


def _batch_leaf_spec(x, shape: dict, rules: Rules) -> P:
    if x.ndim < 2:
        return P()
    names = ("batch", "seq") + (None,) * (x.ndim - 2)
    return logical_to_spec(names, rules.activations, mesh_shape=shape, shape=x.shape,
                           what=f"batch array {tuple(x.shape)}")


def batch_shardings(batch, mesh: Mesh, rules: Rules = RULES) -> Any:
    """Shardings for an ``RLBatch`` / ``SFTBatch`` (or any pytree of arrays): ``[B, T, ...]``
    leaves split over ``("batch", "seq")``, lower-rank leaves replicated."""
    shape = mesh_shape(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, _batch_leaf_spec(x, shape, rules)), batch)


def shard_batch(batch, mesh: Mesh, rules: Rules = RULES):
    """A host (or single-device) batch placed on the mesh."""
    return jax.device_put(batch, batch_shardings(batch, mesh, rules))


def global_batch(local_batch, mesh: Mesh, rules: Rules = RULES):
    """Per-host data loading: each process passes its own rows (``[B / num_processes, T]``
    per-token leaves; per-sequence leaves whole, identical on every process) and gets the
    global batch, without any host seeing the other hosts' rows."""
    shape = mesh_shape(mesh)
    n = jax.process_count()

    def one(x):
        if x.ndim < 2:
            return jax.make_array_from_process_local_data(replicated(mesh), x, x.shape)
        gshape = (x.shape[0] * n,) + tuple(x.shape[1:])
        spec = logical_to_spec(("batch", "seq") + (None,) * (x.ndim - 2), rules.activations,
                               mesh_shape=shape, shape=gshape, what=f"batch array {gshape}")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, gshape)

    return jax.tree.map(one, local_batch)
