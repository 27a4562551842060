"""Typed, immutable, validated run configs.

Choice: plain frozen :mod:`dataclasses` plus ~150 lines of validation here, rather than a
config library. Reasons: no extra dependency on pods, configs are ordinary pytrees-of-values
that pickle and hash, type hints are the schema, and errors can name the bad field and list
the valid ones (``ConfigError: unknown key 'optimizer.lrr'; valid keys: b1, b2, ...``).

A run config is composed from sections::

    Config(model=..., mesh=..., optimizer=..., rollout=..., data=..., stage=..., run=...)

and is built from JSON files (``load``; a file may extend another with ``"base": "<file>"``, e.g.
the tiny stages each extend ``configs/tiny/base.json``), dicts (``from_dict``) and command-line overrides
(``apply_overrides(cfg, ["optimizer.lr=2e-6", "stage.steps=52"])``), and written back with
``to_json``. Values in overrides are parsed as JSON when possible (``1e-3``, ``true``,
``[1, 2]``, ``null``) and fall back to the raw string.

Sections are split by who reads them: ``rollout`` holds ``engine`` (the backend switch) and the
sections ``sampling`` (the sampling contract), ``batching`` (the embedded engine), ``servers`` (the
client), ``sync`` (the weight syncer) and ``fidelity``. A key that moved is an error naming its new
path (``rollout.temperature moved to rollout.sampling.temperature``); :data:`ROLLOUT_MOVED` is the
one table of moves, and :func:`migrate_dict` (run dirs, on resume) and ``launch/migrate_config.py``
(files) apply it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from typing import Any, Literal, Optional, Sequence

from cascade_jax import domains as D

__all__ = [
    "ConfigError", "ModelSection", "MeshConfig", "A2A_MODES", "OptimizerConfig", "RolloutConfig",
    "DataSource", "DataConfig", "StageConfig", "RunConfig", "EvalConfig", "AgenticConfig", "AGENTIC_DOMAINS", "Config", "from_dict", "to_dict", "to_json",
    "load", "load_dict", "merge", "apply_overrides", "replace_path", "migrate_dict",
    "migrate_rollout", "migrate_override", "moved_keys", "ROLLOUT_MOVED", "SamplingSection",
    "BatchingSection", "ServersSection", "SyncSection", "FidelitySection",
]


class ConfigError(ValueError):
    """A config value or key is invalid. The message names the dotted path of the field."""


# --------------------------------------------------------------------------------------------
# Sections


def _hash_by_value(self) -> int:
    """Hash for sections with free-form mapping fields, so every config can be a static jit arg."""
    return hash(json.dumps(to_dict(self), sort_keys=True))


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which policy to build. ``overrides`` are ``ModelConfig`` fields applied to the preset or
    to the checkpoint's config (validated against ``ModelConfig``'s fields)."""

    preset: str = "tiny"
    checkpoint: Optional[str] = None  # Hub-layout directory; wins over ``preset``
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    overrides: dict = dataclasses.field(default_factory=dict)

    __hash__ = _hash_by_value


#: the expert-parallel token exchanges ``MeshConfig.a2a`` accepts (cascade_jax.sharding.moe)
A2A_MODES = ("auto", "ragged", "padded")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means "all remaining devices" (at most one axis). ``a2a``: the
    expert-parallel token exchange (with an ``expert`` axis > 1): ``auto`` = ``ragged`` on
    GPU/TPU, ``padded`` on CPU; ``ragged`` (``jax.lax.ragged_all_to_all``, GPU/TPU only) moves
    only the routed rows; ``padded`` pads every block to the worst case (any platform)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    context: int = 1
    a2a: Literal[A2A_MODES] = "auto"

    def __post_init__(self):
        fields = [f for f in dataclasses.fields(self) if f.name != "a2a"]
        sizes = [getattr(self, f.name) for f in fields]
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError("mesh: at most one axis may be -1")
        for f, s in zip(fields, sizes):
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{f.name}: must be a positive size or -1, got {s}")
        if self.a2a not in A2A_MODES:
            raise ConfigError(f"mesh.a2a: must be one of {list(A2A_MODES)}, got {self.a2a!r}")

    @classmethod
    def from_text(cls, text: str, *, field: str = "--mesh") -> "MeshConfig":
        """The command-line form: ``"tensor:4,expert:2"`` -> ``MeshConfig(tensor=4, expert=2)``,
        every unnamed axis 1 (no -1). Raises :class:`ConfigError` naming ``field`` and the bad
        entry. Pure Python: launch scripts parse the mesh before jax starts."""
        axes = [f.name for f in dataclasses.fields(cls) if f.name != "a2a"]
        sizes = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, sep, val = part.partition(":")
            name = name.strip()
            if not sep or name not in axes:
                raise ConfigError(f"{field}: bad entry {part!r}; expected axis:size with axis in "
                                  f"{', '.join(axes)}")
            if name in sizes:
                raise ConfigError(f"{field}: axis {name!r} given twice")
            try:
                sizes[name] = int(val)
            except ValueError:
                raise ConfigError(f"{field}: size of {name!r} must be an integer, got {val!r}") from None
            if sizes[name] < 1:
                raise ConfigError(f"{field}: size of {name!r} must be >= 1, got {sizes[name]}")
        if not sizes:
            raise ConfigError(f"{field}: empty mesh {text!r}; expected e.g. 'tensor:4,expert:2'")
        return cls(**{a: sizes.get(a, 1) for a in axes})


