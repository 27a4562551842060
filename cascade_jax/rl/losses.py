"""The three objectives as pure functions of per-token log-probs (no model inside).

All per-token arrays are ``[B, T]`` float32 aligned with the tokens (see ``batch.py``);
``mask`` is 1.0 on the tokens that are trained on. ``logp`` carries the gradient; every other
input is treated as a constant.
"""

from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp

from .is_correction import is_weights, masked_mean

__all__ = ["grpo_loss", "mopd_loss", "sft_loss", "segment_start_mask", "k3_kl"]

sg = jax.lax.stop_gradient


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(π_θ‖π_ref) on tokens sampled from π_θ:
    ``exp(lp_ref − lp) − (lp_ref − lp) − 1`` (≥ 0, unbiased; gradient flows through ``lp``)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(logp: jax.Array, old_logp: Optional[jax.Array], advantages: jax.Array,
              mask: jax.Array, *, rollout_logp: Optional[jax.Array] = None,
              ref_logp: Optional[jax.Array] = None, num_tokens=None, kl_coef: float = 0.0,
              clip_low: float = 0.2, clip_high: float = 0.2,
              is_correction: Literal["none", "tis", "icepop"] = "tis", tis_cap: float = 2.0,
              is_low: float = 0.5, is_high: float = 2.0):
    """GRPO / DAPO token-level clipped policy-gradient loss (docs/algorithms.md §5, §7).

    With ``ρ_t = exp(lp_t − lp_old,t)`` (``lp_old = sg(lp)`` when ``old_logp is None``, the
    strictly on-policy case: ρ ≡ 1 in value, ∇ρ = ∇lp), IS weight ``w_t`` from
    ``rollout_logp`` (``δ_t = lp_old − lp_rollout``; :func:`is_weights`) and advantage ``Â``::

        ℓ_t = w_t · −min(ρ_t Â_t, clip(ρ_t, 1−ε_lo, 1+ε_hi) Â_t)  +  β · k3(lp_t, lp_ref,t)
        L   = (1 / num_tokens) Σ_{b,t} mask_{b,t} ℓ_{b,t}

    ``num_tokens`` is the number of valid response tokens in the **whole optimiser batch**
    (defaults to ``Σ mask``) so that summing the losses of k micro-batches gives the loss of
    the batch. On-policy with ``w = 1`` the gradient is REINFORCE's,
    ``−(1/num_tokens) Σ mask Â ∇lp``.

    Args:
      logp: ``[B, T]`` log π_θ of the sampled tokens (differentiated).
      old_logp: ``[B, T]`` log π_old, or ``None`` for on-policy.
      advantages: ``[B]`` (per sequence, broadcast over tokens) or ``[B, T]``.
      mask: ``[B, T]`` loss mask (response tokens, after filtering).
      rollout_logp: ``[B, T]`` inference-engine log-probs; ``None`` → no IS correction.
      ref_logp: ``[B, T]`` reference-policy log-probs for the KL term (used iff ``kl_coef``).
    Returns ``(loss, metrics)``.
    """
    logp = logp.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    old = sg(logp) if old_logp is None else old_logp.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.broadcast_to(adv, logp.shape)
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if rollout_logp is not None:
        w, is_m = is_weights(old, rollout_logp, m, mode=is_correction, cap=tis_cap,
                             low=is_low, high=is_high)
        metrics.update(is_m)
    else:
        w = m
    per_tok = w * pg
    if kl_coef and ref_logp is not None:
        kl = k3_kl(logp, ref_logp.astype(jnp.float32))
        per_tok = per_tok + kl_coef * m * kl
        metrics["kl_ref"] = masked_mean(sg(kl), m)
    n = m.sum() if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    loss = (per_tok * m).sum() / jnp.maximum(n, 1.0)
    rv = sg(ratio)
    metrics.update({
        "pg_loss": (sg(w * pg) * m).sum() / jnp.maximum(n, 1.0),
        "ratio_mean": masked_mean(rv, m),
        "clip_frac": masked_mean(((rv * adv) > (sg(clipped) * adv)).astype(jnp.float32), m),
        "token_adv_mean": masked_mean(adv, m),
        "num_tokens": m.sum(),
    })
    return loss, metrics


