"""The loss settings of the RL train steps: exactly the numbers and switches each objective
reads, nothing else (no stage name, step count or teacher checkpoints).

The steps take them as one static argument (``grpo_train_step(..., settings=GRPOSettings(...))``),
so they are frozen and hashable by value: two stages whose settings are equal share one
compiled step whatever their bookkeeping. :func:`loss_settings` is the one place they are built
from a :class:`~cascade_jax.config.StageConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from cascade_jax import domains as D
from cascade_jax.config import StageConfig

__all__ = ["GRPOSettings", "MOPDSettings", "LossSettings", "loss_settings"]

IS_MODES = ("none", "tis", "icepop")
LOSS_NORMS = ("sequence", "token", "domain")


def _check_band(what: str, low: float, high: float) -> None:
    if not 0.0 < low < high:
        raise ValueError(f"{what}.is_low/is_high: need 0 < is_low < is_high, got {low}, {high}")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """What :func:`~cascade_jax.rl.steps.grpo_train_step` reads (docs/algorithms.md §5, §7).

    With ``ρ_t = exp(lp_t − lp_old,t)``, IS weight ``w_t`` and advantage ``Â``, the loss is
    ``ℓ_t = w_t · −min(ρ_t Â, clip(ρ_t, 1 − clip_low, 1 + clip_high) Â) + kl_coef · k3_t``
    (:func:`~cascade_jax.rl.losses.grpo_loss`).

    Attributes:
      kl_coef: ``β ≥ 0``, weight of the k3 estimate of ``KL(π_θ‖π_ref)``; ``> 0`` needs
        ``batch.ref_logp``.
      clip_low: ``ε_lo``, the ratio's lower clip is ``1 − ε_lo``.
      clip_high: ``ε_hi``, the ratio's upper clip is ``1 + ε_hi`` (DAPO's clip-higher: ``> ε_lo``).
      is_correction: the train/inference mismatch weight ``w_t`` of ``r_t = exp(lp_train −
        lp_rollout)`` (:func:`~cascade_jax.rl.is_correction.is_weights`): ``"none"`` (1),
        ``"tis"`` (``min(r_t, is_high)``) or ``"icepop"`` (``r_t · 1[is_low ≤ r_t ≤ is_high]``).
      is_low: icepop's lower band edge; also the band of the ``mismatch_*`` metrics.
      is_high: icepop's upper band edge and TIS's cap ``C``.
      leave_one_out: baseline = mean of the other members of the group instead of the group
        mean (:func:`~cascade_jax.rl.advantages.group_advantages`).
      overlong_filtering: truncated responses keep their reward in the group statistics and are
        then dropped from the loss (off: their reward is 0 and they are trained on).
      dynamic_filtering: responses of groups whose rewards are all equal are dropped from the
        loss and from its token count.
    """

    kl_coef: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    is_correction: Literal["none", "tis", "icepop"] = "tis"
    is_low: float = 0.5
    is_high: float = 2.0
    leave_one_out: bool = False
    overlong_filtering: bool = False
    dynamic_filtering: bool = False

    def __post_init__(self):
        if self.is_correction not in IS_MODES:
            raise ValueError(f"GRPOSettings.is_correction: must be one of {list(IS_MODES)}, "
                             f"got {self.is_correction!r}")
        _check_band("GRPOSettings", self.is_low, self.is_high)
        for name in ("kl_coef", "clip_low", "clip_high"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"GRPOSettings.{name}: must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MOPDSettings:
    """What :func:`~cascade_jax.rl.steps.mopd_train_step` reads (docs/algorithms.md §6).

    Per token ``a_t = sg(lp_teacher,t − lp_t) + grpo_coef · Â_seq``, ``w_t = r_t · 1[is_low ≤
    r_t ≤ is_high]`` with ``r_t = exp(sg(lp_t) − lp_inf,t)`` and the loss
    ``L = −Σ mask · c_t · w_t · a_t · lp_t`` (:func:`~cascade_jax.rl.losses.mopd_loss`).

    Attributes:
      is_low: lower edge of the IS band (tokens with ``r_t < is_low`` are masked, not clamped).
      is_high: upper edge of the IS band.
      loss_norm: the coefficient ``c_t``: ``"sequence"`` ``1 / (N_seq · |V(y)|)`` (the
        paper's Eq. 4), ``"token"`` ``1 / num_tokens`` or ``"domain"`` ``1 / (|D| · n_d(t))``.
      grpo_coef: ``c ≥ 0``, weight of the outcome-reward GRPO advantage mixed into ``a_t``
        (0: pure distillation; the rewards are not read).
      leave_one_out: the mixed advantage's baseline (as :class:`GRPOSettings`); read only when
        ``grpo_coef > 0``.
      domain_weights: ``λ_d`` per domain id (``len(domains.DOMAINS)`` weights ``>= 0``), the
        loss is ``−Σ mask · λ_d(t) · c_t · w_t · a_t · lp_t``; empty: every ``λ_d = 1``.
      forward_kl_coef: ``β ≥ 0``, weight of the top-K forward-KL term
        ``β · Σ mask · λ_d · c_t · Σ_k q_k (log q_k − log p_k)`` over the teacher's ``teacher_topk``
        most likely tokens at each prefix (0: the paper's loss; > 0: the batch must carry
        ``teacher_topk_ids`` / ``teacher_topk_logp``).
      teacher_topk: ``K``, how many of the teacher's most likely tokens the batch carries per
        position (read when ``forward_kl_coef > 0``; the vocabulary size gives the full KL).
    """

    is_low: float = 0.5
    is_high: float = 2.0
    loss_norm: Literal["sequence", "token", "domain"] = "sequence"
    grpo_coef: float = 0.0
    leave_one_out: bool = False
    domain_weights: tuple = ()
    forward_kl_coef: float = 0.0
    teacher_topk: int = 0

    def __post_init__(self):
        _check_band("MOPDSettings", self.is_low, self.is_high)
        if not self.forward_kl_coef >= 0.0:
            raise ValueError(f"MOPDSettings.forward_kl_coef: must be >= 0, got {self.forward_kl_coef}")
        if self.forward_kl_coef > 0 and self.teacher_topk < 1:
            raise ValueError(f"MOPDSettings.teacher_topk: forward_kl_coef > 0 needs teacher_topk "
                             f">= 1, got {self.teacher_topk}")
        if self.domain_weights and (len(self.domain_weights) != len(D.DOMAINS)
                                    or not all(0.0 <= w < float("inf") for w in self.domain_weights)):
            raise ValueError(f"MOPDSettings.domain_weights: need {len(D.DOMAINS)} finite weights "
                             f">= 0 (one per domain id) or none, got {self.domain_weights!r}")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"MOPDSettings.loss_norm: must be one of {list(LOSS_NORMS)}, "
                             f"got {self.loss_norm!r}")
        if not self.grpo_coef >= 0.0:
            raise ValueError(f"MOPDSettings.grpo_coef: must be >= 0, got {self.grpo_coef}")


LossSettings = Union[GRPOSettings, MOPDSettings]


def _domain_weights(by_name: dict) -> tuple:
    """``stage.domain_loss_weights`` (name -> weight) as one weight per domain id (missing
    names weigh 1; the names are checked by ``StageConfig``); ``()`` when none is given (every
    weight 1, the default program)."""
    if not by_name:
        return ()
    return tuple(float(by_name.get(name, 1.0)) for name in D.DOMAINS)


def loss_settings(stage: StageConfig) -> Optional[LossSettings]:
    """The loss settings of ``stage`` (``None`` for objectives without any: ``sft``, ``demo``).
    The clip range and the MOPD GRPO mix are not stage config keys: they keep their defaults
    (``clip_low = clip_high = 0.2``, ``grpo_coef = 0``)."""
    if stage.objective == "grpo":
        return GRPOSettings(kl_coef=stage.kl_coef, is_correction=stage.is_correction,
                            is_low=stage.is_low, is_high=stage.is_high,
                            leave_one_out=stage.leave_one_out,
                            overlong_filtering=stage.overlong_filtering,
                            dynamic_filtering=stage.dynamic_filtering)
    if stage.objective == "mopd":
        return MOPDSettings(is_low=stage.is_low, is_high=stage.is_high, loss_norm=stage.loss_norm,
                            leave_one_out=stage.leave_one_out,
                            domain_weights=_domain_weights(stage.domain_loss_weights),
                            forward_kl_coef=stage.forward_kl_coef, teacher_topk=stage.teacher_topk)
    return None
