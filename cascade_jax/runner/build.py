"""Everything a stage needs, built from a run ``Config`` (no CLI here; ``launch/run.py``,
``launch/eval.py`` and the cascade call these).

=====================  =========================================================================
function               returns
=====================  =========================================================================
resolve_init           a Hub checkpoint directory for ``--init`` (a Hub dir or a run dir)
build_model            ``(model_cfg, params)``: a Hub checkpoint or a preset with seeded init
                       (with a mesh: every leaf created / read directly in its shards)
build_tokenizer        the checkpoint's tokenizer, or the tiny preset's built-in one
build_mesh             the device mesh of ``config.mesh`` (or ``None`` on one device)
build_sft_data         iterator of ``SFTBatch`` with ``get_state()`` / ``set_state()``
build_prompt_data      iterator of prompt batches with ``get_state()`` / ``set_state()``
build_engine           the rollout engine (``cascade_jax.rollout`` protocol)
build_scorers          ``{domain: scorer}`` for the stage's domains
build_teachers         ``{domain: (model_cfg, params)}`` for MOPD
build_sampling         the run's sampling contract (``rollout`` settings, stop at EOS)
build_train_step       the jitted ``step(state, batch) -> (state, metrics)`` (with a mesh:
                       ``cascade_jax.sharding.compile_train_step``, in/out shardings)
=====================  =========================================================================

Multi-device: :func:`build` first joins the job's processes
(``cascade_jax.sharding.initialize_distributed``, a no-op in a single process), then lays the
parameters, the train state and every batch out on the mesh of ``config.mesh`` by the logical
axis rules (``cascade_jax.sharding.RULES``); only process 0 writes logs and files
(``loop.run_stage``).

Every ``build_*`` raises a :class:`~cascade_jax.runner.errors.RunError` subclass naming the bad
input (exit codes in :mod:`cascade_jax.runner.errors`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cascade_jax import config as C
from cascade_jax import data
from cascade_jax import domains as D
from cascade_jax import rl
from cascade_jax import rollout as R
from cascade_jax import sharding
from cascade_jax.contract import RLBatch, SamplingParams, SFTBatch
from cascade_jax.data import PromptIterator, SFTIterator, Tokenizer
from cascade_jax.rewards import Scorer, make_scorer
from cascade_jax.rollout.factory import make_engine, sampling_params
from cascade_jax.rollout.teachers import Teachers
from cascade_jax.runner.errors import (CheckpointLoadError, ConfigError, InputFileError,
                                       RolloutUnavailable)
from cascade_jax.runner.preflight import check_memory, resolve_init
from models import nemotron_h as nh
from models.nemotron_h import invariant

__all__ = ["Parts", "RLParts", "TrainStep", "StageData", "build", "resolve_init", "build_model", "model_config", "build_tokenizer", "build_mesh",
           "start_distributed", "check_batch_fits_mesh", "ShardedStep", "build_sft_data", "build_prompt_data", "build_engine", "build_scorers",
           "build_teachers", "build_sampling", "build_train_step", "train_step_static", "compute_dtype", "validate", "stage_domains"]


#: ``step(state, batch) -> (state, metrics)``: ``jax.jit`` of ``rl.make_train_step`` or a
#: :class:`ShardedStep` (the state donated)
TrainStep = Callable[[rl.TrainState, Union[SFTBatch, RLBatch]], tuple]
#: the stage's data: packed SFT batches (``sft``) or prompt batches (``grpo`` / ``mopd``)
StageData = Union[SFTIterator, PromptIterator]


# --------------------------------------------------------------------------------------------
# Model


def model_config(config: C.Config) -> nh.ModelConfig:
    """The ``ModelConfig`` of ``config.model`` without loading weights (validates it)."""
    try:
        if config.model.checkpoint:
            ckpt = pathlib.Path(config.model.checkpoint)
            if not (ckpt / "config.json").is_file():
                raise InputFileError(f"model.checkpoint {ckpt}: no config.json there")
            mcfg = nh.ModelConfig.from_json_file(ckpt / "config.json")
        else:
            mcfg = nh.preset(config.model.preset)
        return nh.with_overrides(mcfg, **config.model.overrides)
    except (nh.ModelConfigError, nh.CheckpointError) as e:
        if config.model.checkpoint:
            raise CheckpointLoadError(f"model.checkpoint {config.model.checkpoint}: {e}") from None
        raise ConfigError(f"model: {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"model.checkpoint {config.model.checkpoint}: cannot read config.json "
                             f"({e})") from None


def build_model(config: C.Config, mesh: Optional[Mesh] = None) -> tuple[nh.ModelConfig, dict]:
    """``(model_cfg, params)`` from ``config.model``: a Hub checkpoint (loaded in
    ``model.dtype``) or the preset with parameters drawn from ``key(run.seed)``. With a
    ``mesh`` every leaf is created (``sharding.init_params``, the same values) or read
    (``sharding.load_params``, each device its slices) directly in its shards."""
    dtype = jnp.dtype(config.model.dtype)
    if config.model.checkpoint:
        try:
            if mesh is not None:
                try:
                    mcfg, params = sharding.load_params(config.model.checkpoint, mesh, dtype=dtype,
                                                        overrides=config.model.overrides or None)
                except sharding.ShardingError as e:
                    raise ConfigError(f"mesh: {e}") from None
            else:
                mcfg, params = nh.load_checkpoint(config.model.checkpoint, dtype=dtype)
            mcfg = nh.with_overrides(mcfg, **config.model.overrides)
        except (nh.CheckpointError, OSError, ValueError) as e:
            raise CheckpointLoadError(f"model.checkpoint {config.model.checkpoint}: "
                                      f"{str(e).splitlines()[0]}") from None
        want = nh.abstract_params(mcfg)
        if jax.tree.structure(want) != jax.tree.structure(params):
            raise CheckpointLoadError(
                f"model.checkpoint {config.model.checkpoint}: its parameters do not have the "
                f"configured model's structure (model.overrides {config.model.overrides})")
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                                jax.tree.leaves(params)):
            if tuple(a.shape) != tuple(b.shape):
                raise CheckpointLoadError(
                    f"model.checkpoint {config.model.checkpoint}: parameter "
                    f"{jax.tree_util.keystr(path)} has shape {tuple(b.shape)}, the configured "
                    f"model (model.overrides {config.model.overrides}) needs {tuple(a.shape)}")
        return mcfg, params
    mcfg = model_config(config)
    key = jax.random.key(config.run.seed)
    if mesh is not None:
        try:
            return mcfg, sharding.init_params(mcfg, key, mesh, dtype=dtype)
        except sharding.ShardingError as e:
            raise ConfigError(f"mesh: {e}") from None
    params = jax.jit(nh.init_params, static_argnums=(0, 2))(mcfg, key, dtype)
    return mcfg, params


def compute_dtype(config: C.Config) -> jnp.dtype:
    """Dtype of the compute copy in the train step and the engine (``model.dtype``)."""
    return jnp.dtype(config.model.dtype)


def start_distributed() -> bool:
    """Join a multi-process job (``cascade_jax.sharding.initialize_distributed``: SLURM, MPI,
    TPU pod or ``JAX_COORDINATOR_ADDRESS``; a no-op in a single process). Must run before any
    device is touched; idempotent (a cascade builds several stages in one process)."""
    if jax.distributed.is_initialized():
        return True
    return sharding.initialize_distributed()


def build_mesh(config: C.Config) -> Optional[Mesh]:
    """The device mesh of ``config.mesh`` over all processes' devices (``None`` on a single
    device, where plain ``jit`` is the sharded step). Sizes that do not multiply to the device
    count are a :class:`ConfigError` naming the axis."""
    if jax.device_count() == 1:
        return None
    try:
        mesh = sharding.make_mesh(config.mesh)
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None
    check_batch_fits_mesh(config, mesh)
    return mesh


def check_batch_fits_mesh(config: C.Config, mesh: Mesh) -> None:
    """The train batch ``[rows, T]`` splits over the mesh: rows over the batch axes
    (data x fsdp x expert, per micro-batch), ``T`` over the context axis; else a
    :class:`ConfigError` naming the fields (raised before anything is written)."""
    shape = sharding.mesh_shape(mesh)
    rules = sharding.RULES
    bdev = 1
    for a in rules.activations["batch"]:
        bdev *= shape.get(a, 1)
    cdev = 1
    for a in rules.activations["seq"]:
        cdev *= shape.get(a, 1)
    obj, d, r = config.stage.objective, config.data, config.rollout.sampling
    if obj == "sft":
        rows, rows_field, t, t_field = d.batch_rows, "data.batch_rows", d.seq_len, "data.seq_len"
    elif obj in ("grpo", "mopd"):
        rows, rows_field = d.batch_prompts * r.n_samples, "data.batch_prompts x rollout.sampling.n_samples"
        t, t_field = r.max_prompt_len + r.max_response_len, "rollout.sampling.max_prompt_len + max_response_len"
    else:
        return
    axes = " x ".join(f"{a}={shape.get(a, 1)}" for a in rules.activations["batch"])
    accum = config.optimizer.grad_accum
    if rows % accum or (rows // accum) % bdev:
        raise ConfigError(f"{rows_field} = {rows} rows: each of optimizer.grad_accum={accum} "
                          f"micro-batches must split evenly over the mesh's batch axes ({axes} = "
                          f"{bdev} devices)")
    if t % cdev:
        raise ConfigError(f"{t_field} = {t} tokens does not split over mesh.context={cdev}")


# --------------------------------------------------------------------------------------------
# Tokenizer and data


def build_tokenizer(config: C.Config) -> Tokenizer:
    """The run's tokenizer (``cascade_jax.data.tokenizer_for``: ``data.tokenizer``, else the
    checkpoint's, else the tiny preset's built-in one)."""
    try:
        return data.tokenizer_for(config)
    except (data.TokenizerError, OSError) as e:
        raise InputFileError(f"tokenizer: {e}") from None


def stage_domains(config: C.Config) -> tuple:
    """The stage's domains (``data.domains``), validated; error if empty for an RL stage."""
    for d in config.data.domains:
        if d not in D.DOMAINS:
            raise ConfigError(f"data.domains: unknown domain {d!r}; valid: {', '.join(D.DOMAINS)}")
    if not config.data.domains and config.stage.objective in ("grpo", "mopd"):
        raise ConfigError("data.domains: an RL stage needs at least one domain")
    return tuple(config.data.domains)


