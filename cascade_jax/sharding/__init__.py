"""Sharded training: one logical-axis rules table, the device mesh, sharded init / checkpoint
load and train steps compiled with in/out shardings and a donated state.

Entry point for a stage runner (``cfg`` is the run ``Config``)::

    from cascade_jax import sharding
    sharding.initialize_distributed()                 # multi-host: SLURM / TPU pod / flags; no-op alone
    mesh = sharding.make_mesh(cfg.mesh)               # axes data, fsdp, expert, context, tensor
    state = sharding.init_train_state(model_cfg, cfg.optimizer, key, mesh)   # or:
    #   model_cfg, params = sharding.load_params(ckpt_dir, mesh, dtype=jnp.float32)
    #   state = sharding.shard_train_state(rl.TrainState.from_config(params, cfg.optimizer,
    #                                      nh.param_specs(model_cfg)), model_cfg, mesh)
    batch = sharding.global_batch(local_rows, mesh)   # per-host rows -> one global batch
    step = sharding.compile_train_step("grpo", mesh=mesh, state=state, batch=batch,
                                       model_cfg=model_cfg, settings=rl.loss_settings(cfg.stage),
                                       opt_cfg=cfg.optimizer, a2a=cfg.mesh.a2a)
    state, metrics = step(state, batch)               # `state` is donated: use the returned one
    if sharding.is_primary(): log(metrics)

``rules.RULES`` is the one table from logical axes (``ParamSpec.axes`` and the model's
``constrain`` names) to mesh axes; pass ``rules=`` to any function here to use another. An
``expert`` axis > 1 makes the MoE layers expert-parallel (:mod:`.moe`; ``mesh.a2a`` picks the
token exchange), batch / context axes without it make them dispatch token-locally, a ``context`` axis > 1
the attention and SSD kernels context-parallel (:mod:`.context`). Before renting a pod,
``launch/plan.py`` (:mod:`.plan`) compiles the step against a simulated mesh and reports memory
per device and FLOPs.
"""

from .distributed import initialize_distributed, is_primary, leave_distributed, sync_processes
from .mesh import make_mesh, mesh_shape, resolve_sizes
from .rules import BATCH_AXES, MESH_AXES, RULES, Rules, ShardingError, logical_to_spec
from .state import (batch_shardings, global_batch, init_params, init_train_state, load_params,
                    opt_state_shardings, param_shardings, replicated, shard_batch,
                    shard_train_state, state_shardings, validate_model_mesh)
from .context import ContextParallel, make_context_parallel
from .moe import expert_parallel_moe, make_expert_parallel, make_moe_dispatch, token_local_moe
from .step import activation_partitioner, compile_train_step

__all__ = [
    "initialize_distributed", "is_primary", "leave_distributed", "sync_processes", "make_mesh", "mesh_shape", "resolve_sizes",
    "BATCH_AXES", "MESH_AXES", "RULES", "Rules", "ShardingError", "logical_to_spec",
    "batch_shardings", "global_batch", "init_params", "init_train_state", "load_params",
    "opt_state_shardings", "param_shardings", "replicated", "shard_batch", "shard_train_state",
    "state_shardings", "validate_model_mesh", "activation_partitioner", "compile_train_step",
    "ContextParallel", "make_context_parallel", "expert_parallel_moe", "make_expert_parallel",
    "make_moe_dispatch", "token_local_moe",
]
