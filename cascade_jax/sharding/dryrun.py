"""Dry run of a stage on its target pod: every accelerator program compiled ahead of time on a
simulated mesh of CPU devices with abstract inputs (nothing allocated), with per-device memory
against the target, FLOPs per token and a roofline step-time estimate.

    report = dry_run(config)                      # config: the run Config (launch/run.py --dry-run)
    print(format_report(report)); sys.exit(0 if report["fits"] else 1)

The programs, built from the same config by the same builders as a real run
(``cascade_jax.runner.build``: ``model_config``, ``check_batch_fits_mesh``, ``train_step_static``):

=================  ==========================================================================
``train``          the objective's step on ``config.mesh`` (:func:`.plan.plan`): rows
                   ``data.batch_rows`` (SFT) or ``batch_prompts x n_samples`` (RL) of the
                   config's row length, ``optimizer.grad_accum`` micro-batches, the model's
                   ``remat`` / ``scan_layers`` (``model.overrides``); resident next to it: the
                   KL reference copy (``stage.kl_coef > 0``) and the MOPD teachers
``teacher_score``  MOPD: one teacher's teacher-forced scoring call
                   (``cascade_jax.rollout.scoring``: ``Teachers`` batch of 8 rows padded to the
                   power of two >= the row length) on the train mesh, every distinct teacher's
                   bf16 weights resident
``reference_score``  GRPO with ``stage.kl_coef > 0``: the KL reference's log-probs of the
                   whole batch in ``optimizer.grad_accum`` micro-batches on the train mesh
                   (``Stage._ref_logp``: ``step.compile_reference_logprobs``) under the stage's
                   starting weights (bf16)
``weight_sync``    the once-per-version cast of the fp32 master to the bf16 compute copy on the
                   train mesh (what the engine, the syncer and the probe share), then the
                   reshard onto the rollout mesh (bytes each rollout device receives)
``rollout_prefill``  the engine's admission program (``JaxEngine._admit_impl``: prefill of the
                   largest prefill row count at the smallest prompt bucket >= max_prompt_len,
                   written into the slot cache) on ``target.rollout_mesh``
``rollout_decode`` the engine's decode program (``JaxEngine._decode_impl``: ``steps_per_call``
                   tokens for ``num_slots`` slots over a ``max_prompt_len + max_response_len``
                   cache) on ``target.rollout_mesh``
=================  ==========================================================================

Memory per device of a program = its compiled arguments + temporaries + outputs - donated
aliases (``memory_analysis()``) + what stays resident beside it. It fits when it leaves
``target.headroom`` (10 %) of the device memory free.

Target corrections (estimates): XLA:CPU compiles the program the CPU would run. Where the target
runs another kernel with other memory, the figure is corrected and the report says so:

* attention with fewer than ``kernels.XLA_BLOCKWISE_MIN_KEYS`` keys: the CPU (and TPU: ``auto``
  = XLA there) runs the full-score reference with fp32 scores ``[rows, Hq, T, S]``; a GPU runs
  cuDNN flash attention (``kernels.AUTO["gpu"]``), which materialises no scores. On gpu the
  correction subtracts one layer's scores and probabilities (``2 x 4 x rows x Hq x T x S``
  bytes per device), the most that can be live at once since layers run in sequence; the
  uncertainty is the compiler's scheduling (it may keep a second layer's probabilities for the
  backward), so the corrected figure can be low by up to that much again. From 16384 keys every
  platform runs a blockwise form (XLA online softmax or cuDNN), O(T x block), no correction.
* grouped matmul: ``auto`` is the XLA grouped matmul on every platform (``kernels.AUTO``), the
  same program as on CPU; no correction (its tile visits count in the FLOPs, +13 % at 30B).

Roofline: a program's step time is at least ``max(FLOPs / peak, HBM bytes / bandwidth)`` per
device, from the chip's documented dense bf16 peak and HBM bandwidth (:data:`CHIPS`); HBM bytes
are estimated as arguments + outputs + twice the temporaries (each written and read once),
decode as the weights and cache read once per token step. MFU = the model's useful FLOPs
(``6 N_active`` per trained token, ``2 N_active`` per inferred token, plus causal attention) /
(the roofline time x peak): the bound the program's own overheads (recompute, padding, tile
visits) leave, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

import kernels
from cascade_jax import config as C
from cascade_jax.rl.batch import SFTBatch
from cascade_jax.rl.logprobs import token_logprobs
from cascade_jax.rl.optim import compute_params
from cascade_jax.rollout.engine import JaxEngine, default_prompt_buckets
from cascade_jax.rollout.scoring import pow2_at_least
from cascade_jax.rollout.teachers import Teachers
from cascade_jax.runner import build as B
from cascade_jax.runner.errors import ConfigError
from models import nemotron_h as nh
from models.nemotron_h.partitioning import use_partitioner

from . import rollout as layout
from .context import make_context_parallel
from .mesh import make_mesh, mesh_shape, resolve_sizes
from .moe import make_moe_dispatch
from .plan import FAST_COMPILE, PlanError, abstract_train_state, jaxpr_flops, plan
from .rules import RULES, ShardingError, logical_to_spec
from .state import batch_shardings, param_shardings, replicated, validate_model_mesh
from .step import activation_partitioner, compile_reference_logprobs

__all__ = ["Chip", "CHIPS", "DryRunError", "resolve_target", "dry_run", "retarget", "format_report",
           "attention_score_bytes"]

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Documented per-chip peaks: dense bf16 FLOP/s, HBM bytes/s, HBM GiB."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    memory_gib: float


#: NVIDIA H100 SXM5 and H200 SXM datasheets (989 TFLOP/s dense BF16 = 1979 with sparsity;
#: 3.35 / 4.8 TB/s HBM3 / HBM3e; 80 GB / 141 GB); Google Cloud TPU v5p documentation
#: (459 TFLOP/s bf16, 2765 GB/s HBM, 95 GB).
CHIPS = {
    "h100": Chip("NVIDIA H100 SXM5 80GB", 989.4e12, 3.35e12, 80.0),
    "h200": Chip("NVIDIA H200 SXM 141GB", 989.4e12, 4.8e12, 141.0),
    "v5p": Chip("TPU v5p", 459e12, 2.765e12, 95.0),
}
DEFAULT_CHIP = {"gpu": "h100", "tpu": "v5p"}


class DryRunError(ValueError):
    """Bad dry-run input; the message names the field or flag."""


@dataclasses.dataclass(frozen=True)
class Target:
    devices: int
    platform: str
    chip: str
    memory_bytes: int
    headroom: float

    @property
    def spec(self) -> Chip:
        return CHIPS[self.chip]


def resolve_target(config: C.Config, *, devices: Optional[int] = None,
                   device_memory_gib: Optional[float] = None,
                   platform: Optional[str] = None) -> Target:
    """The target of ``config.target`` with the command line's flags applied (a flag wins).
    Raises :class:`DryRunError` naming the flag or field: an unknown platform, a device count
    that does not match ``mesh``, a non-positive memory."""
    t = config.target
    plat = platform or t.platform
    if plat not in C.PLATFORMS:
        raise DryRunError(f"--platform: must be one of {list(C.PLATFORMS)}, got {plat!r}")
    chip = t.chip if (t.chip and t.chip in C.CHIPS[plat]) else DEFAULT_CHIP[plat]
    mem = device_memory_gib if device_memory_gib is not None else t.device_memory_gib
    if platform and platform != t.platform and device_memory_gib is None:
        mem = CHIPS[chip].memory_gib  # another platform than the config's: its chip's memory
    if not mem > 0:
        raise DryRunError(f"--device-memory-gib: must be > 0, got {mem}")
    sizes = {a: getattr(config.mesh, a) for a in ("data", "fsdp", "expert", "context", "tensor")}
    n = devices if devices is not None else t.devices
    if n is not None and n < 0:
        raise DryRunError(f"--devices: must be >= 1, got {n}")
    if not n:
        if -1 in sizes.values():
            raise DryRunError("target.devices: 0 (= the mesh's size) but mesh has a -1 axis; set "
                              "target.devices or --devices")
        n = math.prod(sizes.values())
    try:
        resolve_sizes(config.mesh, n)
    except ShardingError as e:
        src = "--devices" if devices is not None else "target.devices"
        raise DryRunError(f"{src}={n} does not match the mesh: {e}") from None
    return Target(int(n), plat, chip, int(mem * GIB), t.headroom)


def attention_score_bytes(model_cfg, rows_dev: int, heads_dev: int, t_dev: int, keys: int) -> int:
    """One layer's fp32 scores + probabilities ``2 x 4 x rows x Hq x T x S`` bytes per device,
    or 0 when the XLA attention runs blockwise at ``keys`` (no ``[T, S]`` scores)."""

    if "*" not in model_cfg.pattern or kernels.xla_attention_form(keys) != "full":
        return 0
    return 2 * 4 * rows_dev * heads_dev * t_dev * keys


# --------------------------------------------------------------------------------------------


def _sized(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def abstract_params(model_cfg, mesh, dtype=jnp.bfloat16, rules=RULES):
    """The compute copy (``dtype`` except the fp32 leaves) as sharded ``ShapeDtypeStruct``s."""

    master = nh.abstract_params(model_cfg)
    specs = nh.param_specs(model_cfg)
    shape = jax.eval_shape(lambda m: compute_params(m, specs, dtype), master)
    return _sized(shape, param_shardings(model_cfg, mesh, rules))


def _compile(fn, args, *, mesh, rules=RULES, a2a="auto", donate=(), flops_fn=None):
    """Trace ``fn(*args)`` under the mesh's partitioner (the model's ``constrain`` calls, MoE
    dispatch, context parallelism, as ``compile_train_step`` does), compile it without machine
    code optimisation and return ``(memory dict, FLOPs of all devices, seconds)``."""
    partitioner = activation_partitioner(mesh, rules)
    ep = make_moe_dispatch(mesh, rules, a2a=a2a)
    cp = make_context_parallel(mesh, rules)

    def traced(*a):
        with use_partitioner(partitioner, ep, cp):
            return fn(*a)

    t0 = time.perf_counter()
    jitted = jax.jit(traced, donate_argnums=donate)
    tr = jitted.trace(*args)
    flops = jaxpr_flops(tr.jaxpr) if flops_fn is None else flops_fn()
    compiled = tr.lower().compile(compiler_options=FAST_COMPILE)
    mem = compiled.memory_analysis()
    m = {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
    m["total_bytes"] = m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]
    return m, flops, time.perf_counter() - t0


def _model_flops_per_token(model_cfg, ctx: int, train: bool) -> float:
    """Useful FLOPs per token: ``2 N_active`` forward (x3 trained) plus causal attention over an
    average ``ctx / 2`` keys (``4 Hq d`` per key per layer forward, x3 trained)."""
    active = nh.param_counts(model_cfg)[1]
    n_attn = model_cfg.pattern.count("*")
    fwd = 2.0 * active + 4.0 * n_attn * model_cfg.num_attention_heads * model_cfg.head_dim * ctx / 2
    return fwd * (3 if train else 1)


def _finish(prog: dict, target: Target, *, devices: int, tokens: float, useful_per_token: float,
            resident: int = 0, correction: int = 0, hbm_bytes: Optional[float] = None) -> dict:
    """Add resident bytes, the target correction, headroom, roofline and MFU to ``prog`` (the
    inputs are kept under ``"basis"`` so :func:`retarget` can redo this for another target)."""
    chip = target.spec
    prog["basis"] = {"devices": devices, "tokens": tokens, "useful_per_token": useful_per_token,
                     "resident": int(resident), "correction": int(correction), "hbm_bytes": hbm_bytes}
    prog["resident_bytes"] = int(resident)
    prog["correction_bytes"] = -int(min(correction, prog["temp_bytes"])) if target.platform == "gpu" else 0
    total = prog["total_bytes"] + resident + prog["correction_bytes"]
    prog["device_total_bytes"] = int(total)
    prog["headroom"] = 1.0 - total / target.memory_bytes
    prog["fits"] = bool(prog["headroom"] >= target.headroom)
    prog["shortfall_bytes"] = int(max(0, total - (1 - target.headroom) * target.memory_bytes))
    flops_dev = prog["flops"] / devices
    prog["flops_per_token"] = prog["flops"] / tokens if tokens else float("nan")
    if hbm_bytes is None:
        hbm_bytes = prog["argument_bytes"] + prog["output_bytes"] + 2 * prog["temp_bytes"]
    t_compute, t_hbm = flops_dev / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth
    prog["step_seconds"] = max(t_compute, t_hbm)
    prog["bound"] = "compute" if t_compute >= t_hbm else "memory"
    useful = useful_per_token * tokens / devices
    prog["mfu"] = useful / (prog["step_seconds"] * chip.peak_flops) if prog["step_seconds"] else 0.0
    prog["estimate"] = True
    return prog


def _row_shape(config: C.Config):
    obj, d, r = config.stage.objective, config.data, config.rollout.sampling
    if obj == "sft":
        return d.batch_rows, d.seq_len
    return d.batch_prompts * r.n_samples, r.max_prompt_len + r.max_response_len


def dry_run(config: C.Config, *, devices: Optional[int] = None,
            device_memory_gib: Optional[float] = None, platform: Optional[str] = None,
            programs: Optional[tuple] = None, log=None) -> dict:
    """Compile every accelerator program of ``config``'s stage for its target (module doc) on
    the simulated CPU devices of this process (``jax.devices()`` must hold ``target.devices``:
    ``launch/run.py --dry-run`` sets ``JAX_NUM_CPU_DEVICES`` before jax starts). ``programs``:
    a subset of the program names to compile (default: all the stage runs). Returns the report
    dict; ``report["fits"]`` is False when a program leaves less than ``target.headroom``."""

    t_start = time.perf_counter()
    log = log or (lambda msg: None)
    target = resolve_target(config, devices=devices, device_memory_gib=device_memory_gib,
                            platform=platform)
    if config.stage.objective not in ("sft", "grpo", "mopd"):
        raise DryRunError(f"stage.objective: {config.stage.objective!r} has no accelerator programs "
                          f"to plan (sft, grpo, mopd)")
    avail = jax.devices()
    if len(avail) < target.devices:
        raise DryRunError(f"--devices: {target.devices} simulated devices needed, {len(avail)} visible "
                          f"(set JAX_NUM_CPU_DEVICES before jax starts; launch/run.py --dry-run does)")
    mcfg = B.model_config(config)
    try:
        mesh = make_mesh(config.mesh, avail[:target.devices])
        validate_model_mesh(mcfg, mesh)
    except ShardingError as e:
        raise DryRunError(f"mesh: {e}") from None
    try:
        B.check_batch_fits_mesh(config, mesh)
    except ConfigError as e:
        raise DryRunError(str(e)) from None
    obj = config.stage.objective
    rmesh = _rollout_mesh(config, mcfg) if obj in ("grpo", "mopd") else None  # checked up front
    want = programs or ("train", "teacher_score", "reference_score", "weight_sync", "rollout_prefill",
                        "rollout_decode")
    rows, row_len = _row_shape(config)
    dtype = B.compute_dtype(config)
    bf16_bytes = _shard_bytes(abstract_params(mcfg, mesh, dtype))
    n_teachers = len(set(config.stage.teachers.values())) if obj == "mopd" else 0
    ref_bytes = bf16_bytes if obj == "grpo" and config.stage.kl_coef > 0 else 0
    train_resident = ref_bytes + n_teachers * bf16_bytes
    out = _Logged(log)

    if "train" in want:
        log(f"compiling train ({rows} x {row_len}, grad_accum {config.optimizer.grad_accum}) ...")
        try:
            r = plan(mcfg, mesh, objective=obj, seq_len=row_len, batch=rows,
                     opt_cfg=config.optimizer, grad_accum=config.optimizer.grad_accum,
                     device_memory_gib=target.memory_bytes / GIB, compute_dtype=dtype,
                     a2a=config.mesh.a2a, static=B.train_step_static(config))
        except PlanError as e:
            raise DryRunError(f"train: {e}") from None
        prog = {"program": "train", "mesh": r["mesh"], "devices": r["devices"],
                "shape": f"{rows} x {row_len}, grad_accum {config.optimizer.grad_accum}, "
                         f"remat {mcfg.remat}",
                "params_bytes": r["params_bytes"], "optimizer_bytes": r["optimizer_bytes"],
                "cache_bytes": 0, "moe_dispatch": r["moe_dispatch"],
                "seconds": r["trace_lower_seconds"] + r["compile_seconds"], "flops": r["flops_per_step"],
                **{k: r[k] for k in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
                                     "total_bytes")}}
        cp = mesh_shape(mesh).get("context", 1)
        bdev = r["devices"] // cp // mesh_shape(mesh).get("tensor", 1)
        micro = max(1, rows // config.optimizer.grad_accum // bdev)
        corr = attention_score_bytes(mcfg, micro, mcfg.num_attention_heads // mesh_shape(mesh).get("tensor", 1),
                                     row_len // cp, row_len)
        out.append(_finish(prog, target, devices=r["devices"], tokens=rows * row_len,
                           useful_per_token=_model_flops_per_token(mcfg, row_len, True),
                           resident=train_resident, correction=corr))

    if obj == "mopd" and "teacher_score" in want:
        import inspect


        t_rows = inspect.signature(Teachers.__init__).parameters["batch_size"].default
        out.append(_score_program("teacher_score", config, mcfg, mesh, target, t_rows,
                                  pow2_at_least(row_len), dtype, n_teachers - 1, bf16_bytes, log,
                                  f" padded to a power of two; {n_teachers} teachers resident"))
    if ref_bytes and "reference_score" in want:
        out.append(_reference_program(config, mcfg, mesh, target, rows, row_len, dtype, bf16_bytes, log))
    if rmesh is not None:
        if "weight_sync" in want:
            out.append(_sync_program(config, mcfg, mesh, rmesh, target, dtype, train_resident, log))
        if "rollout_prefill" in want or "rollout_decode" in want:
            try:
                out.extend(_engine_programs(config, mcfg, rmesh, target, dtype, want, log))
            except ShardingError as e:
                raise DryRunError(f"target.rollout_mesh: {e}") from None
    fits = all(p["fits"] for p in out)
    return {
        "stage": config.stage.name, "objective": obj, "preset": config.model.preset,
        "target": {"devices": target.devices, "platform": target.platform, "chip": target.chip,
                   "chip_name": target.spec.name, "device_memory_gib": target.memory_bytes / GIB,
                   "headroom": target.headroom, "peak_flops": target.spec.peak_flops,
                   "hbm_bandwidth": target.spec.hbm_bandwidth},
        "mesh": {k: v for k, v in mesh_shape(mesh).items() if v > 1},
        "rollout_mesh": ({k: v for k, v in C.to_dict(config.target.rollout_mesh).items()
                          if k != "a2a" and v > 1} if obj != "sft" else None),
        "remat": mcfg.remat, "grad_accum": config.optimizer.grad_accum,
        "programs": list(out), "fits": fits,
        "failures": [f"{p['program']}: needs {p['device_total_bytes'] / GIB:.1f} GiB per device, "
                     f"{p['shortfall_bytes'] / GIB:.1f} GiB over the {1 - target.headroom:.0%} of "
                     f"{target.memory_bytes / GIB:g} GiB it may use" for p in out if not p["fits"]],
        "wall_seconds": time.perf_counter() - t_start,
        "note": "estimate: compiled by XLA:CPU on simulated devices; corrections for the target's "
                "kernels applied where stated (correction_bytes); see cascade_jax/sharding/dryrun.py",
    }


class _Logged(list):
    """The report's program list; logs each program's total as it is added (long dry runs)."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def append(self, p):
        super().append(p)
        self.log(f"  {p['program']}: {p['device_total_bytes'] / GIB:.1f} GiB per device, headroom "
                 f"{p['headroom']:.0%}{'' if p['fits'] else ' (does not fit)'}")

    def extend(self, ps):
        for p in ps:
            self.append(p)


