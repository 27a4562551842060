"""Optimiser and train state.

AdamW (β1 0.9, β2 0.95 by default) on fp32 master parameters, chained as::

    grads → clip_by_global_norm(grad_clip) → AdamW(lr(step), weight decay on matrices only)

* no weight decay on 1-D parameters (norms, biases, ``A_log``, ``D``, ``dt_bias``, ``conv_b``);
* ``e_score_correction_bias`` is never trained (its update is zero; in the reference it is a
  running statistic, not a learned weight);
* the router (``mixer.gate``) is frozen when ``ModelConfig.freeze_router``;
* frozen leaves get zero gradient *before* clipping, so they do not count in the grad norm.

Learning rate: linear warm-up from ``warmup_init_lr`` to ``lr`` over ``warmup_steps``
optimiser steps (lr(0) = warmup_init_lr, lr(warmup_steps) = lr), then constant or cosine to
``min_lr`` at ``decay_steps``. MOPD (algorithms.md §6): 2e-7 → 2e-6 over 30 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from cascade_jax.config import OptimizerConfig

__all__ = ["TrainState", "make_optimizer", "lr_schedule", "param_labels", "decay_mask",
           "trainable_mask", "compute_params", "NO_DECAY", "NEVER_TRAINED", "mopd_optimizer_config",
           "sft_optimizer_config"]

NO_DECAY = frozenset({"norm", "norm_f", "conv_b", "dt_bias", "A_log", "D"})
NEVER_TRAINED = frozenset({"e_score_correction_bias"})
ROUTER = "gate"
FP32_COMPUTE = frozenset({"A_log", "D", "e_score_correction_bias"})


def _leaf_name(path) -> str:
    for k in reversed(path):
        if isinstance(k, jax.tree_util.DictKey):
            return str(k.key)
    return ""


def param_labels(params, *, freeze_router: bool = False) -> Any:
    """Pytree of labels: ``"decay"`` (matrices), ``"no_decay"`` (1-D / named above) or
    ``"frozen"`` (``e_score_correction_bias``; ``gate`` when ``freeze_router``)."""

    def label(path, x):
        name = _leaf_name(path)
        if name in NEVER_TRAINED or (freeze_router and name == ROUTER):
            return "frozen"
        if name in NO_DECAY or "bias" in name or jnp.ndim(x) < 2:
            return "no_decay"
        return "decay"

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params, **kw):
    return jax.tree.map(lambda l: l == "decay", param_labels(params, **kw))


def trainable_mask(params, **kw):
    return jax.tree.map(lambda l: l != "frozen", param_labels(params, **kw))


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Step → learning rate (see module docstring)."""
    warm = cfg.warmup_steps
    if cfg.schedule == "cosine":
        total = max(cfg.decay_steps, warm + 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=cfg.warmup_init_lr, peak_value=cfg.lr, warmup_steps=warm,
            decay_steps=total, end_value=cfg.min_lr)
    if warm <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.join_schedules(
        [optax.linear_schedule(cfg.warmup_init_lr, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
        [warm])


def mopd_optimizer_config(**overrides) -> OptimizerConfig:
    """The MOPD recipe (algorithms.md §6): AdamW(0.9, 0.95), 2e-7 → 2e-6 over 30 steps."""
    d = dict(lr=2e-6, warmup_init_lr=2e-7, warmup_steps=30, b1=0.9, b2=0.95, grad_clip=1.0)
    d.update(overrides)
    return OptimizerConfig(**d)


def sft_optimizer_config(**overrides) -> OptimizerConfig:
    """The SFT recipe (algorithms.md §8): AdamW(0.9, 0.98), weight decay 0.1, 200 warm-up steps
    to 5e-5, cosine to 5e-6 at 40,000 steps."""
    d = dict(lr=5e-5, warmup_init_lr=0.0, warmup_steps=200, schedule="cosine", min_lr=5e-6,
             decay_steps=40000, b1=0.9, b2=0.98, weight_decay=0.1, grad_clip=1.0)
    d.update(overrides)
    return OptimizerConfig(**d)


def make_optimizer(cfg: OptimizerConfig, params, *, freeze_router: bool = False
                   ) -> optax.GradientTransformation:
    """The optax transformation for ``params`` (labels are computed from the pytree; only its
    structure and leaf names/ranks matter)."""
    labels = param_labels(params, freeze_router=freeze_router)
    decay = jax.tree.map(lambda l: l == "decay", labels)
    train = jax.tree.map(lambda l: l != "frozen", labels)

    def zero_frozen(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, train), state

    freeze = optax.GradientTransformation(lambda p: optax.EmptyState(), zero_frozen)
    parts = [freeze]  # before clipping: frozen leaves do not count in the global norm
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay))
    parts.append(freeze)  # after AdamW: no weight decay / stale moments move a frozen leaf
    return optax.chain(*parts)


def _register(cls):
    return jax.tree_util.register_dataclass(
        cls, data_fields=["params", "opt_state", "step"], meta_fields=["tx", "lr_fn"])


@_register
@dataclasses.dataclass(frozen=True)
class TrainState:
    """``params``: fp32 master weights; ``opt_state``: the optax state; ``step``: int32 scalar
    (number of optimiser updates applied); ``tx``: the optax transformation and ``lr_fn`` the
    step → learning-rate schedule (both static, for logging)."""

    params: Any
    opt_state: Any
    step: jax.Array
    tx: optax.GradientTransformation
    lr_fn: Optional[Callable] = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, lr_fn=None) -> "TrainState":
        """Master copy in fp32 (whatever dtype ``params`` came in)."""
        master = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
        return cls(params=master, opt_state=tx.init(master), step=jnp.zeros((), jnp.int32),
                   tx=tx, lr_fn=lr_fn)

    @classmethod
    def from_config(cls, params, opt_cfg: OptimizerConfig, *, freeze_router: bool = False
                    ) -> "TrainState":
        """``create`` with :func:`make_optimizer` and :func:`lr_schedule` of ``opt_cfg``.
        Pass ``freeze_router=model_cfg.freeze_router`` so the router also escapes AdamW's
        weight decay (the model already stops its gradient)."""
        tx = make_optimizer(opt_cfg, params, freeze_router=freeze_router)
        return cls.create(params, tx, lr_schedule(opt_cfg))

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return dataclasses.replace(self, params=params, opt_state=opt_state, step=self.step + 1)


def compute_params(master, dtype=jnp.bfloat16):
    """The compute copy: every leaf cast to ``dtype`` except the fp32-by-design ones
    (``A_log``, ``D``, ``e_score_correction_bias``). Differentiable (grads come back fp32)."""

    def cast(path, x):
        return x if _leaf_name(path) in FP32_COMPUTE else x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, master)