def mopd_loss(logp: jax.Array, teacher_logp: jax.Array, inference_logp: jax.Array,
              mask: jax.Array, *, is_low: float = 0.5, is_high: float = 2.0,
              advantages: Optional[jax.Array] = None, advantage_coef: float = 1.0,
              normalization: Literal["sequence", "token", "domain"] = "sequence",
              seq_index: Optional[jax.Array] = None, num_segments: Optional[int] = None,
              num_sequences=None, num_tokens=None, domain_index: Optional[jax.Array] = None,
              num_domains: Optional[int] = None, domain_tokens: Optional[jax.Array] = None,
              domain_weight: Optional[jax.Array] = None, forward_kl_coef: float = 0.0,
              teacher_topk_logp: Optional[jax.Array] = None,
              student_topk_logp: Optional[jax.Array] = None):
    """Multi-domain on-policy distillation loss (docs/algorithms.md §6, Eqs. 2–4).

    Per sampled token ``y_t`` (sampled from π_inf)::

        a_t = sg(lp_teacher,t − lp_t)                      (+ c·Â_seq if ``advantages``)
        r_t = exp(sg(lp_t) − lp_inf,t)
        w_t = r_t · 1[is_low ≤ r_t ≤ is_high]              (masked, not clamped)
        L   = −Σ_{b,t} mask · λ_d(t) · c_t · w_t a_t lp_t

    with the normalisation coefficient ``c_t`` of ``normalization`` and the per-domain loss
    weight ``λ_d`` (``domain_weight``, ``[num_domains]``, default all 1; it scales a domain's
    part of the loss after normalisation, e.g. ``λ = 2`` counts each of its tokens twice):

    * ``"sequence"`` (the paper's Eq. 4): ``c_t = 1 / (N_seq · |V(y)|)`` — each sequence weighs
      the same, its tokens share ``1/N_seq``;
    * ``"token"`` (NVIDIA's NeMo-RL replication): ``c_t = 1 / num_tokens`` — each token of the
      global batch weighs the same (a domain with longer answers weighs more);
    * ``"domain"``: ``c_t = 1 / (|D| · n_{d(t)})`` with ``n_d`` the valid tokens of domain ``d``
      in the batch and ``|D|`` the number of domains with ``n_d > 0`` — each domain present
      weighs ``1/|D|``, its tokens share it equally, whatever its answer length or batch share.

    ``|V(y)|`` counts the **original** valid tokens (band-masked tokens still count), and so do
    ``num_tokens`` and ``n_d``. ``N_seq`` (``num_sequences``) defaults to the number of
    sequences with ``|V| > 0``, ``num_tokens`` to ``Σ mask``, ``domain_tokens`` (``[num_domains]``
    ``n_d``) to the per-domain ``Σ mask``: pass the whole optimiser batch's counts when
    accumulating micro-batches. In the padded layout a sequence is a row; for packed rows give
    ``seq_index [B, T]`` and static ``num_segments``. ``"domain"`` needs ``domain_index [B, T]``
    (int, each token's domain in ``[0, num_domains)``) and static ``num_domains``.
    ``advantages`` (``[B]`` or ``[B, T]``, optional) mixes an outcome-reward (GRPO) advantage
    into ``a_t`` with weight ``advantage_coef``. ``domain_weight`` needs ``domain_index`` and
    ``num_domains`` too.

    Forward-KL term (``forward_kl_coef`` β > 0; not in the paper): at each sampled token's
    prefix, the teacher's top-K distribution ``q_k = exp(teacher_topk_logp)`` (``[B, T, K]``)
    and the student's log-probs of the same K tokens ``student_topk_logp`` (``[B, T, K]``, with
    gradient) give the truncated forward KL::

        F_t = Σ_k q_k (log q_k − log p_k)        (= KL(π_teacher ‖ π_train) when K = V)
        L  += β · Σ_{b,t} mask · λ_d(t) · c_t · F_t

    not IS-weighted (it is an objective at the prefix, whichever policy sampled it). With
    ``p = softmax(z / τ)`` its gradient on the logits is ``(Q_K · p − q) / τ`` (``Q_K = Σ_k
    q_k``), which stays large where the student is sure of a token the teacher rejects — the
    case where the sampled-token term's gradient ``a_t (onehot(y_t) − p) / τ`` vanishes
    (docs/mopd.md §9-§10). Metric ``forward_kl_topk`` = masked mean of ``F_t``.

    Metrics: ``reverse_kl`` = mean over valid tokens of ``lp − lp_teacher`` (sampled-token
    estimate of KL(π_train‖π_teacher)), ``mopd_adv_mean``, IS stats (masked fraction = tokens
    outside the band). With ``domain_index`` and ``num_domains`` also two ``[num_domains]``
    vectors, sums over this (micro-)batch: ``domain_tokens`` (valid tokens per domain) and
    ``domain_grad_weight`` = ``Σ_{t∈d} mask · λ_d · c_t · w_t · |a_t|``, the domain's part of
    the gradient's weight (``∇L = −Σ mask λ c w a ∇lp``); its share of the sum over domains is the
    domain's share of the loss; with the forward-KL term also ``domain_forward_kl``
    (``Σ_{t∈d} mask · F_t``).
    """
    logp = logp.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    adv = sg(teacher_logp.astype(jnp.float32) - logp)
    if advantages is not None:
        extra = advantages.astype(jnp.float32)
        extra = extra[:, None] if extra.ndim == 1 else extra
        adv = adv + advantage_coef * extra
    w, is_m = is_weights(logp, inference_logp, m, mode="icepop", low=is_low, high=is_high)
    per_domain = domain_index is not None and num_domains is not None
    lam = 1.0
    if domain_weight is not None:
        if not per_domain:
            raise ValueError("mopd_loss: domain_weight needs domain_index and a static num_domains")
        lam = jnp.asarray(domain_weight, jnp.float32)[domain_index.astype(jnp.int32)]
    tok = w * adv * logp * m * lam  # w is already 0 off the mask
    if per_domain:
        dom = domain_index.astype(jnp.int32).ravel()
        dom_m = jax.ops.segment_sum(m.ravel(), dom, num_domains)
    if normalization == "sequence":
        if seq_index is None:
            seq_sum, seq_len = tok.sum(-1), m.sum(-1)
            len_tok = jnp.broadcast_to(seq_len[:, None], m.shape)
        else:
            if num_segments is None:
                raise ValueError("mopd_loss: packed rows need a static num_segments")
            seq_sum = jax.ops.segment_sum(tok.ravel(), seq_index.ravel(), num_segments)
            seq_len = jax.ops.segment_sum(m.ravel(), seq_index.ravel(), num_segments)
            len_tok = seq_len[seq_index]
        n = (seq_len > 0).sum() if num_sequences is None else num_sequences
        n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
        loss = -(seq_sum / jnp.maximum(seq_len, 1.0)).sum() / n
        coef = 1.0 / (n * jnp.maximum(len_tok, 1.0))
    elif normalization == "token":
        n = m.sum() if num_tokens is None else num_tokens
        n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
        loss = -tok.sum() / n
        coef = jnp.broadcast_to(1.0 / n, m.shape)
    elif normalization == "domain":
        if not per_domain:
            raise ValueError('mopd_loss: normalization="domain" needs domain_index and a static '
                             "num_domains")
        n_d = dom_m if domain_tokens is None else jnp.asarray(domain_tokens, jnp.float32)
        n_dom = jnp.maximum((n_d > 0).sum().astype(jnp.float32), 1.0)
        coef = (1.0 / (n_dom * jnp.maximum(n_d, 1.0)))[domain_index.astype(jnp.int32)]
        loss = -(coef * tok).sum()
    else:
        raise ValueError(f"unknown normalization {normalization!r}; valid: sequence, token, domain")
    fkl = None
    if forward_kl_coef:
        if teacher_topk_logp is None or student_topk_logp is None:
            raise ValueError("mopd_loss: forward_kl_coef > 0 needs teacher_topk_logp and "
                             "student_topk_logp [B, T, K]")
        q_lp = teacher_topk_logp.astype(jnp.float32)
        fkl = (jnp.exp(q_lp) * (q_lp - student_topk_logp.astype(jnp.float32))).sum(-1)
        loss = loss + forward_kl_coef * (coef * m * lam * fkl).sum()
    rkl = sg(logp) - teacher_logp.astype(jnp.float32)
    metrics = {
        "reverse_kl": masked_mean(rkl, m),
        "mopd_adv_mean": masked_mean(adv, m),
        "num_tokens": m.sum(),
        **is_m,
    }
    if fkl is not None:
        metrics["forward_kl_topk"] = masked_mean(sg(fkl), m)
    if per_domain:
        metrics["domain_tokens"] = dom_m
        metrics["domain_grad_weight"] = jax.ops.segment_sum(
            (m * lam * coef * w * jnp.abs(adv)).ravel(), dom, num_domains)
        if fkl is not None:
            metrics["domain_forward_kl"] = jax.ops.segment_sum((sg(fkl) * m).ravel(), dom,
                                                               num_domains)
    return loss, metrics