def _data_call(fn, config, tokenizer):
    try:
        it = fn(config, tokenizer, process_index=jax.process_index(),
                process_count=jax.process_count())
        it.check()  # bad rows / nothing usable: fail now, before the run writes anything
        return it
    except FileNotFoundError as e:
        raise InputFileError(f"data: {e}") from None
    except data.DataError as e:
        raise InputFileError(f"data: {e}") from None


def build_sft_data(config: C.Config, tokenizer: Tokenizer) -> SFTIterator:
    """Iterator of packed ``SFTBatch`` rows (``data.batch_rows`` rows of ``data.seq_len``)
    with ``get_state()`` / ``set_state()`` (``cascade_jax.data.sft_batches``)."""
    return _data_call(data.sft_batches, config, tokenizer)


def build_prompt_data(config: C.Config, tokenizer: Tokenizer) -> PromptIterator:
    """Iterator of ``PromptBatch`` (``ceil(data.batch_prompts × data.oversample)`` prompts with
    domain and verifier metadata) with ``get_state()`` / ``set_state()``
    (``cascade_jax.data.prompt_batches``)."""
    return _data_call(data.prompt_batches, config, tokenizer)


# --------------------------------------------------------------------------------------------
# Rollouts, rewards, teachers


def build_engine(config: C.Config, model_cfg: nh.ModelConfig, params: dict,
                 tokenizer: Tokenizer) -> R.RolloutEngine:
    """The rollout engine of ``rollout.engine`` (``cascade_jax.rollout.make_engine``): the
    embedded JAX engine, or the client of ``launch/serve.py`` / SGLang servers with its weight
    syncer (disk versions under ``rollout.sync.dir``, default ``<run dir>/weights``).
    An unreachable server is :class:`RolloutUnavailable`."""
    r = config.rollout
    sync_dir = str(pathlib.Path(config.run.out_dir) / "weights")
    try:
        eng = make_engine(r, model_cfg=model_cfg, params=params, sync_dir=sync_dir,
                          **({"keep_sessions": True} if config.agentic.keep_cache and r.engine == "jax" else {}))
    except ValueError as e:
        raise ConfigError(f"rollout: {e}") from None
    if r.engine != "jax":
        urls = ", ".join(getattr(eng, "urls", []) or r.servers.all_urls())
        try:
            healthy = eng.health()
        except R.RolloutError:
            healthy = False
        if not healthy:
            close = getattr(eng, "close", None)
            if close is not None:
                close()
            raise RolloutUnavailable(f"rollout server(s) {urls}: not reachable or not healthy")
        if r.fidelity.zero_mismatch:  # the servers must sample as the trainer recomputes
            try:
                eng.check_server_args(zero_mismatch=True,
                                      context_length=r.sampling.max_prompt_len + r.sampling.max_response_len)
            except R.RolloutError as e:
                eng.close()
                raise ConfigError(f"rollout.fidelity.zero_mismatch: {e}") from None
    return eng


