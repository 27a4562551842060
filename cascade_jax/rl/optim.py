"""Optimiser and train state.

AdamW (β1 0.9, β2 0.95 by default) on fp32 master parameters, chained as::

    grads → clip_by_global_norm(grad_clip) → AdamW(lr(step), weight decay on matrices only)

Which leaf decays, trains or stays fp32 is read off the model's parameter specs (one pytree
of objects with ``decay``, ``trainable`` and ``fp32`` attributes, e.g.
``models.nemotron_h.param_specs(model_cfg)``; see there for the rules):

* weight decay on matrices only (norms, biases, ``A_log``, ``D``, ``dt_bias``, ``conv_b`` are 1-D);
* ``e_score_correction_bias`` is never trained; the router is frozen when
  ``ModelConfig.freeze_router`` (its spec is then not trainable);
* frozen leaves get zero gradient *before* clipping, so they do not count in the grad norm.

Learning rate: linear warm-up from ``warmup_init_lr`` to ``lr`` over ``warmup_steps``
optimiser steps (lr(0) = warmup_init_lr, lr(warmup_steps) = lr), then constant or cosine to
``min_lr`` at ``decay_steps``. MOPD (docs/algorithms.md §6): 2e-7 → 2e-6 over 30 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from cascade_jax.config import OptimizerConfig

__all__ = ["TrainState", "make_optimizer", "lr_schedule", "param_labels", "decay_mask",
           "trainable_mask", "compute_params", "mopd_optimizer_config", "sft_optimizer_config"]


def _is_spec(x) -> bool:
    return all(hasattr(x, a) for a in ("decay", "trainable", "fp32"))


def param_labels(specs) -> Any:
    """Pytree of labels from the parameter specs: ``"frozen"`` (not ``trainable``),
    ``"decay"`` (``decay``) or ``"no_decay"``."""
    return jax.tree.map(lambda s: "frozen" if not s.trainable else ("decay" if s.decay else "no_decay"),
                        specs, is_leaf=_is_spec)


def decay_mask(specs):
    return jax.tree.map(lambda l: l == "decay", param_labels(specs))


def trainable_mask(specs):
    return jax.tree.map(lambda l: l != "frozen", param_labels(specs))


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
    """The MOPD recipe (docs/algorithms.md §6): AdamW(0.9, 0.95), 2e-7 → 2e-6 over 30 steps."""
    d = dict(lr=2e-6, warmup_init_lr=2e-7, warmup_steps=30, b1=0.9, b2=0.95, grad_clip=1.0)
    d.update(overrides)
    return OptimizerConfig(**d)


def sft_optimizer_config(**overrides) -> OptimizerConfig:
    """The SFT recipe (docs/algorithms.md §8): AdamW(0.9, 0.98), weight decay 0.1, 200 warm-up steps
    to 5e-5, cosine to 5e-6 at 40,000 steps."""
    d = dict(lr=5e-5, warmup_init_lr=0.0, warmup_steps=200, schedule="cosine", min_lr=5e-6,
             decay_steps=40000, b1=0.9, b2=0.98, weight_decay=0.1, grad_clip=1.0)
    d.update(overrides)
    return OptimizerConfig(**d)


def make_optimizer(cfg: OptimizerConfig, specs) -> optax.GradientTransformation:
    """The optax transformation for parameters described by ``specs`` (a pytree with the
    params' structure whose leaves carry ``decay`` / ``trainable`` roles)."""
    labels = param_labels(specs)
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
    def from_config(cls, params, opt_cfg: OptimizerConfig, specs) -> "TrainState":
        """``create`` with :func:`make_optimizer` and :func:`lr_schedule` of ``opt_cfg``;
        ``specs`` = ``models.nemotron_h.param_specs(model_cfg)`` (roles, incl. a frozen router)."""
        tx = make_optimizer(opt_cfg, specs)
        return cls.create(params, tx, lr_schedule(opt_cfg))

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return dataclasses.replace(self, params=params, opt_state=opt_state, step=self.step + 1)


def compute_params(master, specs, dtype=jnp.bfloat16):
    """The compute copy: every leaf cast to ``dtype`` except those whose spec says ``fp32``
    (``A_log``, ``D``, ``e_score_correction_bias``). Differentiable (grads come back fp32)."""
    return jax.tree.map(lambda s, x: x if s.fp32 else x.astype(dtype), specs, master, is_leaf=_is_spec)