def segment_start_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` float32: 1 where token ``t`` has a prefix in its own segment
    (``seg[t] > 0`` and ``seg[t] == seg[t−1]``), i.e. where a next-token prediction exists."""
    seg = segment_ids
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return ((seg > 0) & (seg == prev)).astype(jnp.float32)


def sft_loss(logp: jax.Array, loss_mask: jax.Array, *, segment_ids: Optional[jax.Array] = None,
             num_tokens=None):
    """Next-token negative log-likelihood on assistant tokens of packed rows (docs/algorithms.md §8)::

        L = −(1/num_tokens) Σ_{b,t} mask_{b,t} · lp_{b,t},   mask = loss_mask · has_prefix

    ``has_prefix`` (from ``segment_ids``) drops the first token of every segment so no
    prediction crosses a packing boundary. ``num_tokens`` defaults to ``Σ mask`` (pass the
    optimiser batch's total when accumulating). Metrics: ``nll`` (per-token mean), ``ppl``.
    """
    m = loss_mask.astype(jnp.float32)
    if segment_ids is not None:
        m = m * segment_start_mask(segment_ids)
    n = m.sum() if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    lp = logp.astype(jnp.float32)
    loss = -(lp * m).sum() / jnp.maximum(n, 1.0)
    nll = -masked_mean(sg(lp), m)
    return loss, {"nll": nll, "ppl": jnp.exp(nll), "num_tokens": m.sum()}