def build_scorers(config: C.Config) -> dict[str, Scorer]:
    """``{domain: scorer}`` (``cascade_jax.rewards.make_scorer``, each with its worker pool)."""
    return {d: make_scorer(d) for d in stage_domains(config)}


def build_teachers(config: C.Config, student_cfg: nh.ModelConfig) -> Teachers:
    """``cascade_jax.rollout.teachers.Teachers`` from ``stage.teachers`` (domain → Hub
    checkpoint or run dir; a directory shared by several domains is loaded once). Every stage
    domain needs a teacher, and each teacher must share the student's vocabulary."""
    by_domain, loaded = {}, {}
    missing = [d for d in stage_domains(config) if d not in config.stage.teachers]
    if missing:
        raise ConfigError(f"stage.teachers: no teacher for domain(s) {missing}")
    for dom, path in sorted(config.stage.teachers.items()):
        hub = resolve_init(path, f"stage.teachers.{dom}")
        if hub not in loaded:
            try:
                tcfg, tparams = nh.load_checkpoint(hub, dtype=compute_dtype(config))
            except (nh.CheckpointError, OSError, ValueError) as e:
                raise CheckpointLoadError(f"stage.teachers.{dom} ({path}): "
                                          f"{str(e).splitlines()[0]}") from None
            if tcfg.vocab_size != student_cfg.vocab_size:
                raise CheckpointLoadError(
                    f"stage.teachers.{dom} ({path}): vocab_size {tcfg.vocab_size} differs from the "
                    f"student's {student_cfg.vocab_size}")
            loaded[hub] = (tcfg, tparams)
        by_domain[dom] = loaded[hub]
    return Teachers(by_domain)