#: platforms of ``target.platform`` and the chips of ``target.chip`` (peak figures in
#: cascade_jax/sharding/dryrun.py)
PLATFORMS = ("gpu", "tpu")
CHIPS = {"gpu": ("h100", "h200"), "tpu": ("v5p",)}


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The pod a stage is planned for (``launch/run.py --dry-run``,
    :mod:`cascade_jax.sharding.dryrun`): ``devices`` accelerators (0 = the product of the
    ``mesh`` sizes, which must not contain -1 then) of ``device_memory_gib`` each on
    ``platform``; ``chip`` (default ``h100`` on gpu, ``v5p`` on tpu) gives the documented peak
    FLOP/s and HBM bandwidth of the roofline estimate; a program fits when it leaves at least
    ``headroom`` of the device memory free. ``rollout_mesh``: the rollout engine's mesh over the
    devices of one node (``tensor`` / ``expert`` / ``data`` axes, no -1; its size is the engine's
    device count)."""

    devices: int = 0
    platform: Literal[PLATFORMS] = "gpu"
    chip: str = ""
    device_memory_gib: float = 80.0
    headroom: float = 0.10
    rollout_mesh: MeshConfig = MeshConfig(fsdp=1)

    def __post_init__(self):
        if self.devices < 0:
            raise ConfigError(f"target.devices: must be >= 0 (0 = the mesh's size), got {self.devices}")
        if self.platform not in PLATFORMS:
            raise ConfigError(f"target.platform: must be one of {list(PLATFORMS)}, got {self.platform!r}")
        if self.chip and self.chip not in CHIPS[self.platform]:
            raise ConfigError(f"target.chip: {self.chip!r} is not a {self.platform} chip; one of "
                              f"{list(CHIPS[self.platform])}")
        if not self.device_memory_gib > 0:
            raise ConfigError(f"target.device_memory_gib: must be > 0, got {self.device_memory_gib}")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"target.headroom: must be in [0, 1), got {self.headroom}")
        m = self.rollout_mesh
        for name in ("data", "fsdp", "expert", "tensor", "context"):
            if getattr(m, name) < 1:
                raise ConfigError(f"target.rollout_mesh.{name}: must be >= 1 (no -1), got {getattr(m, name)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up from ``warmup_init_lr`` to ``lr`` over ``warmup_steps``, then
    ``schedule`` (constant or cosine down to ``min_lr`` at ``decay_steps``)."""

    lr: float = 3e-6
    warmup_init_lr: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    decay_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr: must be > 0, got {self.lr}")
        if self.grad_accum < 1:
            raise ConfigError(f"optimizer.grad_accum: must be >= 1, got {self.grad_accum}")
        for name in ("b1", "b2"):  # the paper's b2 0.95 vs NeMo-RL's 0.999: configs/SOURCES.md
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optimizer.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps: must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay: must be >= 0 (0 = off), got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"optimizer.grad_clip: must be >= 0 (0 = no clipping), got {self.grad_clip}")


