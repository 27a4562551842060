"""Ahead-of-time plan of a sharded train step: memory per device and FLOPs, without weights.

:func:`plan` lowers and compiles the GRPO / MOPD / SFT step against ``jax.ShapeDtypeStruct``
inputs carrying their shardings (nothing is allocated), then reads:

* ``params_bytes`` / ``optimizer_bytes``: per-device bytes of the fp32 master weights and the
  optimizer state (the largest shard any device holds, from the shardings);
* ``argument_bytes`` / ``temp_bytes``: the compiled executable's ``memory_analysis()`` (inputs
  incl. the batch; scratch for activations, gradients and collectives);
* ``flops_per_step``: matmul FLOPs of the whole step (all devices) counted on the traced
  program with every ``scan`` multiplied by its length (layer groups, micro-batches, SSD
  chunks, vocab chunks, expert tiles). XLA's ``cost_analysis()`` counts a loop body once, so
  its figure (``xla_flops_per_device``) under-counts any looped program and is reported only
  for reference.

Compiled on CPU the memory figures are an estimate of the GPU/TPU ones (same partitioning,
different fusion and scheduling decisions); the FLOP count does not depend on the backend.

The executable is never run, so by default (``fast_compile``) XLA's machine-code generation is
not optimised (``xla_backend_optimization_level=0``, no expensive LLVM passes): the HLO passes,
the SPMD partitioning and the buffer assignment that the memory figures come from are the same,
the compile takes about half the time (nano-30b-a3b on 64 devices: see docs/sharding.md).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import jax
import jax.extend
import jax.numpy as jnp

from cascade_jax.config import OptimizerConfig
from cascade_jax.rl.batch import RLBatch, SFTBatch
import kernels

from .mesh import mesh_shape
from .moe import make_moe_dispatch, token_local_moe
from .rules import BATCH_AXES, RULES, Rules
from .state import _train_state_shape, batch_shardings, state_shardings
from .step import compile_train_step

__all__ = ["plan", "jaxpr_flops", "abstract_batch", "abstract_train_state", "FAST_COMPILE",
           "PlanError", "reference_attention_keys", "XLA_CPU_MAX_KEYS"]

#: XLA options of a plan-only compile: no optimisation of the generated machine code
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

#: Key length ``S`` of the XLA reference attention (the whole sequence: the context-parallel
#: attention all-gathers K/V) from which XLA:CPU cannot compile the step: its tiled fusion
#: emitter dies with SIGFPE (an integer division by zero in
#: ``xla::gpu::experimental::GetSchedule`` under ``xla::cpu::EmitTiledFusionKernel``). Measured
#: with jax 0.11.2 on nano-30b-a3b, attention layers only: fsdp 8 at S = 126976 compiles and at
#: S = 131072 crashes the process; the key length decides, not the score elements per device:
#: fsdp 8 with 2 rows per device at S = 98304 (6.2e11 score elements per device) compiles,
#: fsdp 4 x tensor 2 at 131072 and context 8 at 262144 (2.7e11 per device) crash.
XLA_CPU_MAX_KEYS = 131072


class PlanError(ValueError):
    """A step the planner cannot compile on this backend; the message names the limit."""


def reference_attention_keys(model_cfg, seq_len: int) -> int:
    """The key length ``S = seq_len`` of the XLA reference attention
    (:mod:`kernels.xla_attention`: fp32 scores ``[rows, Hq, T, S]``, what ``auto`` runs on CPU
    and TPU below ``kernels.XLA_BLOCKWISE_MIN_KEYS`` keys), or 0 when the model has no attention
    layer, another attention implementation runs on this platform, or the XLA attention runs
    blockwise at this length (:mod:`kernels.xla_flash_attention`, no ``[T, S]`` scores)."""
    if "*" not in model_cfg.pattern:
        return 0
    if kernels.resolve_impl("attention", model_cfg.attention_impl) != "xla":
        return 0
    if kernels.xla_attention_form(seq_len) != "full":
        return 0
    return seq_len


def _subjaxprs(params):
    for v in params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for it in items:
            if isinstance(it, jax.extend.core.ClosedJaxpr):
                yield it.jaxpr
            elif isinstance(it, jax.extend.core.Jaxpr):
                yield it


def jaxpr_flops(jaxpr) -> float:
    """``2·M·N·K`` summed over every ``dot_general`` of ``jaxpr`` (a ``Jaxpr`` or
    ``ClosedJaxpr``), a ``scan`` body counted ``length`` times, ``cond`` by its costliest
    branch, a ``shard_map`` body (per-device shapes) times the devices of its manual mesh axes
    (what all devices execute, padding and replication included) and every other nested
    program (jit, remat, custom VJP) once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            contract = math.prod(lhs.shape[d] for d in lc)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        elif name == "shard_map":  # the body sees one device's block and runs on every device
            mesh = eqn.params["mesh"]
            axes = eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes") or mesh.axis_names
            total += math.prod(dict(mesh.shape)[a] for a in axes) * jaxpr_flops(eqn.params["jaxpr"])
        elif name == "while":
            raise ValueError("jaxpr_flops: a while loop has no static trip count; use scan/fori_loop "
                             "with static bounds")
        else:
            total += sum(jaxpr_flops(j) for j in _subjaxprs(eqn.params))
    return total


