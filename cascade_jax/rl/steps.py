"""Pure train steps: ``step(state, batch, **static) -> (state, metrics)``.

Each step: fp32 master params → compute copy (bf16 by default) inside the differentiated
function → per-token log-probs (:func:`token_logprobs`) → objective → fp32 grads, summed over
``grad_accum`` micro-batches (a ``lax.scan``; every micro-batch loss is normalised by the
**whole** batch's token / sequence count so the sum equals the one-batch loss) → optax update.

No device assumptions, no randomness, no hidden state: the same inputs give bitwise-identical
outputs. Keyword arguments are static; bind them with :func:`functools.partial` and
``jax.jit`` the result (see :func:`make_train_step`).

Temperature (the sampling contract, :mod:`cascade_jax.contract.sampling`): the RL steps compute
``log π(y) = log softmax(z / τ)[y]`` at the temperature of their ``sampling`` argument (the run's
contract, ``rollout.sampling.temperature``), else of the batch's recorded ``batch.sampling``, else
``τ = 1``; ``τ = 0`` (greedy) computes ``log softmax(z)[y]``. A batch recorded at another
temperature than the step's raises :class:`~cascade_jax.contract.sampling.SamplingMismatchError`
(at trace time: ``batch.sampling`` is static).

Metrics (scalars): ``loss``, ``grad_norm`` (before clipping), ``lr``, ``entropy``,
``resp_len_mean/max/min``, ``num_tokens`` (trained tokens), ``total_tokens``; per objective
the advantage and IS statistics of :mod:`.advantages`, :mod:`.losses`, :mod:`.is_correction`;
for a model with MoE layers the expert-load statistics ``moe/*`` of :mod:`.expert_load` over
the step's valid (mask > 0) tokens, from the experts the training forward routed to (counts
summed over micro-batches, then reduced).
With ``grad_accum > 1``, ``loss``/``pg_loss``/``num_tokens`` are summed over micro-batches,
``*_max`` are maxima and all other loss metrics are means over micro-batches weighted by
their token counts (exact for token means; quantiles such as ``is_abs_delta_p99`` become a
weighted mean of the micro-batch quantiles).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cascade_jax import domains as D
from cascade_jax.contract.sampling import SamplingParams, check_temperature
from models import nemotron_h

from .advantages import grpo_advantages
from .expert_load import COUNTS_KEY, expert_counts, load_metrics
from .batch import FINISH_ABORT, RLBatch, SFTBatch, num_sequences, response_lengths, sequence_index
from .is_correction import masked_mean
from .logprobs import DEFAULT_VOCAB_CHUNK, token_logprobs
from .mismatch import logprob_mismatch
from .losses import grpo_loss, mopd_loss, segment_start_mask, sft_loss
from .optim import TrainState, compute_params, trainable_mask
from .settings import GRPOSettings, MOPDSettings

__all__ = ["grpo_train_step", "mopd_train_step", "sft_train_step", "make_train_step",
           "accumulate_gradients", "domain_metrics"]

_SUM_KEYS = ("loss", "pg_loss", "num_tokens", COUNTS_KEY, "domain_tokens", "domain_grad_weight",
             "domain_forward_kl")


def _split(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]`` with micro-batch ``j`` = rows ``j, j+k, j+2k, ...``
    (strided, so when the batch is sharded over data-parallel devices every micro-batch
    stays spread over all of them rather than sitting on a contiguous subset)."""
    if x.shape[0] % k:
        raise ValueError(f"batch dim {x.shape[0]} is not divisible by grad_accum={k}")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def accumulate_gradients(loss_fn: Callable, params, micro: dict, grad_accum: int = 1):
    """``Σ_k ∇ loss_fn(params, micro_k)`` over ``grad_accum`` equal slices of the ``[B, ...]``
    arrays in ``micro`` (a ``lax.scan``; grads accumulated in fp32). ``loss_fn`` returns
    ``(loss, metrics)``; a ``num_tokens`` metric, if present, weights the averaged metrics.
    Returns ``(grads, metrics)`` with metrics reduced as the module docstring says."""
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = vg(params, micro)
        return grads, {**metrics, "loss": loss}
    stacked = jax.tree.map(lambda x: _split(x, grad_accum), micro)

    def body(acc, mb):
        (loss, metrics), g = vg(params, mb)
        acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        return acc, {**metrics, "loss": loss}

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, ms = jax.lax.scan(body, zeros, stacked)

    # token-weighted means, so an (e.g. fully filtered) empty micro-batch does not dilute them
    w = ms["num_tokens"] if "num_tokens" in ms else jnp.ones((grad_accum,), jnp.float32)
    w = jnp.where(w.sum() > 0, w, 1.0)

    def reduce(name, v):
        if name in _SUM_KEYS:
            return v.sum(0)
        if name.endswith("_max"):
            return v.max(0)
        return (v * w).sum(0) / w.sum()

    return grads, {k: reduce(k, v) for k, v in ms.items()}


