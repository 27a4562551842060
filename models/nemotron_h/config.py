"""``ModelConfig``: every field the NemotronH architecture needs, HF ``config.json`` I/O, presets.

Layer kinds use the pattern characters of ``hybrid_override_pattern``:
``M`` Mamba2 mixer, ``E`` routed MoE + shared expert, ``*`` GQA attention, ``-`` dense relu² MLP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal, Optional

__all__ = ["ModelConfig", "ModelConfigError", "preset", "with_overrides", "PRESETS", "REMAT_POLICIES",
           "REMAT_KINDS", "normalize_remat", "remat_for_kind"]


class ModelConfigError(ValueError):
    """A model config (or a Hugging Face config.json) is invalid; the message names the field."""


_LIST_TO_CHAR = {
    "linear_attention": "M", "mamba": "M",
    "moe": "E",
    "full_attention": "*", "attention": "*",
    "mlp": "-",
}
_CHAR_TO_LIST = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}

# HF legacy key -> our key (docs/model.md §1).
_HF_ALIASES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit", "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts", "norm_eps": "layer_norm_epsilon",
}

Impl = Literal["auto", "pallas", "cudnn", "xla"]
Remat = Literal["none", "full", "dots"]

#: remat policies: ``none`` saves every intermediate for the backward; ``full`` saves nothing
#: inside the wrapped function (only its inputs; the backward recomputes it); ``dots`` saves the
#: outputs of matmuls without batch dimensions and recomputes the rest.
REMAT_POLICIES = ("none", "full", "dots")
#: per-layer-kind remat keys -> pattern characters
REMAT_KINDS = {"attention": "*", "mamba": "M", "moe": "E", "mlp": "-"}


def normalize_remat(value):
    """``remat`` as stored in :class:`ModelConfig`: one policy name (``"none" | "full" |
    "dots"``) or, per layer kind, a sorted tuple of ``(kind, policy)`` pairs from a mapping
    ``{"attention" | "mamba" | "moe" | "mlp": policy}`` (kinds left out: ``"none"``). Raises
    :class:`ModelConfigError` naming ``remat`` on anything else."""
    if isinstance(value, str):
        if value not in REMAT_POLICIES:
            raise ModelConfigError(f"remat: must be one of {list(REMAT_POLICIES)} or a mapping "
                                   f"{{layer kind: policy}}, got {value!r}")
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
        value = dict(value)
    if not isinstance(value, dict):
        raise ModelConfigError(f"remat: must be one of {list(REMAT_POLICIES)} or a mapping "
                               f"{{layer kind: policy}}, got {value!r}")
    bad = sorted(set(value) - set(REMAT_KINDS))
    if bad:
        raise ModelConfigError(f"remat: unknown layer kind(s) {bad}; valid kinds: {list(REMAT_KINDS)}")
    for k, v in value.items():
        if v not in REMAT_POLICIES:
            raise ModelConfigError(f"remat.{k}: must be one of {list(REMAT_POLICIES)}, got {v!r}")
    return tuple(sorted(value.items()))


def remat_for_kind(remat, kind: str) -> str:
    """The policy name a layer of pattern character ``kind`` runs under a per-kind ``remat``
    (normalised tuple); a single policy name applies to every kind."""
    if isinstance(remat, str):
        return remat
    by_char = {REMAT_KINDS[k]: v for k, v in remat}
    return by_char.get(kind, "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a NemotronH hybrid Mamba2 / attention / MoE model.

    HF fields keep their transformers names. JAX-only fields (not written to config.json):
    ``dt_floor`` (lower clamp of dt; 0.0 as SGLang and the CUDA kernels run, 1e-3 reproduces
    transformers' full-sequence clamp), ``remat`` (one policy name, :data:`REMAT_POLICIES`,
    wrapping every layer of the loop or every group body of the scan; or a mapping per layer
    kind, ``{"attention", "mamba", "moe", "mlp"} -> policy``, wrapping each layer of that kind
    on its own, also inside the scanned group bodies, which are then not wrapped as a whole;
    stored as sorted ``(kind, policy)`` pairs, :func:`normalize_remat`),
    ``scan_layers`` (the full-sequence pass scans repeated layer groups: one compiled body per
    distinct group, same numerics as the loop),
    ``freeze_router`` (stop gradients into ``gate``), and the kernel switches ``*_impl``.
    """

    # sizes
    vocab_size: int = 131072
    hidden_size: int = 2688
    pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # mamba
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    expand: int = 2
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple = (0.0, math.inf)
    # dense MLP and MoE
    intermediate_size: int = 1856
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # misc
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    rope_theta: float = 10000.0
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = 0
    # JAX-only options
    dt_floor: float = 0.0
    remat: Any = "none"  # Remat, or per layer kind (see the class docstring)
    scan_layers: bool = False
    freeze_router: bool = False
    moe_impl: Impl = "auto"
    attention_impl: Impl = "auto"
    ssd_impl: Impl = "auto"
    # Hub directory these weights were loaded from (set by load_checkpoint); the exporter copies
    # its config.json, generation config and tokenizer files verbatim. Not part of equality.
    hf_source: Optional[str] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        bad = set(self.pattern) - set(_CHAR_TO_LIST)
        if not self.pattern or bad:
            raise ModelConfigError(
                f"pattern: must be a non-empty string over M, E, *, -; got {self.pattern!r}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                     "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
                     "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelConfigError(f"{name}: must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.mamba_num_heads % self.n_groups:
            raise ModelConfigError(
                f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
        if "E" in self.pattern:
            if self.n_routed_experts % self.n_group:
                raise ModelConfigError(
                    f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise ModelConfigError("n_group: group-limited routing needs >= 2 experts per group")
            if not self.topk_group <= self.n_group:
                raise ModelConfigError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            if self.num_experts_per_tok > (self.n_routed_experts // self.n_group) * self.topk_group:
                raise ModelConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts reachable "
                    f"in topk_group={self.topk_group} groups")
        if self.tie_word_embeddings:
            raise ModelConfigError("tie_word_embeddings: tied embeddings are not supported by NemotronH")
        if self.n_shared_experts not in (0, 1):
            raise ModelConfigError(f"n_shared_experts: only 0 or 1 supported, got {self.n_shared_experts}")
        if len(self.time_step_limit) != 2:
            raise ModelConfigError(f"time_step_limit: expected (min, max), got {self.time_step_limit!r}")
        if self.dt_floor < 0:
            raise ModelConfigError(f"dt_floor: must be >= 0, got {self.dt_floor}")
        object.__setattr__(self, "remat", normalize_remat(self.remat))

    # ---- derived sizes (docs/model.md §4) ----
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def dt_min_clamp(self) -> float:
        """Lower clamp applied to dt in the full-sequence path: max(dt_floor, time_step_limit[0])."""
        return max(self.dt_floor, float(self.time_step_limit[0]))

    @property
    def dt_max_clamp(self) -> float:
        return float(self.time_step_limit[1])

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, **jax_options) -> "ModelConfig":
        """Parse a Hugging Face ``config.json`` dict (pattern string or ``layers_block_type``
        list, legacy aliases, ``{"__float__": "Infinity"}`` encodings). Keys we do not model
        (``architectures``, ``torch_dtype``, ...) are ignored; bad values raise
        :class:`ModelConfigError` naming the key."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = {_HF_ALIASES.get(k, k): _decode_floats(v) for k, v in d.items()}
        if d.get("model_type", "nemotron_h") != "nemotron_h":
            raise ModelConfigError(f"model_type: expected 'nemotron_h', got {d['model_type']!r}")
        pattern = None
        if d.get("layers_block_type") is not None or d.get("layer_types") is not None:
            lst = d.get("layers_block_type", d.get("layer_types"))
            if not isinstance(lst, list) or not all(isinstance(x, str) for x in lst):
                raise ModelConfigError(f"layers_block_type: expected a list of strings, got {lst!r}")
            bad = [x for x in lst if x not in _LIST_TO_CHAR]
            if bad:
                raise ModelConfigError(
                    f"layers_block_type: unknown layer types {sorted(set(bad))}; valid: {sorted(_LIST_TO_CHAR)}")
            pattern = "".join(_LIST_TO_CHAR[x] for x in lst)
        elif d.get("hybrid_override_pattern") is not None:
            pattern = d["hybrid_override_pattern"]
            if not isinstance(pattern, str):
                raise ModelConfigError(f"hybrid_override_pattern: expected a string, got {pattern!r}")
        else:
            raise ModelConfigError("config.json: needs 'hybrid_override_pattern' or 'layers_block_type'")
        n = d.get("num_hidden_layers")
        if n is not None and n != len(pattern):
            raise ModelConfigError(
                f"num_hidden_layers ({n}) does not match the layer pattern length ({len(pattern)})")
        if d.get("num_nextn_predict_layers") or 0:
            raise ModelConfigError("num_nextn_predict_layers: multi-token-prediction layers are not supported")
        if d.get("moe_latent_size") is not None:
            raise ModelConfigError("moe_latent_size: latent MoE is not supported")
        for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
            if d.get(key, want) != want:
                raise ModelConfigError(f"{key}: only {want!r} is supported, got {d[key]!r}")
        for key in ("attention_bias", "mamba_proj_bias", "use_bias", "mlp_bias"):
            if d.get(key):
                raise ModelConfigError(f"{key}: linear biases are not supported (NemotronH has none)")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict = {"pattern": pattern}
        for k, v in d.items():
            if k in fields and k not in ("pattern",) and k not in _JAX_ONLY:
                if v is None and fields[k].default is not None:
                    continue  # explicit null = use the default (e.g. head_dim)
                kwargs[k] = _check_hf_type(k, v, fields[k].default)
        if "head_dim" not in d or d["head_dim"] is None:
            kwargs["head_dim"] = d.get("hidden_size", cls.hidden_size) // d.get(
                "num_attention_heads", cls.num_attention_heads)
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if isinstance(kwargs.get("eos_token_id"), list):  # keep the config hashable (jit static arg)
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(float(x) for x in kwargs["time_step_limit"])
        kwargs.update(jax_options)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The transformers-5 ``config.json`` dict (JSON-safe: infinities use the
        ``{"__float__": "Infinity"}`` encoding). Writes both the pattern string (which engines
        parse) and the ``layers_block_type`` list."""
        d = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "torch_dtype": "bfloat16",
            "hybrid_override_pattern": self.pattern,
            "layers_block_type": [_CHAR_TO_LIST[c] for c in self.pattern],
            "num_hidden_layers": self.num_hidden_layers,
            "attention_bias": False, "attention_dropout": 0.0, "mamba_proj_bias": False,
            "use_bias": False, "mlp_bias": False, "hidden_dropout": 0.0,
            "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu",
            "mamba_ssm_cache_dtype": "float32", "use_cache": True,
        }
        for f in dataclasses.fields(self):
            if f.name in _JAX_ONLY or f.name == "pattern":
                continue
            v = getattr(self, f.name)
            d[f.name] = [_encode_float(x) for x in v] if isinstance(v, tuple) else _encode_float(v)
        return d

    @classmethod
    def from_json_file(cls, path, **jax_options) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d, **jax_options)
        except ModelConfigError as e:
            raise ModelConfigError(f"{path}: {e}") from None