def build_sampling(config: C.Config, tokenizer: Optional[Tokenizer] = None) -> SamplingParams:
    """The run's sampling contract (``cascade_jax.rollout.factory.sampling_params`` of
    ``config.rollout.sampling``, stopping at the tokenizer's EOS): what every request is sampled with,
    what each ``RLBatch`` records and what the train step, the teachers and the KL reference
    compute their log-probs at."""
    stop = () if tokenizer is None else (tokenizer.eos_id,)
    return sampling_params(config.rollout.sampling, stop_token_ids=stop)


# --------------------------------------------------------------------------------------------
# Train step


def train_step_static(config: C.Config, sampling: Optional[SamplingParams] = None) -> dict:
    """The keyword arguments of ``stage.objective``'s train step (``rl.make_train_step``) for
    this config (``sampling``: the run's :class:`SamplingParams`, else built from the config);
    the dry run (``cascade_jax.sharding.dryrun``) compiles the same step. RL steps get the
    stage's loss settings (``rl.loss_settings``), not the stage: its bookkeeping (name, steps,
    teachers) does not reach the compiled step."""
    obj = config.stage.objective
    static = dict(compute_dtype=compute_dtype(config), opt_cfg=config.optimizer)
    if obj in ("grpo", "mopd"):
        static.update(settings=rl.loss_settings(config.stage),
                      sampling=sampling or build_sampling(config))
        if config.rollout.fidelity.zero_mismatch:  # the kernel-invariant model's log-probs (rollout.exact.ExactEngine)
            static.update(model=invariant)
    return static