def _param_specs(model, model_cfg):
    """The parameter specs (roles: trainable / decay / fp32) of ``model`` (default NemotronH)."""
    if model is None:
        model = nemotron_h
    return model.param_specs(model_cfg)


def _apply(state: TrainState, grads, metrics: dict, specs, batch=None):
    if COUNTS_KEY in metrics:
        metrics = dict(metrics)
        metrics.update(load_metrics(metrics.pop(COUNTS_KEY)))
    if getattr(batch, "policy_version", None) is not None:
        lag = state.step - batch.policy_version.astype(jnp.int32)
        metrics = {**metrics, "policy_lag_max": lag.max().astype(jnp.float32),
                   "policy_lag_mean": lag.astype(jnp.float32).mean()}
    train = trainable_mask(specs)
    gnorm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, train))
    lr = state.lr_fn(state.step) if state.lr_fn is not None else jnp.nan
    new_state = state.apply_gradients(grads)
    return new_state, {**metrics, "grad_norm": gnorm, "lr": jnp.asarray(lr, jnp.float32)}


def _micro(batch, mask: jax.Array, **extra) -> dict:
    """The per-token arrays a micro-batch needs: the model inputs (with ``routed_experts``
    when the batch replays routing), ``mask`` and ``extra``."""
    rx = getattr(batch, "routed_experts", None)
    if rx is not None:
        extra["routed_experts"] = rx
    return dict(tokens=batch.tokens, positions=batch.positions, segment_ids=batch.segment_ids,
                mask=mask, **extra)


def _policy_loss(objective: Callable, *, model_cfg, compute_dtype, temperature: float = 1.0,
                 vocab_chunk: int, model, row_len: Optional[int] = None) -> Callable:
    """``loss_fn(master, mb)`` for :func:`accumulate_gradients`: compute copy of ``master`` →
    :func:`token_logprobs` of the micro-batch → ``objective(lp, mb) -> (loss, metrics)``, plus
    the masked mean ``entropy``."""

    specs = _param_specs(model, model_cfg)
    moe = "E" in getattr(model_cfg, "pattern", "") and getattr(model_cfg, "n_routed_experts", 0) > 0

    def loss_fn(master, mb):
        params = compute_params(master, specs, compute_dtype)
        view = SFTBatch(tokens=mb["tokens"], positions=mb["positions"],
                        segment_ids=mb["segment_ids"], loss_mask=mb["mask"])
        topk_ids = mb.get("teacher_topk_ids")
        out = token_logprobs(params, view, model_cfg, temperature=temperature,
                             vocab_chunk=vocab_chunk, model=model,
                             routed_experts=mb.get("routed_experts"), row_len=row_len,
                             return_routed_experts=moe, extra_ids=topk_ids)
        lp, ent = out[:2]
        if topk_ids is not None:  # the student's log-probs of the teacher's top-K tokens
            mb = {**mb, "student_topk_logp": out[-1]}
        loss, m = objective(lp, mb)
        m = {**m, "entropy": masked_mean(ent, mb["mask"])}
        if moe:  # expert-load counts over the micro-batch's valid tokens (.expert_load)
            m[COUNTS_KEY] = expert_counts(out[2], mb["mask"], model_cfg.n_routed_experts)
        return loss, m

    return loss_fn


def _temperature(batch: RLBatch, sampling: Optional[SamplingParams], what: str) -> float:
    """``τ`` of the step's log-probs (module doc): the step's contract, else the batch's,
    else 1; a batch recorded at another temperature than the step's is refused."""
    check_temperature(batch.sampling, sampling, what=what)
    contract = sampling if sampling is not None else batch.sampling
    return 1.0 if contract is None else contract.logprob_temperature