_JAX_ONLY = ("dt_floor", "remat", "scan_layers", "freeze_router", "moe_impl", "attention_impl",
             "ssd_impl", "hf_source")


def _check_hf_type(key, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    else:
        ok = True
    if not ok:
        raise ModelConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    return value


def _decode_floats(v):
    """transformers 5 writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        try:
            return float(v["__float__"])
        except (TypeError, ValueError):
            raise ModelConfigError(f"bad float encoding {v!r}") from None
    if isinstance(v, list):
        return [_decode_floats(x) for x in v]
    return v


def _encode_float(v):
    if isinstance(v, float) and not math.isfinite(v):
        return {"__float__": "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")}
    return v


PRESETS = {
    # The exact public config of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (docs/model.md §1).
    "nano-30b-a3b": dict(),
    # CPU-fast, all four layer kinds, group-limited routing exercised.
    "tiny": dict(
        vocab_size=512, hidden_size=64, pattern="ME*-ME*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4,
        chunk_size=16, intermediate_size=96, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, max_position_embeddings=4096,
    ),
}


def with_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
    """``cfg`` with fields replaced; an unknown field is an error listing the valid ones."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ModelConfigError(f"unknown ModelConfig field(s) {bad}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides)


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset (``tiny`` or ``nano-30b-a3b``) with optional field overrides."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return with_overrides(ModelConfig(**PRESETS[name]), **overrides)