def _check_sampling(section: str, temperature: float, top_p: float, top_k: int):
    """Sampling settings: ``temperature >= 0`` (0 = greedy), ``top_p`` in (0, 1], ``top_k`` -1
    (off) or >= 1."""
    if not temperature >= 0:
        raise ConfigError(f"{section}.temperature: must be >= 0 (0 = greedy, argmax decoding), "
                          f"got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{section}.top_p: must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise ConfigError(f"{section}.top_k: must be -1 (off) or >= 1, got {top_k}")


def _json_at(path: str, value: Any) -> str:
    """``a.b.c`` and ``v`` as the JSON a config file writes: ``"a": {"b": {"c": v}}``."""
    *outer, leaf = path.split(".")
    text = f"{json.dumps(leaf)}: {json.dumps(value)}"
    for name in reversed(outer[1:]):
        text = f"{json.dumps(name)}: {{{text}}}"
    return f"{json.dumps(outer[0])}: {{{text}}}" if outer else text


def _removed_greedy(section: str, value: Any, temperature: str = "") -> str:
    """The migration message for the removed ``<section>.greedy`` switch (``temperature``: the
    dotted path of the section's temperature, default ``<section>.temperature``)."""
    t = temperature or f"{section}.temperature"
    if value is True:
        return (f"{section}.greedy: removed; temperature 0 means greedy: write "
                f"{_json_at(t, 0)} (--set {t}=0) and drop {section}.greedy")
    return (f"{section}.greedy: removed; {t} alone sets the sampling (0 = greedy): "
            f"drop {section}.greedy")


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """``rollout.sampling``: what every request is sampled with and how long prompts and
    responses may be: the sampling contract (:func:`cascade_jax.rollout.factory.sampling_params`
    builds :class:`~cascade_jax.contract.sampling.SamplingParams` from this section alone), read
    by the engine, the data (``max_prompt_len``, ``thinking``), the train step and the dry run.

    ``n_samples`` responses per prompt; ``temperature`` τ (0 = greedy, argmax decoding);
    ``top_p`` in (0, 1]; ``top_k`` -1 (off) or >= 1; ``thinking``: prompts rendered with the
    chat template's thinking mode; ``seed``: the engine's seed for requests without one."""

    n_samples: int = 16
    max_prompt_len: int = 1024
    max_response_len: int = 49152
    temperature: float = 1.0  # τ; 0 = greedy (argmax decoding)
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    thinking: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("n_samples", "max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.sampling.{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"rollout.sampling.seed: must be >= 0, got {self.seed}")
        _check_sampling("rollout.sampling", self.temperature, self.top_p, self.top_k)


@dataclasses.dataclass(frozen=True)
class BatchingSection:
    """``rollout.batching``: the embedded engine's batching (``rollout.engine`` ``jax``; read by
    :func:`~cascade_jax.rollout.factory.make_engine` and the dry run). ``num_slots`` sequences
    decoded together, ``steps_per_call`` tokens per jitted call; ``prefill_sizes`` the admission
    row counts (empty = powers of two up to ``num_slots``): a prompt's prefill rounds differently
    with the number of rows prefilled with it (measured on CPU), so a single size makes it
    independent of what arrives with it: with ``[1]`` here and ``--prefill-sizes 1`` on
    ``launch/serve.py`` the two draw bit-identical samples for the same seeds;
    ``prefill_chunk`` > 0: prompts prefilled in chunks of at most that many tokens per row, each
    continuing the slot's cache (0 = one call)."""

    num_slots: int = 64
    steps_per_call: int = 16
    prefill_sizes: tuple = ()
    prefill_chunk: int = 0  # 0 = a prompt is prefilled in one call

    def __post_init__(self):
        for name in ("num_slots", "steps_per_call"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.batching.{name}: must be >= 1, got {getattr(self, name)}")
        for i, z in enumerate(self.prefill_sizes):
            if not (isinstance(z, int) and not isinstance(z, bool) and 1 <= z <= self.num_slots):
                raise ConfigError(f"rollout.batching.prefill_sizes[{i}]: must be an integer in [1, "
                                  f"rollout.batching.num_slots={self.num_slots}], got {z!r}")
        if not (isinstance(self.prefill_chunk, int) and not isinstance(self.prefill_chunk, bool)
                and self.prefill_chunk >= 0):
            raise ConfigError(f"rollout.batching.prefill_chunk: must be an integer >= 0 (0 = off), "
                              f"got {self.prefill_chunk!r}")


@dataclasses.dataclass(frozen=True)
class ServersSection:
    """``rollout.servers``: the transport to rollout servers (``rollout.engine`` ``jax_server`` /
    ``sglang``; read by the client, :class:`~cascade_jax.rollout.client.ServerClient`).
    ``url`` and/or ``urls`` list them (every weight update goes to each directly); ``router_url``
    (an ``sglang-router``) then carries ``/generate``; ``api_key`` is sent as ``Authorization:
    Bearer``; at most ``max_concurrency`` requests in flight per server, each with
    ``request_timeout_s`` and up to ``max_retries`` retries."""

    url: Optional[str] = None
    urls: tuple = ()
    router_url: Optional[str] = None
    api_key: Optional[str] = None
    max_concurrency: int = 32
    request_timeout_s: float = 600.0
    max_retries: int = 5

    def __post_init__(self):
        urls = [("url", self.url), ("router_url", self.router_url)]
        urls += [(f"urls[{i}]", u) for i, u in enumerate(self.urls)]
        for name, url in urls:
            if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
                raise ConfigError(f"rollout.servers.{name}: expected an http(s):// URL, got {url!r}")
        if self.max_concurrency < 1:
            raise ConfigError(f"rollout.servers.max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"rollout.servers.max_retries: must be >= 0, got {self.max_retries}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"rollout.servers.request_timeout_s: must be > 0, got {self.request_timeout_s}")

    def all_urls(self) -> list:
        """``url`` first, then the other ``urls`` (each once)."""
        return ([self.url] if self.url else []) + [u for u in self.urls if u != self.url]


@dataclasses.dataclass(frozen=True)
class SyncSection:
    """``rollout.sync``: how new weights reach rollout servers (read by the weight syncer,
    :func:`~cascade_jax.rollout.factory.make_weight_sync`). ``method``: ``disk`` (versioned Hub
    checkpoints under ``dir``, default ``<run.out_dir>/weights``, the last ``keep_versions``
    kept) or ``nccl`` (torch.distributed broadcast of ``nccl_bucket_mb`` buckets over
    ``nccl_backend``; ``gloo`` on CPU); each sync times out after ``timeout_s`` and is verified
    to ``tol`` (max |Δ log p| on a probe set)."""

    method: Literal["disk", "nccl"] = "disk"
    dir: Optional[str] = None  # default: <run.out_dir>/weights
    keep_versions: int = 2
    timeout_s: float = 600.0
    tol: float = 1e-3
    nccl_backend: Literal["nccl", "gloo"] = "nccl"
    nccl_master_address: str = "127.0.0.1"
    nccl_master_port: int = 0  # 0 = a free port
    nccl_bucket_mb: int = 512

    def __post_init__(self):
        for name in ("keep_versions", "nccl_bucket_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.sync.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "tol"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rollout.sync.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.nccl_master_port < 65536:
            raise ConfigError(f"rollout.sync.nccl_master_port: must be in [0, 65536), "
                              f"got {self.nccl_master_port}")


@dataclasses.dataclass(frozen=True)
class FidelitySection:
    """``rollout.fidelity``: how exactly the trainer recomputes what the engine sampled (read by
    the engine factory, the runner and the dry run). ``routing_replay`` asks the engine for the
    experts of every token and MoE layer and replays them in the trainer's forward (R3; servers
    must run with ``--enable-return-routed-experts``); ``zero_mismatch`` samples every token from
    the trainer's own batch-invariant log-probs (``cascade_jax.rl.next_token_logprobs``), so the
    trainer recomputes the sampling log-probs bit for bit (IS ratios exactly 1): in process, or
    by ``launch/serve.py --zero-mismatch --max-len max_prompt_len + max_response_len`` servers
    (checked at start)."""

    routing_replay: bool = False
    zero_mismatch: bool = False


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How responses are generated, in sections by reader: ``engine`` picks the backend
    (:func:`cascade_jax.rollout.make_engine`): ``jax`` = the embedded engine in this process
    (``batching``), ``jax_server`` = JAX rollout servers (``launch/serve.py``), ``sglang`` =
    SGLang servers (both through ``servers`` and ``sync``); ``sampling`` is the sampling
    contract every backend draws with, ``fidelity`` the rollout/trainer agreement, and
    ``max_policy_lag`` how far rollouts may trail the trainer (the runner). The flat keys of
    older configs (``rollout.temperature``) are errors naming their new place
    (:data:`ROLLOUT_MOVED`); :func:`migrate_dict` moves them."""

    engine: Literal["jax", "jax_server", "sglang"] = "jax"
    sampling: SamplingSection = SamplingSection()
    batching: BatchingSection = BatchingSection()
    servers: ServersSection = ServersSection()
    sync: SyncSection = SyncSection()
    fidelity: FidelitySection = FidelitySection()
    #: 0 = strictly on-policy (the paper): step t trains on rollouts of the weights after step
    #: t-1; 1 = one step off-policy (NeMo-RL's ``max_trajectory_age_steps: 1``): the rollouts of
    #: step t+1 are drawn while step t trains, from the weights after step t-1
    max_policy_lag: int = 0

    def __post_init__(self):
        if self.max_policy_lag not in (0, 1):
            raise ConfigError(f"rollout.max_policy_lag: must be 0 (strictly on-policy) or 1 (one step "
                              f"off-policy), got {self.max_policy_lag}")
        if self.max_policy_lag and self.engine == "jax":
            raise ConfigError("rollout.max_policy_lag: 1 needs a served engine (rollout.engine 'jax_server' or "
                              "'sglang'): the in-process engine shares the trainer's devices and weight buffers, "
                              "got engine 'jax'")
        if self.engine in ("sglang", "jax_server") and not self.servers.all_urls():
            raise ConfigError(f"rollout.servers.url: required (or rollout.servers.urls) when rollout.engine is "
                              f"'{self.engine}'")
        s = self.sampling
        if self.fidelity.zero_mismatch and self.engine == "sglang":
            raise ConfigError("rollout.fidelity.zero_mismatch: needs rollout.engine 'jax' or 'jax_server' (a "
                              "launch/serve.py --zero-mismatch server); SGLang's kernels are not the trainer's, "
                              "got engine 'sglang'")
        if self.fidelity.zero_mismatch and (s.top_p < 1.0 or s.top_k != -1):
            raise ConfigError(f"rollout.fidelity.zero_mismatch: samples from the full distribution; needs "
                              f"rollout.sampling.top_p 1 and rollout.sampling.top_k -1, got top_p {s.top_p}, "
                              f"top_k {s.top_k}")


#: Where each flat key of the rollout section (before it was split by reader) lives now, under
#: ``rollout``: the one table behind the moved-key errors, :func:`migrate_dict` (run dirs) and
#: ``launch/migrate_config.py`` (config files, docs, tests)
ROLLOUT_MOVED = {
    **{k: f"sampling.{k}" for k in ("n_samples", "max_prompt_len", "max_response_len", "temperature",
                                    "top_p", "top_k", "thinking", "seed")},
    **{k: f"batching.{k}" for k in ("num_slots", "steps_per_call", "prefill_sizes", "prefill_chunk")},
    "server_url": "servers.url", "server_urls": "servers.urls",
    **{k: f"servers.{k}" for k in ("router_url", "api_key", "max_concurrency", "request_timeout_s",
                                   "max_retries")},
    "weight_sync": "sync.method", "weight_sync_dir": "sync.dir", "sync_timeout_s": "sync.timeout_s",
    "sync_tol": "sync.tol",
    **{k: f"sync.{k}" for k in ("keep_versions", "nccl_backend", "nccl_master_address",
                                "nccl_master_port", "nccl_bucket_mb")},
    **{k: f"fidelity.{k}" for k in ("routing_replay", "zero_mismatch")},
}



@dataclasses.dataclass(frozen=True)
class DataSource:
    """One data source of ``data.sources`` (read by :mod:`cascade_jax.data`).

    ``path``: a file, a glob or a directory (all matching files, sorted); unused for ``tiny``.
    ``format``: ``jsonl`` (plain or ``.gz``), ``parquet``, ``array_record`` (records are UTF-8
    JSON rows), ``tfds`` (a prepared TFDS dataset directory, ArrayRecord files, read without
    TensorFlow; ``split`` names the split), ``tiny`` (the built-in tiny domains of
    ``cascade_jax.data.tiny``), or ``generated``: the rows a Python function returns, ``path``
    naming it ``module:function``, called as ``function(seed=data.shuffle_seed, **args)`` (e.g.
    ``cascade_jax.agentic.swe:swe_sft_rows``, the canonical agentic episodes as SFT rows;
    ``configs/tiny/sft_agentic.json``).
    ``fields``: canonical field -> key in the row (dotted paths reach nested keys), e.g.
    ``{"messages": "conversation", "domain": "env", "metadata.answer": "expected_answer"}``;
    unmapped canonical fields are read under their own name (see ``cascade_jax.data.rows``).
    ``weight``: mixing weight among the sources. ``domain``: the domain of every row (else read
    from the row's ``domain`` field).
    """

    path: str = ""
    format: Literal["jsonl", "parquet", "array_record", "tfds", "tiny", "generated"] = "jsonl"
    fields: dict = dataclasses.field(default_factory=dict)
    weight: float = 1.0
    domain: Optional[str] = None
    split: str = "train"
    args: dict = dataclasses.field(default_factory=dict)

    __hash__ = _hash_by_value

    def __post_init__(self):
        if not self.weight > 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")
        if self.format != "tiny" and not self.path:
            raise ConfigError(f"path: required for format {self.format!r}")
        if self.format == "generated" and self.path.count(":") != 1:
            raise ConfigError(f"path: a generated source names its function 'module:function', "
                              f"got {self.path!r}")
        if self.args and self.format != "generated":
            raise ConfigError(f"args: only a generated source takes arguments, not format "
                              f"{self.format!r}")
        for k, v in self.fields.items():
            if not isinstance(v, str) or not v:
                raise ConfigError(f"fields.{k}: expected a non-empty row key, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompt (RL) and SFT data: sources, mixing, batching, packing (``cascade_jax.data``).

    RL: ``batch_prompts`` prompts per step (times ``oversample`` for dynamic filtering) drawn
    from ``domains`` (empty: every domain in the sources) with ``domain_weights`` (empty:
    proportional to the rows per domain); ``domain_draw``: how a batch's per-domain counts are
    drawn from the weights, ``multinomial`` (independent draws) or ``stratified`` (every domain
    gets ``floor`` or ``ceil`` of its expected count, same expectation;
    ``cascade_jax.data.prompts``). SFT: ``batch_rows`` packed rows of ``seq_len`` tokens per
    step; examples longer than ``seq_len`` are dropped or truncated (``overlong``);
    ``pack_buffer`` examples of look-ahead for packing. ``on_bad_row``: ``error`` (naming
    file:line) or ``skip`` (counted). ``tokenizer``: directory with ``tokenizer.json`` (default:
    ``model.checkpoint``, else the tiny tokenizer). ``num_epochs``: ``None`` repeats forever.
    The built-in tiny source: ``tiny_rows_per_domain`` rows per domain, of which a share
    ``tiny_near_miss_rate`` answer with the example's near miss (``cascade_jax.data.tiny``).
    """

    sources: tuple[DataSource, ...] = (DataSource(format="tiny"),)
    domains: tuple = ()
    domain_weights: dict = dataclasses.field(default_factory=dict)
    domain_draw: Literal["multinomial", "stratified"] = "multinomial"
    batch_prompts: int = 128
    oversample: float = 1.0
    batch_rows: int = 1
    seq_len: int = 4096
    overlong: Literal["drop", "truncate"] = "drop"
    pack_buffer: int = 256
    shuffle_seed: int = 0
    num_epochs: Optional[int] = None
    on_bad_row: Literal["error", "skip"] = "error"
    tokenizer: Optional[str] = None
    tiny_rows_per_domain: int = 1024
    tiny_near_miss_rate: float = 0.3

    __hash__ = _hash_by_value

    def __post_init__(self):
        if not self.sources:
            raise ConfigError("data.sources: at least one source is required")
        for name in ("batch_prompts", "batch_rows", "seq_len", "pack_buffer", "tiny_rows_per_domain"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.tiny_near_miss_rate <= 1.0:
            raise ConfigError(f"data.tiny_near_miss_rate: must be in [0, 1], got {self.tiny_near_miss_rate}")
        if self.oversample < 1.0:
            raise ConfigError(f"data.oversample: must be >= 1, got {self.oversample}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs: must be >= 1 or null, got {self.num_epochs}")
        for k, w in self.domain_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"data.domain_weights.{k}: expected a weight >= 0, got {w!r}")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One cascade stage (docs/algorithms.md §3)."""

    name: str = "demo"
    objective: Literal["sft", "grpo", "mopd", "demo"] = "demo"
    steps: int = 1
    kl_coef: float = 0.0
    overlong_filtering: bool = False
    dynamic_filtering: bool = False
    leave_one_out: bool = False
    is_correction: Literal["none", "tis", "icepop"] = "tis"
    is_low: float = 0.5
    is_high: float = 2.0
    teachers: dict = dataclasses.field(default_factory=dict)  # domain -> checkpoint
    #: MOPD loss normalisation (rl.losses.mopd_loss): "sequence" (the paper's Eq. 4), "token"
    #: (per token over the global batch, NVIDIA's replication) or "domain" (each domain equal)
    loss_norm: Literal["sequence", "token", "domain"] = "sequence"
    #: MOPD per-domain loss weight λ_d (domain name -> weight >= 0; absent domains weigh 1):
    #: scales the domain's part of the loss after ``loss_norm`` (rl.losses.mopd_loss)
    domain_loss_weights: dict = dataclasses.field(default_factory=dict)
    #: MOPD forward-KL weight β (rl.losses.mopd_loss; 0 = the paper's loss): adds
    #: β · KL(teacher ‖ student) over the teacher's ``teacher_topk`` most likely tokens at each
    #: sampled prefix (docs/mopd.md §10)
    forward_kl_coef: float = 0.0
    #: how many of the teacher's most likely tokens per position the forward-KL term reads
    #: (read only when ``forward_kl_coef > 0``)
    teacher_topk: int = 0

    __hash__ = _hash_by_value

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"stage.steps: must be >= 0, got {self.steps}")
        if not 0.0 < self.is_low < self.is_high:
            raise ConfigError(
                f"stage.is_low/is_high: need 0 < is_low < is_high, got {self.is_low}, {self.is_high}")
        if self.loss_norm not in ("sequence", "token", "domain"):
            raise ConfigError(f"stage.loss_norm: must be one of ['sequence', 'token', 'domain'], "
                              f"got {self.loss_norm!r}")
        for k, w in self.domain_loss_weights.items():
            if k not in D.DOMAIN_IDS:
                raise ConfigError(f"stage.domain_loss_weights.{k}: unknown domain; valid: "
                                  f"{list(D.DOMAINS)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
                raise ConfigError(f"stage.domain_loss_weights.{k}: expected a finite weight >= 0, "
                                  f"got {w!r}")
        if isinstance(self.forward_kl_coef, bool) or not 0 <= self.forward_kl_coef < float("inf"):
            raise ConfigError(f"stage.forward_kl_coef: expected a finite number >= 0, got "
                              f"{self.forward_kl_coef!r}")
        if isinstance(self.teacher_topk, bool) or not isinstance(self.teacher_topk, int) \
                or self.teacher_topk < 0:
            raise ConfigError(f"stage.teacher_topk: expected an integer >= 0, got "
                              f"{self.teacher_topk!r}")
        if self.forward_kl_coef > 0 and self.teacher_topk < 1:
            raise ConfigError(f"stage.teacher_topk: stage.forward_kl_coef > 0 needs teacher_topk "
                              f">= 1 (the teacher's K most likely tokens per position), got "
                              f"{self.teacher_topk}")
        if self.forward_kl_coef and self.objective != "mopd":
            raise ConfigError(f"stage.forward_kl_coef: read only by objective 'mopd', this "
                              f"stage's objective is {self.objective!r}")
        if self.domain_loss_weights and self.objective != "mopd":
            raise ConfigError(f"stage.domain_loss_weights: read only by objective 'mopd', this "
                              f"stage's objective is {self.objective!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Bookkeeping: output directory, seed, logging and checkpoint cadence, retention (last
    ``keep_last`` plus the ``keep_best`` best by eval score), Hub exports every ``export_every``
    steps (0 = only the final one), ``jax.profiler`` traces of the steps in ``profile_steps``
    (numbered as in ``metrics.jsonl``: the first step is 1; written to ``<run dir>/profile``,
    readable by TensorBoard's profile plugin or Perfetto).

    Checkpoints are preemption-safe by default: one every ``checkpoint_every`` steps (0 = off)
    and one whenever ``checkpoint_every_s`` seconds of wall time have passed since the last
    (0 = off), besides the final one and the one written when SIGTERM / SIGINT stops the stage
    (``cascade_jax.runner.loop``). Neither cadence changes the results: a run dir resumes
    under another cadence."""

    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 1000
    checkpoint_every_s: float = 1800.0
    keep_last: int = 3
    keep_best: int = 1
    async_checkpoint: bool = True
    export_every: int = 0
    profile_steps: tuple = ()

    def __post_init__(self):
        for name in ("log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_best", "export_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name}: must be >= 0, got {getattr(self, name)}")
        if not self.checkpoint_every_s >= 0:
            raise ConfigError(f"run.checkpoint_every_s: must be >= 0 seconds (0 = off), got "
                              f"{self.checkpoint_every_s}")
        bad = [s for s in self.profile_steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ConfigError(f"run.profile_steps: step numbers start at 1 (as in metrics.jsonl), "
                              f"got {bad}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (``launch/eval.py`` and the runner's periodic eval every ``every`` steps;
    0 = only at the end, -1 = never): ``prompts`` held-out prompts per domain, ``k`` samples
    each (avg@k, pass@k), sampling settings as in ``rollout`` (``max_response_len`` 0 = the
    rollout's)."""

    every: int = 0
    prompts: int = 16
    k: int = 4
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1
    max_response_len: int = 0
    seed: int = 1234

    def __post_init__(self):
        if self.every < -1:
            raise ConfigError(f"eval.every: must be >= -1, got {self.every}")
        for name in ("prompts", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_response_len < 0:
            raise ConfigError(f"eval.max_response_len: must be >= 0, got {self.max_response_len}")
        _check_sampling("eval", self.temperature, self.top_p, self.top_k)


#: agentic environment -> the domain its episodes are scored and logged under
AGENTIC_DOMAINS = {"lookup": "tool_call", "swe": "swe"}


@dataclasses.dataclass(frozen=True)
class AgenticConfig:
    """Multi-turn rollouts (``cascade_jax.agentic``, docs/agentic.md §8): with ``env`` set a GRPO
    stage draws its rollouts as episodes of that environment (``lookup``: the tiny tool domain,
    ``swe``: the OpenHands-style SWE loop), ``data.batch_prompts`` tasks × ``rollout.sampling.n_samples``
    episodes per step, tasks generated from the step's key (``task_args`` go to the generator,
    e.g. ``{"n_keys": 4}``). Per episode at most ``max_turns`` assistant turns of
    ``max_new_tokens`` each (0 = ``rollout.sampling.max_response_len``) and ``rollout.sampling.max_prompt_len +
    rollout.sampling.max_response_len`` tokens in the row; ``end_on_length``: a cut turn ends the
    episode; ``tool_workers`` threads run environment steps; ``keep_cache``: the engine (embedded,
    or JAX rollout servers with ``--keep-sessions``) keeps each episode's cache between turns
    and prefills only the new tokens."""

    env: Literal["", "lookup", "swe"] = ""
    max_turns: int = 4
    max_new_tokens: int = 0
    end_on_length: bool = True
    tool_workers: int = 4
    keep_cache: bool = False
    task_args: dict = dataclasses.field(default_factory=dict)

    __hash__ = _hash_by_value

    def __post_init__(self):
        for name in ("max_turns", "tool_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"agentic.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ConfigError(f"agentic.max_new_tokens: must be >= 0 (0 = rollout.sampling.max_response_len), "
                              f"got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelSection = ModelSection()
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    stage: StageConfig = StageConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    target: TargetConfig = TargetConfig()
    agentic: AgenticConfig = AgenticConfig()

    def __post_init__(self):
        if self.agentic.env:
            dom = AGENTIC_DOMAINS[self.agentic.env]
            if self.stage.objective != "grpo":
                raise ConfigError(f"agentic.env: episodes train with GRPO (stage.objective 'grpo'), "
                                  f"got objective {self.stage.objective!r}")
            if tuple(self.data.domains) != (dom,):
                raise ConfigError(f"data.domains: agentic.env {self.agentic.env!r} scores its episodes "
                                  f"under domain {dom!r}; set data.domains to [{dom!r}], got "
                                  f"{list(self.data.domains)}")
            if self.agentic.keep_cache and self.rollout.engine == "sglang":
                raise ConfigError("agentic.keep_cache: needs the embedded engine or JAX rollout servers "
                                  "started with --keep-sessions (rollout.engine 'jax' / 'jax_server'), "
                                  "got 'sglang'")
        # The built-in tiny domains are toy prompts for the tiny preset; a paper-scale model must
        # not fall back to them silently when a config leaves ``data.sources`` out.
        if self.model.preset != "tiny" and any(s.format == "tiny" for s in self.data.sources):
            from models.nemotron_h.config import PRESETS

            if self.model.preset not in PRESETS:  # a typo, not a request for real data
                raise ConfigError(f"model.preset: unknown preset {self.model.preset!r}; valid presets: "
                                  f"{', '.join(PRESETS)}")
            raise ConfigError(f"data.sources: the built-in 'tiny' source is for the tiny preset; preset "
                              f"{self.model.preset!r} needs real data (set data.sources; configs/SOURCES.md "
                              f"lists the released datasets)")


def _moved(old: str, new: str) -> str:
    return (f"{old} moved to {new} (the rollout section is split by reader; "
            f"python launch/migrate_config.py FILE... rewrites config files and run dirs)")


#: keys that were fields once: ``{section class: (section name, {key: message(path, value)})}``;
#: a config that still sets one gets an error saying what to write instead
_REMOVED_KEYS = {
    RolloutConfig: ("rollout", {
        "greedy": lambda path, v: _removed_greedy(path, v, f"{path}.sampling.temperature"),
        **{k: (lambda path, v, k=k, new=new: _moved(f"{path}.{k}", f"{path}.{new}"))
           for k, new in ROLLOUT_MOVED.items()}}),
    EvalConfig: ("eval", {"greedy": _removed_greedy}),
}


def _check_removed(cls, key: str, value: Any, path: str = "") -> None:
    section, removed = _REMOVED_KEYS.get(cls, ("", {}))
    if key in removed:
        raise ConfigError(removed[key](path or section, value))


def _drop_greedy(section: dict) -> None:
    """Drop a stored section's removed ``greedy`` (lossless: with ``greedy`` true the old
    validation already required ``temperature`` 0, read before any key moves)."""
    if "greedy" in section and not (section["greedy"] and section.get("temperature", 1.0) != 0):
        del section["greedy"]  # else: not a config this code ever wrote, left for validation to refuse


def migrate_rollout(rollout: dict) -> tuple[dict, list]:
    """A stored ``rollout`` section in today's layout: each flat key of :data:`ROLLOUT_MOVED`
    moved into its section, and the removed ``greedy`` dropped. Returns the new dict and the
    ``(old key, new key)`` pairs moved (dotted, under ``rollout``)."""
    out, moved = copy.deepcopy(rollout), []
    _drop_greedy(out)
    for old, new in ROLLOUT_MOVED.items():
        if old not in out:
            continue
        section, leaf = new.split(".")
        node = out.setdefault(section, {})
        if not isinstance(node, dict) or leaf in node:
            raise ConfigError(f"rollout.{old}: cannot move to rollout.{new}, which is set as well")
        node[leaf] = out.pop(old)
        moved.append((f"rollout.{old}", f"rollout.{new}"))
    return out, moved


def migrate_dict(d: dict) -> dict:
    """A stored config dict (a run dir's ``run_config.json``, a config file) written by an older
    version, in today's layout: the flat rollout keys moved into their sections
    (:func:`migrate_rollout`, :data:`ROLLOUT_MOVED`), the removed ``rollout.greedy`` /
    ``eval.greedy`` dropped and a missing ``agentic`` section added. A new dict."""
    out = copy.deepcopy(d)
    out.setdefault("agentic", to_dict(AgenticConfig()))  # written before the section existed
    if isinstance(out.get("rollout"), dict):
        out["rollout"] = migrate_rollout(out["rollout"])[0]
    if isinstance(out.get("eval"), dict):
        _drop_greedy(out["eval"])
    return out


def migrate_override(item: str) -> str:
    """A ``KEY=VALUE`` override with a moved key (:data:`ROLLOUT_MOVED`) written at its new key;
    others unchanged. For stored records that never change once run (a study's declared
    ``overrides``, fingerprinted in ``launch/studies/ledger.json``)."""
    key, sep, value = item.partition("=")
    section, _, leaf = key.strip().partition(".")
    if section == "rollout" and leaf in ROLLOUT_MOVED:
        return f"rollout.{ROLLOUT_MOVED[leaf]}{sep}{value}"
    return item


def moved_keys(d: dict) -> list:
    """The ``(old key, new key)`` pairs :func:`migrate_dict` moves in config dict ``d``."""
    r = d.get("rollout")
    return migrate_rollout(r)[1] if isinstance(r, dict) else []


# --------------------------------------------------------------------------------------------
# Generic machinery: dict <-> dataclass with type checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp``; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: check every item
            return tuple(_coerce(v, args[0], f"{path}.{i}") for i, v in enumerate(value))
        return tuple(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _names(e: ConfigError, path: str) -> bool:
    """Whether the message of ``e`` already starts with a dotted path that contains ``path`` (a
    section's own check names its full path, ``rollout.sampling.top_p: ...``)."""
    head = str(e).split(":", 1)[0].split(" ", 1)[0]
    return f".{path}" in f".{head}"


def from_dict(cls, d: dict, *, _path: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and ill-typed values raise
    :class:`ConfigError` naming the dotted path and listing the valid keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in d.items():
        path = f"{_path}.{key}" if _path else key
        _check_removed(cls, key, value, _path)
        if key not in fields:
            raise ConfigError(
                f"unknown key '{path}'; valid keys{' of ' + _path if _path else ''}: "
                f"{', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if _path and not _names(e, _path):
            raise ConfigError(f"{_path}: {e}") from None
        raise


def to_dict(cfg) -> dict:
    """Nested plain-python dict (tuples become lists) suitable for ``json.dumps``."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def to_json(cfg, indent: int = 2) -> str:
    return json.dumps(to_dict(cfg), indent=indent, sort_keys=False)


def merge(base: dict, diff: dict) -> dict:
    """``diff`` laid over ``base``: mappings merge key by key (recursively), every other value
    (numbers, strings, lists, ``null``) replaces the base's. New dicts; the inputs are kept."""
    out = copy.deepcopy(base)
    for k, v in diff.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


#: the key of a config file naming the file it extends
BASE_KEY = "base"


def load_dict(path: str, *, _chain: tuple = ()) -> dict:
    """A JSON config file as a dict, composed: a top-level ``"base": "<file>"`` (a path relative
    to this file's directory) names the config it extends; this file's values are laid over the
    base's with :func:`merge` (bases may have bases). ``--print-config`` and ``run_config.json``
    show the composed result. A missing file raises ``FileNotFoundError`` (its name); invalid
    JSON, a non-string base or a loop of bases :class:`ConfigError`."""
    real = os.path.realpath(path)
    if real in _chain:
        raise ConfigError(f"{path}: {BASE_KEY} chain loops back to this file")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    if BASE_KEY not in d:
        return d
    base = d.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY}: expected the path of a config file, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return merge(load_dict(base_path, _chain=_chain + (real,)), d)


def load(path: str, cls=Config):
    """Load a JSON config file, composed with its bases (:func:`load_dict`); missing sections
    and fields keep their defaults."""
    return from_dict(cls, load_dict(path))


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (``1e-3``, ``true``, ``[1, 2]``), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def replace_path(cfg, path: str, value: Any, *, _prefix: str = ""):
    """Return ``cfg`` with dotted field ``path`` set to ``value`` (validated)."""
    head, _, rest = path.partition(".")
    full = f"{_prefix}{head}"
    names = [f.name for f in dataclasses.fields(cfg)]
    if not rest:
        _check_removed(type(cfg), head, value, _prefix[:-1])
    if head not in names:
        raise ConfigError(f"unknown key '{_prefix}{path}'; valid keys{' of ' + _prefix[:-1] if _prefix else ''}: "
                          f"{', '.join(names)}")
    cur = getattr(cfg, head)
    if rest:
        if dataclasses.is_dataclass(cur):
            new = replace_path(cur, rest, value, _prefix=full + ".")
        elif isinstance(cur, dict):  # free-form mapping such as model.overrides
            new = {**cur, rest: value}
        else:
            raise ConfigError(f"'{full}' is a value, not a section; cannot set '{_prefix}{path}'")
    else:
        new = value
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d[head] = _coerce(new, typing.get_type_hints(type(cfg))[head], full)
    try:
        return type(cfg)(**d)
    except ConfigError as e:
        if _prefix and not _names(e, _prefix[:-1]):
            raise ConfigError(f"{_prefix[:-1]}: {e}") from None
        raise


def apply_overrides(cfg, overrides: Sequence[str]):
    """Apply ``["a.b=value", ...]`` overrides (``--set`` on the command line).

    All overrides are merged first and the result validated once, so fields that are checked
    together (``model.preset`` with ``data.sources``, ``rollout.engine`` with
    ``rollout.servers.urls``) can be changed in any order."""
    d = copy.deepcopy(to_dict(cfg))  # to_dict shares mapping fields with ``cfg``
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optimizer.lr=2e-6")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = d
        for i, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{'.'.join(parents[:i + 1])}' is a value, not a section; "
                                  f"cannot set '{key.strip()}'")
        node[leaf] = parse_value(text)
    return from_dict(type(cfg), d)
