"""Rollouts + rewards (+ teacher log-probs) -> :class:`~cascade_jax.rl.batch.RLBatch`.

Sample ``n`` is ``rollouts.samples()[n]`` (group by group). Each becomes the sequence
``prompt_ids ++ response_ids`` with, aligned with its tokens (``rl.batch`` layout: entry ``t``
predicts token ``t`` from tokens ``< t``):

* ``loss_mask`` 1 on the response tokens, 0 on the prompt and padding;
* ``rollout_logp`` the engine's sampling log-probs on the response tokens, 0 elsewhere;
* ``teacher_logp`` the teacher's log-probs on the response tokens (0 elsewhere) when
  ``teacher_logp`` is given, else ``None`` (never zeros: MOPD refuses a batch without it);
  when its entries are :class:`~cascade_jax.rollout.scoring.TopKScores` (teachers scored with
  ``topk``), also ``teacher_topk_ids`` / ``teacher_topk_logp`` ``[rows, T, K]``: the teacher's
  K most likely tokens and their log-probs at each response token's position (0 elsewhere).

Per sequence: ``rewards``; ``group_ids`` = index of the request (``+ group_offset``);
``finish_reason`` codes ``rl.batch.FINISH_*`` (stop 0, length 1, abort 2; aborted samples are
kept, the update steps mask them); ``domain_ids`` = :func:`cascade_jax.domains.domain_id` of
the request's ``domain`` (``-1`` when it has none); ``policy_version`` = the sample's
``weight_version`` as an int when every version is a decimal integer (trainer steps), else
``None``; ``sampling`` (static) = the requests' sampling contract
(:func:`cascade_jax.contract.sampling.shared_sampling`: one temperature for the whole batch).

Routing replay: when any sample carries ``routed_experts [P + R − 1, L_moe, K]`` (SGLang's
layout), ``routed_experts [rows, T, L_moe, K]`` holds them at the sample's columns
(:func:`cascade_jax.rl.pack_routed_experts`; ``num_experts`` required), -1 elsewhere and for
samples without them (e.g. aborted ones: routed freely); else ``None``.

Layouts: ``"padded"`` — one sequence per row, ``T`` = the longest sequence rounded up to a
multiple of ``pad_multiple`` (or ``seq_len``); ``"packed"`` — sequences placed in order into rows
of ``seq_len`` tokens (a new row when the next one does not fit; ``positions`` restart at 0 and
``segment_ids`` count 1, 2, … within a row; ``seq_index`` names the sample), padded to
``num_rows`` rows when given (static shapes). Host-side numpy; the arrays come back as jax arrays.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from cascade_jax import domains
from cascade_jax.contract.sampling import shared_sampling
from cascade_jax.rl.batch import RLBatch, pack_routed_experts

from .scoring import TopKScores
from .types import FINISH_REASONS, Rollouts

__all__ = ["pack_rollouts", "finish_code", "domain_code", "version_code"]


def finish_code(reason: str) -> int:
    """``rl.batch.FINISH_*`` code of an SGLang finish-reason type."""
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason: {reason!r} is not one of {FINISH_REASONS}")
    return FINISH_REASONS.index(reason)


def domain_code(name: Optional[str]) -> int:
    """Domain id of ``name`` (``cascade_jax.domains``), ``-1`` for ``None``."""
    return -1 if name is None else domains.domain_id(name)


def version_code(versions: Sequence[str]) -> Optional[np.ndarray]:
    """``[N]`` int32 trainer steps when every version is a decimal integer, else ``None``."""
    if versions and all(isinstance(v, str) and v.isdigit() for v in versions):
        return np.asarray([int(v) for v in versions], np.int32)
    return None


def pack_rollouts(rollouts: Rollouts, rewards, *, teacher_logp: Optional[Sequence] = None,
                  layout: str = "padded", seq_len: Optional[int] = None, pad_multiple: int = 8,
                  num_rows: Optional[int] = None, group_offset: int = 0,
                  num_experts: Optional[int] = None) -> RLBatch:
    """Build an :class:`RLBatch` (module doc). ``rewards`` ``[N]`` (one per sample, group by
    group); ``teacher_logp`` ``None``, ``N`` arrays ``[len(response)]`` or ``N``
    :class:`~cascade_jax.rollout.scoring.TopKScores` (one K for all)."""
    samples = rollouts.samples()
    N = len(samples)
    if N == 0:
        raise ValueError("rollouts: no samples to pack")
    rewards = np.asarray(rewards, np.float32).reshape(-1)
    if rewards.shape[0] != N:
        raise ValueError(f"rewards: {rewards.shape[0]} values for {N} samples")
    topk = None  # [N] TopKScores when the teachers were scored with their top-K
    if teacher_logp is not None:
        if len(teacher_logp) != N:
            raise ValueError(f"teacher_logp: {len(teacher_logp)} entries for {N} samples")
        if N and isinstance(teacher_logp[0], TopKScores):
            topk, teacher_logp = list(teacher_logp), [t.logp if isinstance(t, TopKScores) else t
                                                      for t in teacher_logp]
            K = np.shape(topk[0].topk_ids)[-1]
            for n, (t, s) in enumerate(zip(topk, samples)):
                want = (len(s.response_ids), K)
                if not isinstance(t, TopKScores) or np.shape(t.topk_ids) != want \
                        or np.shape(t.topk_logp) != want:
                    raise ValueError(f"teacher_logp[{n}]: expected TopKScores with top-K arrays "
                                     f"of shape {want} (one K for all samples)")
        for n, (t, s) in enumerate(zip(teacher_logp, samples)):
            if t is None:
                raise ValueError(f"teacher_logp[{n}]: missing (pass teacher_logp=None for none)")
            if np.shape(t) != (len(s.response_ids),):
                raise ValueError(f"teacher_logp[{n}]: shape {np.shape(t)}, expected "
                                 f"({len(s.response_ids)},) (one per response token)")
    for n, s in enumerate(samples):
        if len(s.logprobs) != len(s.response_ids):
            raise ValueError(f"samples[{n}].logprobs: {len(s.logprobs)} values for "
                             f"{len(s.response_ids)} response tokens")
        if len(s.prompt_ids) == 0:
            raise ValueError(f"samples[{n}].prompt_ids: empty prompt")
    group_ids = np.asarray([group_offset + g for g, grp in enumerate(rollouts.groups) for _ in grp],
                           np.int32)
    sampling = shared_sampling([r.sampling for r in rollouts.requests], what="pack_rollouts")
    domain_ids = np.asarray([domain_code(r.domain) for r, grp in zip(rollouts.requests, rollouts.groups)
                             for _ in grp], np.int32)
    finish = np.asarray([finish_code(s.finish_reason) for s in samples], np.int32)
    version = version_code([s.weight_version for s in samples])
    lens = [len(s.prompt_ids) + len(s.response_ids) for s in samples]

    if layout == "padded":
        T = seq_len if seq_len is not None else -(-max(lens) // pad_multiple) * pad_multiple
        rows = N
        place = [(n, 0) for n in range(N)]  # (row, offset)
    elif layout == "packed":
        if seq_len is None:
            raise ValueError("seq_len: required for the packed layout")
        T = seq_len
        place, row, used = [], 0, 0
        for n, L in enumerate(lens):
            if used + L > T:
                row, used = row + 1, 0
            place.append((row, used))
            used += L
        rows = row + 1
        if num_rows is not None:
            if rows > num_rows:
                raise ValueError(f"num_rows: {N} samples need {rows} rows of {T} tokens, "
                                 f"only {num_rows} allowed")
            rows = num_rows
    else:
        raise ValueError(f"layout: {layout!r} is not 'padded' or 'packed'")
    for n, L in enumerate(lens):
        if L > T:
            raise ValueError(f"seq_len: sample {n} has {L} tokens, more than seq_len {T}")

    tokens = np.zeros((rows, T), np.int32)
    positions = np.zeros((rows, T), np.int32)
    segment_ids = np.zeros((rows, T), np.int32)
    loss_mask = np.zeros((rows, T), np.float32)
    rollout_logp = np.zeros((rows, T), np.float32)
    teacher = np.zeros((rows, T), np.float32) if teacher_logp is not None else None
    if topk is not None:
        top_ids = np.zeros((rows, T, K), np.int32)
        top_lp = np.zeros((rows, T, K), np.float32)
    seq_index = np.zeros((rows, T), np.int32)
    seg_counter = np.zeros(rows, np.int32)
    for n, (s, (r, o)) in enumerate(zip(samples, place)):
        P, R = len(s.prompt_ids), len(s.response_ids)
        seg_counter[r] += 1
        tokens[r, o:o + P] = s.prompt_ids
        tokens[r, o + P:o + P + R] = s.response_ids
        positions[r, o:o + P + R] = np.arange(P + R)
        segment_ids[r, o:o + P + R] = seg_counter[r]
        seq_index[r, o:o + P + R] = n
        loss_mask[r, o + P:o + P + R] = 1.0
        rollout_logp[r, o + P:o + P + R] = s.logprobs
        if teacher is not None:
            teacher[r, o + P:o + P + R] = np.asarray(teacher_logp[n], np.float32)
        if topk is not None:
            top_ids[r, o + P:o + P + R] = topk[n].topk_ids
            top_lp[r, o + P:o + P + R] = topk[n].topk_logp
    routed = None
    if any(s.routed_experts is not None for s in samples):
        if num_experts is None:
            raise ValueError("num_experts: required when samples carry routed_experts")
        have = [n for n, s in enumerate(samples) if s.routed_experts is not None]
        for n in have:
            want = len(samples[n].prompt_ids) + len(samples[n].response_ids) - 1
            if np.shape(samples[n].routed_experts)[0] != want:
                raise ValueError(f"samples[{n}].routed_experts: {np.shape(samples[n].routed_experts)[0]} "
                                 f"rows, expected P + R - 1 = {want}")
        per = pack_routed_experts([samples[n].routed_experts for n in have], T,
                                  num_experts=num_experts, offsets=[place[n][1] for n in have])
        routed = np.full((rows, T) + per.shape[2:], -1, np.int32)
        for j, n in enumerate(have):
            r, o = place[n]
            k = np.shape(samples[n].routed_experts)[0]
            routed[r, o:o + k] = per[j, o:o + k]
    if layout == "padded":
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy()
    return RLBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segment_ids), loss_mask=jnp.asarray(loss_mask),
        rollout_logp=jnp.asarray(rollout_logp), rewards=jnp.asarray(rewards),
        group_ids=jnp.asarray(group_ids), finish_reason=jnp.asarray(finish),
        domain_ids=jnp.asarray(domain_ids),
        teacher_logp=None if teacher is None else jnp.asarray(teacher),
        teacher_topk_ids=None if topk is None else jnp.asarray(top_ids),
        teacher_topk_logp=None if topk is None else jnp.asarray(top_lp),
        seq_index=jnp.asarray(seq_index) if layout == "packed" else None,
        policy_version=None if version is None else jnp.asarray(version),
        routed_experts=None if routed is None else jnp.asarray(routed), sampling=sampling)