def _length_metrics(batch: RLBatch) -> dict:
    lens = response_lengths(batch)
    has = lens > 0
    return {
        "resp_len_mean": masked_mean(lens, has),
        "resp_len_max": lens.max(),
        "resp_len_min": jnp.where(has.any(), jnp.where(has, lens, jnp.inf).min(), 0.0),
        "total_tokens": (batch.segment_ids > 0).sum().astype(jnp.float32),
    }


def grpo_train_step(state: TrainState, batch: RLBatch, *, model_cfg,
                    settings: GRPOSettings = GRPOSettings(), grad_accum: int = 1,
                    compute_dtype=jnp.bfloat16, sampling: Optional[SamplingParams] = None,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None,
                    row_len: Optional[int] = None):
    """One strictly on-policy GRPO update (docs/algorithms.md §5); ``settings``
    (:class:`~cascade_jax.rl.settings.GRPOSettings`, from the stage by
    :func:`~cascade_jax.rl.settings.loss_settings`) holds every loss switch it reads.

    1. ``Â, keep = grpo_advantages(rewards, group_ids, finish_reason)`` with the settings'
       leave-one-out / overlong / dynamic-filtering switches;
    2. ``mask = loss_mask · keep[seq]``, ``num_tokens = Σ mask`` over the whole batch;
    3. ``L = grpo_loss(lp, None, Â[seq], mask, rollout_logp, ref_logp, num_tokens,
       kl_coef, clip_low, clip_high, is_correction, tis_cap=is_high, is_low, is_high)``,
       summed over micro-batches;
    4. AdamW update. Returns ``(state, metrics)``, with the rollout-fidelity metrics of
       :func:`~cascade_jax.rl.mismatch.logprob_mismatch` (``mismatch_*``).

    Rollout fidelity: ``batch.routed_experts`` (when set) is replayed in every MoE layer
    (routing replay); ``row_len`` computes the log-probs batch-invariantly at ``[1, row_len]``
    per row (zero-mismatch mode; equal to the rollout engine's row length).
    ``sampling``: the run's sampling contract; ``lp`` at its temperature (module doc).
    """
    s = settings
    temperature = _temperature(batch, sampling, "grpo_train_step")
    adv, keep, adv_metrics = grpo_advantages(
        batch.rewards, batch.group_ids, batch.finish_reason, leave_one_out=s.leave_one_out,
        overlong_filtering=s.overlong_filtering, dynamic_filtering=s.dynamic_filtering)
    seq = sequence_index(batch)
    mask = batch.loss_mask.astype(jnp.float32) * keep[seq] * segment_start_mask(batch.segment_ids)
    num_tokens = mask.sum()
    micro = _micro(batch, mask, adv=adv[seq], rollout_logp=batch.rollout_logp)
    use_kl = bool(s.kl_coef)
    if use_kl and batch.ref_logp is None:
        raise ValueError(f"grpo_train_step: settings.kl_coef={s.kl_coef} needs batch.ref_logp")
    if use_kl:
        micro["ref_logp"] = batch.ref_logp

    def objective(lp, mb):
        loss, m = grpo_loss(lp, None, mb["adv"], mb["mask"], rollout_logp=mb["rollout_logp"],
                            ref_logp=mb.get("ref_logp"), num_tokens=num_tokens,
                            kl_coef=s.kl_coef if use_kl else 0.0, clip_low=s.clip_low,
                            clip_high=s.clip_high, is_correction=s.is_correction,
                            tis_cap=s.is_high, is_low=s.is_low, is_high=s.is_high)
        return loss, {**m, **logprob_mismatch(lp, mb["rollout_logp"], mb["mask"],
                                              low=s.is_low, high=s.is_high)}

    loss_fn = _policy_loss(objective, model_cfg=model_cfg, compute_dtype=compute_dtype,
                           temperature=temperature, vocab_chunk=vocab_chunk, model=model,
                           row_len=row_len)
    grads, metrics = accumulate_gradients(loss_fn, state.params, micro, grad_accum)
    metrics = {**metrics, **adv_metrics, **_length_metrics(batch)}
    return _apply(state, grads, metrics, _param_specs(model, model_cfg), batch)