def _rollout_mesh(config, mcfg):
    m = config.target.rollout_mesh
    n = math.prod(getattr(m, a) for a in ("data", "fsdp", "expert", "context", "tensor"))
    if n > len(jax.devices()):
        raise DryRunError(f"target.rollout_mesh: {n} devices, {len(jax.devices())} visible")
    try:
        mesh = make_mesh(m, jax.devices()[:n])
        validate_model_mesh(mcfg, mesh)
    except ShardingError as e:
        raise DryRunError(f"target.rollout_mesh: {e}") from None
    return mesh


def _score_program(name, config, mcfg, mesh, target, rows, T, dtype, resident_copies,
                   bf16_bytes, log, note):
    """A teacher-forced scoring forward (what ``rollout.scoring`` runs: the trainer's
    :func:`~cascade_jax.rl.logprobs.token_logprobs`) of ``rows x T`` tokens on the train mesh under bf16 weights, with the
    train state and ``resident_copies`` other bf16 copies resident beside it."""


    shape = mesh_shape(mesh)
    cp = shape.get("context", 1)
    if T % cp:
        raise DryRunError(f"{name}: length {T} does not split over mesh.context={cp}")
    params = abstract_params(mcfg, mesh, dtype)
    spec = logical_to_spec(("batch", "seq"), RULES.activations, mesh_shape=shape)
    bdev = math.prod(shape.get(a, 1) for a in RULES.activations["batch"])
    rows = max(rows, bdev)  # every batch device needs a row
    tok = jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=NamedSharding(mesh, spec))

    def score(p, tokens, seg):
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
        rows = SFTBatch(tokens=tokens, positions=pos, segment_ids=seg,
                        loss_mask=jnp.zeros(tokens.shape, jnp.float32))
        return token_logprobs(p, rows, mcfg)[0]

    log(f"compiling {name} ({rows} x {T}) ...")
    m, flops, secs = _compile(score, (params, tok, tok), mesh=mesh, a2a=config.mesh.a2a)
    prog = {"program": name, "mesh": {k: v for k, v in shape.items() if v > 1},
            "devices": math.prod(shape.values()), "shape": f"{rows} x {T}{note}",
            "params_bytes": bf16_bytes, "optimizer_bytes": 0, "cache_bytes": 0, "seconds": secs,
            "flops": flops, **m}
    corr = attention_score_bytes(mcfg, rows // bdev, mcfg.num_attention_heads // shape.get("tensor", 1),
                                 T // cp, T)
    st = abstract_train_state(mcfg, config.optimizer, mesh)
    resident = _shard_bytes(st.params) + _shard_bytes(st.opt_state) + resident_copies * bf16_bytes
    return _finish(prog, target, devices=prog["devices"], tokens=rows * T,
                   useful_per_token=_model_flops_per_token(mcfg, T, False), resident=resident,
                   correction=corr)


def _reference_program(config, mcfg, mesh, target, rows, T, dtype, bf16_bytes, log):
    """The KL reference's log-probs as the runner computes them (``Stage._ref_logp``:
    :func:`.step.compile_reference_logprobs`, the whole ``rows x T`` batch in
    ``optimizer.grad_accum`` micro-batches on the train mesh, bf16 reference weights), with
    the train state resident beside it."""


    accum = config.optimizer.grad_accum
    params = abstract_params(mcfg, mesh, dtype)
    tok = jax.ShapeDtypeStruct((rows, T), jnp.int32)
    view = SFTBatch(tok, tok, tok, jax.ShapeDtypeStruct((rows, T), jnp.float32))
    view = _sized(view, batch_shardings(view, mesh))
    log(f"compiling reference_score ({rows} x {T}, {accum} micro-batches) ...")
    t0 = time.perf_counter()
    fn = compile_reference_logprobs(mesh=mesh, params=params, batch=view, model_cfg=mcfg,
                                    grad_accum=accum, a2a=config.mesh.a2a)
    tr = fn.trace(params, view)
    flops = jaxpr_flops(tr.jaxpr)
    mem = tr.lower().compile(compiler_options=FAST_COMPILE).memory_analysis()
    m = {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
    m["total_bytes"] = m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]
    shape = mesh_shape(mesh)
    prog = {"program": "reference_score", "mesh": {k: v for k, v in shape.items() if v > 1},
            "devices": math.prod(shape.values()),
            "shape": f"{rows} x {T} in {accum} micro-batches (the KL reference, Stage._ref_logp)",
            "params_bytes": bf16_bytes, "optimizer_bytes": 0, "cache_bytes": 0,
            "seconds": time.perf_counter() - t0, "flops": flops, **m}
    cp, tp = shape.get("context", 1), shape.get("tensor", 1)
    bdev = math.prod(shape.get(a, 1) for a in RULES.activations["batch"])
    corr = attention_score_bytes(mcfg, max(1, rows // accum // bdev),
                                 mcfg.num_attention_heads // tp, T // cp, T)
    st = abstract_train_state(mcfg, config.optimizer, mesh)
    resident = _shard_bytes(st.params) + _shard_bytes(st.opt_state)
    # the reference copy itself is an argument of the program (params_bytes, in total_bytes)
    return _finish(prog, target, devices=prog["devices"], tokens=rows * T,
                   useful_per_token=_model_flops_per_token(mcfg, T, False), resident=resident,
                   correction=corr)


def _sync_program(config, mcfg, mesh, rmesh, target, dtype, train_resident, log):
    """The once-per-version cast (fp32 master -> compute copy) on the train mesh."""

    st = abstract_train_state(mcfg, config.optimizer, mesh)
    specs = nh.param_specs(mcfg)
    out_sh = param_shardings(mcfg, mesh)
    log("compiling weight_sync (cast) ...")
    t0 = time.perf_counter()
    fn = jax.jit(lambda m: compute_params(m, specs, dtype), out_shardings=out_sh)
    compiled = fn.trace(st.params).lower().compile(compiler_options=FAST_COMPILE)
    mem = compiled.memory_analysis()
    m = {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes)}
    m["total_bytes"] = m["argument_bytes"] + m["temp_bytes"] + m["output_bytes"] - m["alias_bytes"]
    rparams = abstract_params(mcfg, rmesh, dtype)
    recv = _shard_bytes(rparams)
    prog = {"program": "weight_sync", "mesh": {k: v for k, v in mesh_shape(mesh).items() if v > 1},
            "devices": math.prod(mesh_shape(mesh).values()),
            "shape": f"cast fp32 -> {jnp.dtype(dtype).name} once per version; reshard: "
                     f"{recv / GIB:.2f} GiB received per rollout device",
            "params_bytes": _shard_bytes(st.params), "optimizer_bytes": _shard_bytes(st.opt_state),
            "cache_bytes": 0, "seconds": time.perf_counter() - t0, "flops": 0.0,
            "reshard_bytes_per_rollout_device": recv, **m}
    # beside it: Adam moments (the cast reads only params) and the resident copies
    return _finish(prog, target, devices=prog["devices"], tokens=0, useful_per_token=0.0,
                   resident=_shard_bytes(st.opt_state) + train_resident)


def _engine_programs(config, mcfg, rmesh, target, dtype, want, log):
    """The engine's admission (prefill) and decode programs on the rollout mesh."""

    s, bt, fid = config.rollout.sampling, config.rollout.batching, config.rollout.fidelity
    S, max_len = bt.num_slots, s.max_prompt_len + s.max_response_len
    eng = JaxEngine.__new__(JaxEngine)  # the programs only: no weights, no cache allocated
    eng.model, eng.model_cfg, eng.num_slots, eng.max_len = nh, mcfg, S, max_len
    eng.steps_per_call, eng.return_routed_experts, eng.max_stop_tokens = bt.steps_per_call, fid.routing_replay, 8
    eng.keep_sessions = False
    rshape = mesh_shape(rmesh)
    ndev = math.prod(rshape.values())
    params = abstract_params(mcfg, rmesh, dtype)
    p_bytes = _shard_bytes(params)
    cache = jax.eval_shape(lambda: nh.init_cache(mcfg, S, max_len, dtype=dtype))
    cache = _sized(cache, layout.cache_shardings(cache, rmesh))  # as JaxEngine(mesh=...) places them
    c_bytes = _shard_bytes(cache)
    rep = replicated(rmesh)
    sds = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=rep)
    logits = sds((S, mcfg.vocab_size), jnp.float32)
    slots = {"pos": sds((S,), jnp.int32), "step": sds((S,), jnp.int32), "seed": sds((S, 2), jnp.uint32),
             "temp": sds((S,), jnp.float32), "top_p": sds((S,), jnp.float32),
             "top_k": sds((S,), jnp.int32), "budget": sds((S,), jnp.int32),
             "stops": sds((S, 8), jnp.int32), "done": sds((S,), jnp.bool_)}
    if fid.routing_replay:
        slots["rx"] = sds((S, max_len, mcfg.pattern.count("E"), mcfg.num_experts_per_tok), jnp.int32)
    slots = _sized(slots, layout.slot_shardings(slots, rmesh))  # recorded experts split like the cache
    # the engine's own jitted programs (JaxEngine._programs): its in / out shardings, traced
    # under the rollout mesh's partitioner and MoE dispatch
    eng.mesh, eng.rules, eng._a2a = rmesh, RULES, "auto"  # the padded exchange on a CPU host
    eng._param_sh, eng._cache = param_shardings(mcfg, rmesh), cache
    eng._slots_sh = {k: v.sharding for k, v in slots.items()}
    eng.prefill_sizes = (max(bt.prefill_sizes) if bt.prefill_sizes else S,)
    admit_fn, decode_fn = eng._programs()
    out = []
    mesh_d = {k: v for k, v in rshape.items() if v > 1}
    chunk = bt.prefill_chunk
    eng.prefill_chunk = chunk or None
    if "rollout_prefill" in want:
        nb = max(bt.prefill_sizes) if bt.prefill_sizes else S
        # the admitted rows split over the mesh's batch axes, as the cache's slots are
        rows_sh = layout.rows_sharding(nb, rmesh, what="rollout.batching.prefill_sizes rows")
        rsd = lambda shp, dt: jax.ShapeDtypeStruct(shp, dt, sharding=rows_sh)
        if chunk:  # chunked: the continuation program bounds it; keys span the whole row
            Tb = min(b for b in default_prompt_buckets(max_len) if b >= min(chunk, s.max_prompt_len))
            program, meta_cols, kv_len = eng._extend_program(), 8, max_len
            shape = f"{nb} x {Tb}-token chunks (prefill_chunk {chunk}) into {S} slots x {max_len}"
            row_cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct((nb,) + x.shape[1:], x.dtype), cache)
            fl = lambda: jaxpr_flops(jax.make_jaxpr(lambda p, c, t: nh.prefill_continue(
                p, c, t, t[:, 0], mcfg, last_only=True))(params, row_cache, args[4]))
        else:  # one call per prompt bucket
            Tb = min(b for b in default_prompt_buckets(max_len) if b >= s.max_prompt_len)
            program, meta_cols, kv_len = admit_fn, 6, Tb
            shape = f"{nb} x {Tb} into {S} slots x {max_len}"
            fl = lambda: jaxpr_flops(jax.make_jaxpr(lambda p, t: nh.prefill(
                p, t, mcfg, max_len=Tb, last_only=True))(params, args[4]))
        args = (params, cache, logits, slots, rsd((nb, Tb), jnp.int32), rsd((nb, meta_cols), jnp.int32),
                rsd((nb, 2), jnp.float32), rsd((nb, 8), jnp.int32))
        log(f"compiling rollout_prefill ({shape}) ...")
        m, flops, secs = _compile(program, args, mesh=rmesh, donate=(1, 2, 3), flops_fn=fl)
        prog = {"program": "rollout_prefill", "mesh": mesh_d, "devices": ndev, "shape": shape,
                "params_bytes": p_bytes, "optimizer_bytes": 0, "cache_bytes": c_bytes,
                "seconds": secs, "flops": flops, **m}
        bdev = math.prod(rshape.get(a, 1) for a in RULES.activations["batch"])
        corr = attention_score_bytes(mcfg, max(1, nb // bdev),
                                     mcfg.num_attention_heads // rshape.get("tensor", 1), Tb, kv_len)
        out.append(_finish(prog, target, devices=ndev, tokens=nb * Tb,
                           useful_per_token=_model_flops_per_token(mcfg, kv_len, False), correction=corr))
    if "rollout_decode" in want:
        log(f"compiling rollout_decode ({S} slots x {bt.steps_per_call} tokens) ...")
        tokv = sds((S,), jnp.int32)
        fl = lambda: jaxpr_flops(jax.make_jaxpr(lambda p, c, t: nh.decode_step(
            p, c, t, t, mcfg))(params, cache, tokv)) * bt.steps_per_call
        m, flops, secs = _compile(decode_fn, (params, cache, logits, slots, sds((), jnp.int32)),
                                  mesh=rmesh, donate=(1, 2, 3), flops_fn=fl)
        prog = {"program": "rollout_decode", "mesh": mesh_d, "devices": ndev,
                "shape": f"{S} slots x {max_len}, {bt.steps_per_call} tokens per call",
                "params_bytes": p_bytes, "optimizer_bytes": 0, "cache_bytes": c_bytes,
                "seconds": secs, "flops": flops, **m}
        # every token step reads the weights and the cache once
        hbm = bt.steps_per_call * (p_bytes + c_bytes)
        out.append(_finish(prog, target, devices=ndev, tokens=S * bt.steps_per_call,
                           useful_per_token=_model_flops_per_token(mcfg, max_len, False),
                           hbm_bytes=hbm))
    return out


def format_report(rep: dict) -> str:
    """Human-readable table of a :func:`dry_run` report."""
    t = rep["target"]
    g = lambda b: f"{b / GIB:7.2f}"
    lines = [f"dry run {rep['stage']} ({rep['preset']}, {rep['objective']}) on {t['devices']} x {t['chip_name']} "
             f"({t['platform']}, {t['device_memory_gib']:g} GiB; fits = >= {t['headroom']:.0%} free), "
             f"mesh {rep['mesh']}, rollout mesh {rep['rollout_mesh']}, remat {rep['remat']}, "
             f"grad_accum {rep['grad_accum']}",
             f"{'program':<16}{'params':>8}{'optim':>8}{'cache':>8}{'temp':>8}{'resid':>8}{'corr':>8}"
             f"{'total':>8} GiB/dev {'headroom':>8} {'GFLOP/tok':>9} {'step s':>9} {'MFU':>5}  fits"]
    for p in rep["programs"]:
        lines.append(f"{p['program']:<16}{g(p['params_bytes'])} {g(p['optimizer_bytes'])} {g(p['cache_bytes'])} "
                     f"{g(p['temp_bytes'])} {g(p['resident_bytes'])} {g(p['correction_bytes'])} "
                     f"{g(p['device_total_bytes'])}         {p['headroom']:8.1%} "
                     f"{p['flops_per_token'] / 1e9:9.3g} {p['step_seconds']:9.3g} {p['mfu']:5.1%}  "
                     f"{'yes' if p['fits'] else 'NO'}   ({p['shape']}; compiled in {p['seconds']:.0f} s)")
    lines.append(rep["note"])
    for f in rep["failures"]:
        lines.append(f"DOES NOT FIT: {f}")
    lines.append(f"dry run wall time {rep['wall_seconds']:.0f} s")
    return "\n".join(lines)


def retarget(rep: dict, *, platform: str, device_memory_gib: Optional[float] = None,
             chip: Optional[str] = None, headroom: Optional[float] = None) -> dict:
    """``rep`` (a :func:`dry_run` report) evaluated for another target of the same device count
    without compiling again: the CPU programs are the same, only the budget, the chip's peaks and
    the platform's kernel corrections change."""
    import copy

    if platform not in C.PLATFORMS:
        raise DryRunError(f"--platform: must be one of {list(C.PLATFORMS)}, got {platform!r}")
    chip = chip or DEFAULT_CHIP[platform]
    mem = device_memory_gib or CHIPS[chip].memory_gib
    t = Target(rep["target"]["devices"], platform, chip, int(mem * GIB),
               rep["target"]["headroom"] if headroom is None else headroom)
    out = copy.deepcopy(rep)
    progs = []
    for p in out["programs"]:
        b = p.pop("basis")
        progs.append(_finish(p, t, devices=b["devices"], tokens=b["tokens"],
                             useful_per_token=b["useful_per_token"], resident=b["resident"],
                             correction=b["correction"], hbm_bytes=b["hbm_bytes"]))
    out["programs"] = progs
    out["target"].update(platform=platform, chip=chip, chip_name=t.spec.name, device_memory_gib=mem,
                         headroom=t.headroom, peak_flops=t.spec.peak_flops,
                         hbm_bandwidth=t.spec.hbm_bandwidth)
    out["fits"] = all(p["fits"] for p in progs)
    out["failures"] = [f"{p['program']}: needs {p['device_total_bytes'] / GIB:.1f} GiB per device, "
                       f"{p['shortfall_bytes'] / GIB:.1f} GiB over the {1 - t.headroom:.0%} of "
                       f"{t.memory_bytes / GIB:g} GiB it may use" for p in progs if not p["fits"]]
    return out


# --------------------------------------------------------------------------------------------
# Command line (launch/run.py --dry-run)


def simulated_device_count(config: C.Config, devices: Optional[int] = None) -> int:
    """How many CPU devices the dry run of ``config`` simulates: ``devices`` (``--devices``),
    else ``target.devices``, else the mesh's size; at least the rollout mesh's size."""
    n = devices or config.target.devices
    if not n:
        sizes = [getattr(config.mesh, a) for a in ("data", "fsdp", "expert", "context", "tensor")]
        if -1 in sizes:
            raise DryRunError("target.devices: 0 (= the mesh's size) but mesh has a -1 axis; set "
                              "target.devices or --devices")
        n = math.prod(sizes)
    if n < 1:
        raise DryRunError(f"--devices: must be >= 1, got {n}")
    m = config.target.rollout_mesh
    return max(n, math.prod(max(1, getattr(m, a)) for a in ("data", "fsdp", "expert", "context", "tensor")))


def use_simulated_devices(n: int) -> bool:
    """Make this process's jax see ``n`` CPU devices. True when it does (set now, before the
    backends start, or already so); False when jax already started with other devices, in
    which case the caller must run the dry run in a fresh process (``launch/run.py`` re-executes
    itself with ``JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=n``)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(n))
        return True
    return jax.default_backend() == "cpu" and jax.device_count() >= n


def command(config: C.Config, *, devices=None, device_memory_gib=None, platform=None,
            as_json: bool = False, log=None) -> int:
    """Run the dry run and print it (a table, or one JSON object with ``as_json``); 0 when every
    program fits, 1 naming the programs that do not (on stderr)."""
    import json
    import sys

    rep = dry_run(config, devices=devices, device_memory_gib=device_memory_gib, platform=platform,
                  log=log)
    print(json.dumps(rep) if as_json else format_report(rep))
    if not rep["fits"]:
        for f in rep["failures"]:
            print(f"error: does not fit: {f}", file=sys.stderr)
        return 1
    return 0
