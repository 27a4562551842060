"""Parameter layout: one declared shape, dtype and logical axis names per weight.

The param pytree (matrices are ``[in, out]``; experts stacked)::

    {"embed": [V, H], "norm_f": [H], "lm_head": [H, V],
     "layers": [layer_0, layer_1, ...]}          # a list, one dict per pattern char

    layer = {"norm": [H], "mixer": mixer}
    M: {"in_z": [H, Di], "in_x": [H, Di], "in_B": [H, G*N], "in_C": [H, G*N], "in_dt": [H, Hm],
        "conv_w": [K, Di + 2*G*N], "conv_b": [Di + 2*G*N], "dt_bias": [Hm],
        "A_log": [Hm] (fp32), "D": [Hm] (fp32), "norm": [Di], "out_proj": [Di, H]}
    *: {"q_proj": [H, Hq*Dh], "k_proj": [H, Hkv*Dh], "v_proj": [H, Hkv*Dh], "o_proj": [Hq*Dh, H]}
    E: {"gate": [H, E], "e_score_correction_bias": [E] (fp32),
        "experts_up": [E, H, I], "experts_down": [E, I, H],
        "shared_up": [H, Is], "shared_down": [Is, H]}
    -: {"up_proj": [H, If], "down_proj": [If, H]}

(Di = mamba_num_heads·mamba_head_dim, G = n_groups, N = ssm_state_size, Hm = mamba_num_heads,
K = conv_kernel, I = moe_intermediate_size, Is = moe_shared_expert_intermediate_size,
If = intermediate_size.) The Hub's fused ``in_proj`` (z|x|B|C|dt) is split so every output
width stays 64/128-aligned (docs/model.md §12); ``checkpoint.py`` converts.

Logical axis names (``cascade_jax.sharding.rules`` maps them to mesh axes):
``vocab, embed, q_heads, kv_heads, mlp, experts, expert_mlp, ssm_inner, ssm_bc, ssm_heads,
conv_k, conv_dim, norm``.

Roles (one home each; the optimizer masks and the compute-copy cast derive from them):
``fp32`` (stored and computed in fp32: ``A_log``, ``D``, ``e_score_correction_bias``),
``decay`` (weight decay: matrices, i.e. every leaf of rank >= 2), ``trainable`` (False for
``e_score_correction_bias``, a running statistic, and for the router when
``ModelConfig.freeze_router``) and ``router`` (``mixer.gate``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

__all__ = ["ParamSpec", "param_specs", "init_params", "abstract_params", "param_counts",
           "logical_axes", "FP32_PARAMS"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One weight: shape, logical axes, initializer and roles.

    ``fp32``: stored in fp32 regardless of the model dtype (docs/model.md §9) and kept fp32 in the
    compute copy. ``decay``: AdamW weight decay applies (default: rank >= 2). ``trainable``:
    the optimizer may change it. ``router``: the MoE router weight."""

    shape: tuple
    axes: tuple  # logical axis name per dim
    init: str  # "normal", "zeros", "ones", "A_log", "dt_bias", "conv", "out" (rescaled normal)
    fp32: bool = False
    decay: Optional[bool] = None  # None: matrices only (len(shape) >= 2)
    trainable: bool = True
    router: bool = False

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"ParamSpec: {len(self.axes)} axis names {self.axes} for shape {self.shape}")
        if self.decay is None:
            object.__setattr__(self, "decay", len(self.shape) >= 2)


def _mamba_specs(c: ModelConfig):
    H, Di, GN, Hm, K = c.hidden_size, c.d_inner, c.n_groups * c.ssm_state_size, c.mamba_num_heads, c.conv_kernel
    return {
        "in_z": ParamSpec((H, Di), ("embed", "ssm_inner"), "normal"),
        "in_x": ParamSpec((H, Di), ("embed", "ssm_inner"), "normal"),
        "in_B": ParamSpec((H, GN), ("embed", "ssm_bc"), "normal"),
        "in_C": ParamSpec((H, GN), ("embed", "ssm_bc"), "normal"),
        "in_dt": ParamSpec((H, Hm), ("embed", "ssm_heads"), "normal"),
        "conv_w": ParamSpec((K, c.conv_dim), ("conv_k", "conv_dim"), "conv"),
        "conv_b": ParamSpec((c.conv_dim,), ("conv_dim",), "zeros"),
        "dt_bias": ParamSpec((Hm,), ("ssm_heads",), "dt_bias"),
        "A_log": ParamSpec((Hm,), ("ssm_heads",), "A_log", fp32=True),
        "D": ParamSpec((Hm,), ("ssm_heads",), "ones", fp32=True),
        "norm": ParamSpec((Di,), ("ssm_inner",), "ones"),
        "out_proj": ParamSpec((Di, H), ("ssm_inner", "embed"), "out"),
    }