def mopd_train_step(state: TrainState, batch: RLBatch, *, model_cfg,
                    settings: MOPDSettings = MOPDSettings(), grad_accum: int = 1,
                    compute_dtype=jnp.bfloat16, sampling: Optional[SamplingParams] = None,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None,
                    row_len: Optional[int] = None):
    """One MOPD update (docs/algorithms.md §6): ``batch.teacher_logp`` holds each sequence's
    domain teacher's log-probs (``rollout.teachers.Teachers.score``), ``batch.rollout_logp`` the
    inference engine's. ``L = mopd_loss(lp, teacher_logp, rollout_logp, loss_mask,
    is_low, is_high)`` normalised by ``settings.loss_norm`` (per sequence, per token or per
    domain, with the whole batch's sequence / token / per-domain token counts) and weighted per
    domain by ``settings.domain_weights``;
    ``settings.grpo_coef > 0`` mixes in ``grpo_coef · Â`` from the rewards
    (:class:`~cascade_jax.rl.settings.MOPDSettings`); ``settings.forward_kl_coef > 0`` adds
    the top-K forward-KL term over ``batch.teacher_topk_ids`` / ``teacher_topk_logp`` (the
    student's log-probs of those tokens come from the same forward). ``sampling``: the run's
    sampling contract; ``lp`` (and the teachers' log-probs) at its temperature (module doc).

    Per domain ``d`` (the ``len(domains.DOMAINS)`` domain ids) the metrics add two vectors:
    ``mopd/domain_tokens`` (valid response tokens of the batch) and ``mopd/domain_loss_share``
    (the domain's share of the gradient weight ``Σ mask · c_t · w_t · |a_t|``,
    :func:`~cascade_jax.rl.losses.mopd_loss`; the shares sum to 1 over the batch's domains;
    the sampled-token term's weight only), and with the forward-KL term
    ``mopd/domain_forward_kl`` (its mean ``F_t`` over the domain's valid tokens);
    :func:`domain_metrics` names them per domain."""
    if batch.teacher_logp is None:
        raise ValueError("mopd_train_step: batch.teacher_logp is required")
    s = settings
    temperature = _temperature(batch, sampling, "mopd_train_step")
    n_seq = num_sequences(batch)
    seq = sequence_index(batch)
    alive = (batch.finish_reason != FINISH_ABORT).astype(jnp.float32)
    mask = batch.loss_mask.astype(jnp.float32) * alive[seq] * segment_start_mask(batch.segment_ids)
    seq_len = jax.ops.segment_sum(mask.ravel(), seq.ravel(), num_segments=n_seq)
    n_valid_seq = (seq_len > 0).sum()
    num_tokens = mask.sum()
    n_dom = len(D.DOMAINS)
    dom_tok = batch.domain_ids.astype(jnp.int32)[seq]
    domain_tokens = jax.ops.segment_sum(mask.ravel(), dom_tok.ravel(), num_segments=n_dom)
    micro = _micro(batch, mask, teacher_logp=batch.teacher_logp, rollout_logp=batch.rollout_logp,
                   dom=dom_tok)
    if s.forward_kl_coef:
        if batch.teacher_topk_ids is None or batch.teacher_topk_logp is None:
            raise ValueError("mopd_train_step: settings.forward_kl_coef > 0 needs "
                             "batch.teacher_topk_ids / teacher_topk_logp (teachers scored with "
                             "topk)")
        micro.update(teacher_topk_ids=batch.teacher_topk_ids,
                     teacher_topk_logp=batch.teacher_topk_logp)
    packed = batch.seq_index is not None
    if packed:
        micro["seq"] = seq
    extra = {}
    if s.grpo_coef:
        adv, _, extra = grpo_advantages(batch.rewards, batch.group_ids, batch.finish_reason,
                                        leave_one_out=s.leave_one_out)
        micro["adv"] = adv[seq]

    def objective(lp, mb):
        return mopd_loss(lp, mb["teacher_logp"], mb["rollout_logp"], mb["mask"],
                         is_low=s.is_low, is_high=s.is_high,
                         advantages=mb.get("adv"), advantage_coef=s.grpo_coef,
                         normalization=s.loss_norm, seq_index=mb.get("seq"),
                         num_segments=n_seq if packed else None,
                         num_sequences=n_valid_seq, num_tokens=num_tokens,
                         domain_index=mb["dom"], num_domains=n_dom, domain_tokens=domain_tokens,
                         domain_weight=jnp.asarray(s.domain_weights) if s.domain_weights else None,
                         forward_kl_coef=s.forward_kl_coef,
                         teacher_topk_logp=mb.get("teacher_topk_logp"),
                         student_topk_logp=mb.get("student_topk_logp"))

    loss_fn = _policy_loss(objective, model_cfg=model_cfg, compute_dtype=compute_dtype,
                           temperature=temperature, vocab_chunk=vocab_chunk, model=model,
                           row_len=row_len)
    grads, metrics = accumulate_gradients(loss_fn, state.params, micro, grad_accum)
    tokens, gw = metrics.pop("domain_tokens"), metrics.pop("domain_grad_weight")
    metrics["mopd/domain_tokens"] = tokens
    metrics["mopd/domain_loss_share"] = gw / jnp.maximum(gw.sum(), 1e-30)
    if "domain_forward_kl" in metrics:  # per-domain mean of the top-K forward KL
        metrics["mopd/domain_forward_kl"] = (metrics.pop("domain_forward_kl")
                                             / jnp.maximum(tokens, 1.0))
    metrics = {**metrics, **extra, **_length_metrics(batch),
               "reward_mean": batch.rewards.astype(jnp.float32).mean(),
               "num_sequences": n_valid_seq.astype(jnp.float32)}
    return _apply(state, grads, metrics, _param_specs(model, model_cfg), batch)