def abstract_batch(objective: str, batch: int, seq_len: int, *, ref_logp: bool = False):
    """``ShapeDtypeStruct`` batch for ``objective`` (``RLBatch`` for grpo / mopd; with
    ``ref_logp`` the KL reference's log-probs, which a step with ``stage.kl_coef > 0`` needs)."""
    tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    flt = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)
    if objective == "sft":
        return SFTBatch(tok, tok, tok, flt)
    seq_i = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return RLBatch(tokens=tok, positions=tok, segment_ids=tok, loss_mask=flt, rollout_logp=flt,
                   rewards=jax.ShapeDtypeStruct((batch,), jnp.float32), group_ids=seq_i,
                   finish_reason=seq_i, domain_ids=seq_i,
                   teacher_logp=flt if objective == "mopd" else None,
                   ref_logp=flt if ref_logp else None)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_state(model_cfg, opt_cfg, mesh, rules: Rules = RULES):
    """The ``TrainState`` as ``ShapeDtypeStruct``s with their shardings (no allocation)."""
    _, shape = _train_state_shape(model_cfg, opt_cfg)
    sh = state_shardings(shape, model_cfg, mesh, rules)
    return _with_shardings(shape, sh)


def _shard_bytes(tree) -> int:
    """Bytes of the shards one device holds (the largest, for uneven layouts)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def plan(model_cfg, mesh, *, objective: str = "grpo", seq_len: int = 8192,
         batch: Optional[int] = None, opt_cfg: Optional[OptimizerConfig] = None,
         device_memory_gib: float = 80.0, compute_dtype=jnp.bfloat16, grad_accum: int = 1,
         rules: Rules = RULES, fast_compile: bool = True, a2a: str = "auto",
         static: Optional[dict] = None) -> dict:
    """Compile the ``objective`` step for ``mesh`` ahead of time and report per-device memory
    and FLOPs (see the module docstring). ``batch`` defaults to one sequence per device of the
    batch axes (data x fsdp x expert); ``fast_compile``: skip machine-code optimisation (the
    memory analysis does not depend on it); ``a2a``: the expert-parallel exchange
    (``mesh.a2a``; ``ragged`` cannot compile on CPU). The result names the MoE dispatch the
    step uses (``moe_dispatch``: expert-parallel with its exchange, token-local, or global).
    ``static``: keyword arguments of the objective's step that replace the planner's defaults
    (a run's ``stage``, ``opt_cfg``, ``temperature``, ``row_len``: what
    ``cascade_jax.runner.build.train_step_static`` gives the real step)."""
    shape = mesh_shape(mesh)
    n_dev = math.prod(shape.values())
    batch_devs = math.prod(shape[a] for a in BATCH_AXES)
    batch = batch or batch_devs * grad_accum
    opt_cfg = opt_cfg or OptimizerConfig(grad_accum=grad_accum)
    keys = reference_attention_keys(model_cfg, seq_len)
    if keys >= XLA_CPU_MAX_KEYS and jax.devices()[0].platform == "cpu":
        raise PlanError(
            f"seq_len={seq_len}: the XLA reference attention (fp32 scores [rows, heads, T, S], "
            f"S = {keys} keys) cannot be compiled by XLA:CPU from S >= XLA_CPU_MAX_KEYS = "
            f"{XLA_CPU_MAX_KEYS} (its tiled fusion emitter crashes with SIGFPE; context "
            "parallelism all-gathers the keys, so it does not help); the scores alone would take "
            f"{4 * model_cfg.num_attention_heads * seq_len * seq_len / 2**40:.1f} TiB per row. "
            f"Plan with seq_len < {XLA_CPU_MAX_KEYS}")
    state = abstract_train_state(model_cfg, opt_cfg, mesh, rules)
    kl = getattr((static or {}).get("settings"), "kl_coef", 0.0) > 0
    b = abstract_batch(objective, batch, seq_len, ref_logp=objective != "sft" and kl)
    b = _with_shardings(b, batch_shardings(b, mesh, rules))
    static_kw = static
    static = dict(compute_dtype=compute_dtype, grad_accum=grad_accum)  # default loss settings
    given = dict(static_kw or {})
    if given:
        static.pop("grad_accum")  # the run's opt_cfg carries it
        static.update(given)
    step = compile_train_step(objective, mesh=mesh, state=state, batch=b, model_cfg=model_cfg,
                              rules=rules, a2a=a2a, **static)
    hook = make_moe_dispatch(mesh, rules, a2a=a2a)
    dispatch = ("global" if hook is None else "token_local" if hook.func is token_local_moe
                else f"expert_parallel ({hook.keywords['a2a']})")
    t0, c0 = time.perf_counter(), time.process_time()
    traced = step.trace(state, b)
    flops = jaxpr_flops(traced.jaxpr)
    lowered = traced.lower()
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile(compiler_options=FAST_COMPILE if fast_compile else None)
    t2, c2 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    params_b = _shard_bytes(state.params)
    opt_b = _shard_bytes(state.opt_state)
    temp_b = int(mem.temp_size_in_bytes)
    arg_b = int(mem.argument_size_in_bytes)
    total_b = arg_b + temp_b + int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
    budget = device_memory_gib * 2**30
    tokens = batch * seq_len
    return {
        "preset_pattern_len": len(model_cfg.pattern),
        "mesh": {k: v for k, v in shape.items() if v > 1} or {"data": 1},
        "devices": n_dev, "objective": objective, "batch": batch, "seq_len": seq_len,
        "moe_dispatch": dispatch, "params_bytes": params_b, "optimizer_bytes": opt_b, "argument_bytes": arg_b,
        "temp_bytes": temp_b, "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes), "total_bytes": total_b,
        "device_memory_bytes": int(budget), "fits": bool(total_b <= budget),
        "flops_per_step": flops, "flops_per_device": flops / n_dev, "flops_per_token": flops / tokens,
        "xla_flops_per_device": float(cost.get("flops", float("nan"))),
        "trace_lower_seconds": t1 - t0, "compile_seconds": t2 - t1, "fast_compile": fast_compile,
        "trace_lower_cpu_seconds": c1 - c0, "compile_cpu_seconds": c2 - c1,
        "memory_note": "compiled on " + jax.devices()[0].platform
                       + ("; CPU memory figures estimate the GPU/TPU ones" if jax.devices()[0].platform == "cpu" else ""),
    }