def build_train_step(config: C.Config, model_cfg: nh.ModelConfig, mesh: Optional[Mesh] = None,
                     sampling: Optional[SamplingParams] = None) -> TrainStep:
    """``step(state, batch) -> (state, metrics)`` for ``stage.objective`` with the state donated
    (the previous state's buffers are reused). With a ``mesh``: :class:`ShardedStep` (the step
    compiled by ``cascade_jax.sharding.compile_train_step`` with in/out shardings, each batch
    placed on the mesh first); without: plain ``jax.jit``. RL steps compute their log-probs at
    the temperature of the sampling contract ``sampling`` (default :func:`build_sampling`) and
    refuse a batch recorded at another one."""
    obj = config.stage.objective
    static = train_step_static(config, sampling)
    if mesh is not None:
        return ShardedStep(obj, mesh, model_cfg, dict(static, a2a=config.mesh.a2a))
    fn = rl.make_train_step(obj, jit=False, model_cfg=model_cfg, **static)
    return jax.jit(fn, donate_argnums=(0,))


class ShardedStep:
    """The objective's train step on ``mesh``: compiled on the first call (the shardings need
    the batch's shapes) by ``sharding.compile_train_step`` and again only if the batch's
    structure or shapes change. The state must already be laid out by
    ``sharding.shard_train_state``; each batch is placed on the mesh (``shard_batch``; with
    several processes ``global_batch`` from this process's rows)."""

    def __init__(self, objective: str, mesh: Mesh, model_cfg: nh.ModelConfig, static: dict):
        self.objective, self.mesh, self.model_cfg, self.static = objective, mesh, model_cfg, static
        self._compiled: dict = {}

    def place_batch(self, batch):
        try:
            if jax.process_count() > 1:
                return sharding.global_batch(batch, self.mesh)
            return sharding.shard_batch(batch, self.mesh)
        except sharding.ShardingError as e:
            raise ConfigError(f"mesh: batch does not fit the mesh: {e}") from None

    def __call__(self, state, batch):
        batch = self.place_batch(batch)
        key = (jax.tree.structure(batch),
               tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
        fn = self._compiled.get(key)
        if fn is None:
            fn = sharding.compile_train_step(self.objective, mesh=self.mesh, state=state,
                                             batch=batch, model_cfg=self.model_cfg, **self.static)
            self._compiled[key] = fn
            # processes compile at their own pace (one may hit the compilation cache): meet
            # before the first collective, whose CPU transport (gloo) gives up after 30 s
            sharding.sync_processes(f"train step {len(self._compiled)} compiled")
        return fn(state, batch)


# --------------------------------------------------------------------------------------------
# Validation (before anything is written)


def validate(config: C.Config) -> None:
    """Checks that need more than one field (single fields are checked by the config classes):
    the model section, lengths against the model's context, the stage's domains, the data's
    batch shape, sampling settings for RL (the files a stage reads:
    :func:`cascade_jax.runner.preflight.check_inputs`)."""
    mcfg = model_config(config)
    r, st = config.rollout.sampling, config.stage
    if st.objective in ("grpo", "mopd", "demo"):
        total = r.max_prompt_len + r.max_response_len
        if total > mcfg.max_position_embeddings:
            raise ConfigError(
                f"rollout.sampling.max_prompt_len + rollout.sampling.max_response_len = {total} exceeds the model's "
                f"max_position_embeddings {mcfg.max_position_embeddings} (model.preset "
                f"{config.model.preset!r}); lower rollout.sampling.max_response_len")
    if st.objective in ("grpo", "mopd"):
        stage_domains(config)
        if r.temperature <= 0:
            raise ConfigError(f"rollout.sampling.temperature: RL needs sampling (> 0; 0 is greedy decoding), "
                              f"got {r.temperature}")
    if st.objective == "sft" and config.data.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len {config.data.seq_len} exceeds the model's "
                          f"max_position_embeddings {mcfg.max_position_embeddings}")
    if config.data.batch_prompts < 1:
        raise ConfigError(f"data.batch_prompts: must be >= 1, got {config.data.batch_prompts}")


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RLParts:
    """What an RL stage (``grpo`` / ``mopd``) adds: the rollout engine (embedded, or the client
    of rollout servers with its weight syncer), one scorer per stage domain, and MOPD's
    per-domain teachers (``None`` for GRPO)."""

    engine: R.RolloutEngine
    scorers: dict[str, Scorer]
    teachers: Optional[Teachers] = None


