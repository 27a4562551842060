"""In-process MOPD teachers: each sample scored by its domain's teacher.

``Teachers({domain: (model_cfg, params)})`` or :meth:`Teachers.from_checkpoints` with
``{domain: checkpoint_dir}`` (Hub layout, ``models.nemotron_h.load_checkpoint``; a directory
named for several domains is loaded once). :meth:`Teachers.score` returns, for every sample of
a :class:`~cascade_jax.rollout.types.Rollouts` (group by group, the packer's order), the
``[len(response)]`` float32 teacher log-probs ``log π_teacher(response[t] | prompt,
response[:t]) = log softmax(z_t / τ)[response[t]]`` at the temperature ``τ`` of the rollouts'
sampling contract (:mod:`cascade_jax.contract.sampling`: the requests' shared temperature, 1 for
greedy), the temperature the student's log-probs have in the train step — exactly what
:func:`~cascade_jax.rollout.packing.pack_rollouts` takes as ``teacher_logp``::

    teachers = Teachers.from_checkpoints({"math": "ckpt/math", "code": "ckpt/code"})
    batch = pack_rollouts(rollouts, rewards, teacher_logp=teachers.score(rollouts))

Teachers may differ in architecture but must share the student's tokenizer (token ids are
scored as they are). A sample whose request has no domain, or a domain without a teacher, is a
``ValueError`` naming it — never a silent zero.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from cascade_jax import domains
from cascade_jax.contract.sampling import shared_sampling
from models import nemotron_h

from .scoring import score_logprobs
from .types import Rollouts

__all__ = ["Teachers", "score_by_domain"]


class Teachers:
    """Domain-routed teacher scoring in this process (module doc)."""

    def __init__(self, by_domain: Mapping[str, tuple], *, batch_size: int = 8, model=None):
        if not by_domain:
            raise ValueError("teachers: at least one domain -> teacher is required")
        for d in by_domain:
            domains.check_domain(d)
        self.by_domain = dict(by_domain)
        self.batch_size = batch_size
        self.model = model

    @classmethod
    def from_checkpoints(cls, paths: Mapping[str, str], *, dtype=None, batch_size: int = 8,
                         model=None) -> "Teachers":
        """Load each distinct checkpoint directory once (``dtype`` default bfloat16)."""
        if model is None:
            model = nemotron_h
        import jax.numpy as jnp
        dtype = jnp.bfloat16 if dtype is None else dtype
        loaded: dict = {}
        by_domain = {}
        for d, path in paths.items():
            key = os.path.realpath(path)
            if key not in loaded:
                loaded[key] = model.load_checkpoint(path, dtype=dtype)
            by_domain[d] = loaded[key]
        return cls(by_domain, batch_size=batch_size, model=model)

    def num_teachers(self) -> int:
        """Distinct teacher parameter sets."""
        return len({id(p) for _, p in self.by_domain.values()})

    def score(self, rollouts: Rollouts, *, topk: int = 0) -> list:
        """Per sample (``rollouts.samples()`` order) the ``[R]`` float32 teacher log-probs at
        the rollouts' sampling temperature (module doc); with ``topk > 0`` a
        :class:`~cascade_jax.rollout.scoring.TopKScores` per sample (also the teacher's
        ``topk`` most likely tokens at each response position and their log-probs, for the
        forward-KL term of :func:`~cascade_jax.rl.losses.mopd_loss`)."""
        if not rollouts.requests:
            return []
        tau = shared_sampling([r.sampling for r in rollouts.requests],
                              what="teachers").logprob_temperature
        return score_by_domain(
            rollouts, self.by_domain,
            lambda teacher, prompts, responses: score_logprobs(
                teacher[1], teacher[0], prompts, responses, batch_size=self.batch_size,
                model=self.model, temperature=tau, topk=topk),
            key=lambda teacher: id(teacher[1]))


def score_by_domain(rollouts: Rollouts, by_domain: dict, score_fn: Callable,
                    key: Callable = id) -> list:
    """Route every sample to its request's domain teacher and score each teacher's samples in
    one call: ``score_fn(teacher, prompts, responses) -> [R]`` log-prob arrays. Teachers with
    the same ``key`` are scored together. Returns the scores in ``rollouts.samples()`` order;
    a request without a domain, or a domain without a teacher, is an error naming it."""
    jobs: dict = {}  # key(teacher) -> (teacher, [sample index], [prompt], [response])
    n = 0
    for req, group in zip(rollouts.requests, rollouts.groups):
        if req.domain is None:
            raise ValueError(f"domain: request {req.rid!r} has none; MOPD routes by domain")
        if req.domain not in by_domain:
            raise ValueError(f"domain: no teacher for {req.domain!r} (teachers cover "
                             f"{', '.join(sorted(by_domain))})")
        teacher = by_domain[req.domain]
        entry = jobs.setdefault(key(teacher), (teacher, [], [], []))
        for smp in group:
            entry[1].append(n)
            entry[2].append(smp.prompt_ids)
            entry[3].append(smp.response_ids)
            n += 1
    out: list = [None] * n
    for teacher, idx, prompts, responses in jobs.values():
        for i, lp in zip(idx, score_fn(teacher, prompts, responses)):
            out[i] = lp
    return out