def domain_metrics(metrics: dict, domains) -> dict:
    """``metrics`` of :func:`mopd_train_step` with its per-domain vectors named: for each
    domain name in ``domains`` (e.g. the stage's teachers; unknown names are skipped), in
    sorted order, ``mopd/tokens/<d>`` and ``mopd/loss_share/<d>`` (and ``mopd/forward_kl/<d>``
    when the step has the forward-KL term); the vectors are dropped. Other metrics pass
    through unchanged (so does a dict without the vectors). Host side: the named values are
    numpy scalars."""
    if "mopd/domain_tokens" not in metrics:
        return dict(metrics)
    out = dict(metrics)
    # on the host (a replicated array of several processes converts; indexing it would dispatch)
    tokens, share = (np.asarray(out.pop(k)) for k in ("mopd/domain_tokens", "mopd/domain_loss_share"))
    for name in sorted(set(domains) & set(D.DOMAIN_IDS)):
        out[f"mopd/tokens/{name}"] = tokens[D.DOMAIN_IDS[name]]
        out[f"mopd/loss_share/{name}"] = share[D.DOMAIN_IDS[name]]
    if "mopd/domain_forward_kl" in out:
        fkl = np.asarray(out.pop("mopd/domain_forward_kl"))
        for name in sorted(set(domains) & set(D.DOMAIN_IDS)):
            out[f"mopd/forward_kl/{name}"] = fkl[D.DOMAIN_IDS[name]]
    return out


def sft_train_step(state: TrainState, batch: SFTBatch, *, model_cfg, grad_accum: int = 1,
                   compute_dtype=jnp.bfloat16, vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   model=None):
    """One SFT update on packed rows (docs/algorithms.md §8): next-token NLL on ``loss_mask``
    tokens that have a prefix in their segment, normalised by the batch's token count."""
    mask = batch.loss_mask.astype(jnp.float32) * segment_start_mask(batch.segment_ids)
    num_tokens = mask.sum()
    loss_fn = _policy_loss(lambda lp, mb: sft_loss(lp, mb["mask"], num_tokens=num_tokens),
                           model_cfg=model_cfg, compute_dtype=compute_dtype,
                           vocab_chunk=vocab_chunk, model=model)
    grads, metrics = accumulate_gradients(loss_fn, state.params, _micro(batch, mask), grad_accum)
    metrics = {**metrics, "total_tokens": (batch.segment_ids > 0).sum().astype(jnp.float32)}
    return _apply(state, grads, metrics, _param_specs(model, model_cfg))


_STEPS = {"grpo": grpo_train_step, "mopd": mopd_train_step, "sft": sft_train_step}


def make_train_step(objective: str, *, jit: bool = True, opt_cfg=None, **static) -> Callable:
    """``step(state, batch) -> (state, metrics)`` for ``objective`` in ``grpo``, ``mopd``,
    ``sft`` with the keyword arguments bound (and ``jax.jit``-ed unless ``jit=False``).
    ``opt_cfg`` (an ``OptimizerConfig``) supplies ``grad_accum`` unless it is given."""
    if objective not in _STEPS:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(_STEPS)}")
    if opt_cfg is not None:
        static.setdefault("grad_accum", opt_cfg.grad_accum)
    fn = functools.partial(_STEPS[objective], **static)
    return jax.jit(fn) if jit else fn