@dataclasses.dataclass
class Parts:
    """What :func:`build` returns. ``params`` is the initial master copy (the stage moves it
    into its train state and drops it here); ``mesh`` is ``None`` on one device; ``data`` is
    ``None`` for objectives without a data stream (``demo``); ``rl`` is set for RL stages."""

    model_cfg: nh.ModelConfig
    params: Optional[dict]
    tokenizer: Tokenizer
    mesh: Optional[Mesh]
    train_step: TrainStep
    sampling: SamplingParams
    data: Optional[StageData] = None
    rl: Optional[RLParts] = None


def build(config: C.Config) -> Parts:
    """Everything ``config``'s stage needs (see the module table), validated first."""
    validate(config)
    start_distributed()
    mesh = build_mesh(config)
    # the cheap checks first: tokenizer, data and memory before any weights are made
    tokenizer = build_tokenizer(config)
    model_cfg = model_config(config)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens > model vocab_size "
                          f"{model_cfg.vocab_size}")
    sampling = build_sampling(config, tokenizer)
    obj = config.stage.objective
    stream = None
    if obj == "sft":
        stream = build_sft_data(config, tokenizer)
    elif obj in ("grpo", "mopd") and not config.agentic.env:  # agentic: tasks from the environment
        stream = build_prompt_data(config, tokenizer)
    check_memory(config, model_cfg)
    model_cfg, params = build_model(config, mesh)
    train_step = build_train_step(config, model_cfg, mesh, sampling)
    rl_parts = None
    if obj in ("grpo", "mopd"):
        scorers = build_scorers(config)
        teachers = build_teachers(config, model_cfg) if obj == "mopd" else None
        rl_parts = RLParts(engine=build_engine(config, model_cfg, params, tokenizer),
                           scorers=scorers, teachers=teachers)
    return Parts(model_cfg=model_cfg, params=params, tokenizer=tokenizer, mesh=mesh,
                 train_step=train_step, sampling=sampling,
                 data=stream, rl=rl_parts)