def _attention_specs(c: ModelConfig):
    H, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "q_proj": ParamSpec((H, q), ("embed", "q_heads"), "normal"),
        "k_proj": ParamSpec((H, kv), ("embed", "kv_heads"), "normal"),
        "v_proj": ParamSpec((H, kv), ("embed", "kv_heads"), "normal"),
        "o_proj": ParamSpec((q, H), ("q_heads", "embed"), "out"),
    }


def _moe_specs(c: ModelConfig):
    H, E, I, Is = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.moe_shared_expert_intermediate_size
    d = {
        "gate": ParamSpec((H, E), ("embed", "experts"), "normal", router=True,
                          trainable=not c.freeze_router),
        "e_score_correction_bias": ParamSpec((E,), ("experts",), "zeros", fp32=True, trainable=False),
        "experts_up": ParamSpec((E, H, I), ("experts", "embed", "expert_mlp"), "normal"),
        "experts_down": ParamSpec((E, I, H), ("experts", "expert_mlp", "embed"), "out"),
    }
    if c.n_shared_experts:
        d["shared_up"] = ParamSpec((H, Is), ("embed", "mlp"), "normal")
        d["shared_down"] = ParamSpec((Is, H), ("mlp", "embed"), "out")
    return d


def _mlp_specs(c: ModelConfig):
    H, I = c.hidden_size, c.intermediate_size
    return {
        "up_proj": ParamSpec((H, I), ("embed", "mlp"), "normal"),
        "down_proj": ParamSpec((I, H), ("mlp", "embed"), "out"),
    }


MIXER_SPECS: dict[str, Callable[[ModelConfig], dict]] = {
    "M": _mamba_specs, "*": _attention_specs, "E": _moe_specs, "-": _mlp_specs}


def param_specs(cfg: ModelConfig) -> dict:
    """The pytree of :class:`ParamSpec` describing every weight (no arrays)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    return {
        "embed": ParamSpec((V, H), ("vocab", "embed"), "normal"),
        "norm_f": ParamSpec((H,), ("norm",), "ones"),
        "lm_head": ParamSpec((H, V), ("embed", "vocab"), "normal"),
        "layers": [
            {"norm": ParamSpec((H,), ("norm",), "ones"), "mixer": MIXER_SPECS[k](cfg)}
            for k in cfg.pattern
        ],
    }


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


# Leaf names stored in fp32 whatever the model dtype, read off the specs (docs/model.md §9).
FP32_PARAMS = frozenset(
    name for builder in MIXER_SPECS.values() for name, s in builder(ModelConfig()).items() if s.fp32)


def logical_axes(cfg: ModelConfig) -> Any:
    """Pytree (same structure as params) of logical axis-name tuples."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def _init_one(spec: ParamSpec, key, cfg: ModelConfig, dtype) -> jax.Array:
    dt = jnp.float32 if spec.fp32 else dtype
    std = cfg.initializer_range
    if spec.init == "normal":
        return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dt)
    if spec.init == "out":  # GPT-2 style prenorm-residual rescale (rescale_prenorm_residual)
        scale = 1.0 / math.sqrt(cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else 1.0
        return (std * scale * jax.random.normal(key, spec.shape, jnp.float32)).astype(dt)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dt)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dt)
    if spec.init == "conv":  # PyTorch Conv1d default: U(-1/sqrt(K), 1/sqrt(K)) for depthwise
        bound = 1.0 / math.sqrt(cfg.conv_kernel)
        return jax.random.uniform(key, spec.shape, jnp.float32, -bound, bound).astype(dt)
    if spec.init == "A_log":  # A = arange(1, Hm+1)
        return jnp.log(jnp.arange(1, spec.shape[0] + 1, dtype=jnp.float32)).astype(dt)
    if spec.init == "dt_bias":  # inverse softplus of dt ~ logU(time_step_min, time_step_max)
        u = jax.random.uniform(key, spec.shape, jnp.float32)
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dtv = jnp.maximum(jnp.exp(u * (hi - lo) + lo), cfg.time_step_floor)
        return (dtv + jnp.log(-jnp.expm1(-dtv))).astype(dt)
    raise ValueError(f"unknown init {spec.init!r}")


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.bfloat16) -> dict:
    """Random parameters (``A_log``, ``D``, ``e_score_correction_bias`` always fp32)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    return jax.tree.unflatten(treedef, [_init_one(s, k, cfg, dtype) for s, k in zip(leaves, keys)])


def abstract_params(cfg: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """``jax.ShapeDtypeStruct`` pytree of the params, computed without allocating."""
    return jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """``(total, active_per_token)``. Active excludes the input embedding (a lookup costs no
    FLOPs) and counts ``num_experts_per_tok`` of the routed experts; it includes ``lm_head``
    (3.23B for nano-30b-a3b, docs/model.md §11)."""
    specs = param_specs(cfg)
    size = lambda s: int(np.prod(s.shape))
    total = sum(size(s) for s in jax.tree.leaves(specs, is_leaf=_is_spec))
    active = total - size(specs["embed"])
    per_expert = 2 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    active -= cfg.pattern.count("E") * inactive
    return total, active
