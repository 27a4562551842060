"""Zero-mismatch generation: every token is sampled from the trainer's own log-probs.

Two forms. :class:`ExactEngine` (what the runner and ``launch/serve.py --zero-mismatch`` use):
the continuous-batching engine with cached prefill / decode by the kernel-invariant model
(:mod:`models.nemotron_h.invariant`), one decode step per token; the trainer recomputes its
log-probs with ``model=models.nemotron_h.invariant`` (:func:`cascade_jax.rl.token_logprobs`)
bit for bit. :func:`generate_exact` (below) is the older row form at the default kernels: a full
row forward per token (cost quadratic in the row), matched by the trainer's ``row_len`` mode.

``generate_exact`` decodes with continuous slot refill, but instead of the KV-cache / recurrent
decode step it computes each slot's next-token distribution with
:func:`cascade_jax.rl.next_token_logprobs` — the trainer's forward and chunked log-softmax over
the slot's row at the fixed shape ``[1, row_len]``, with the vocabulary sums in a written-out
order. The trainer's :func:`cascade_jax.rl.token_logprobs` with ``row_len=row_len`` (and the
train steps with ``row_len``, inside ``value_and_grad`` too: :mod:`cascade_jax.rl.logprobs`, "Why a
custom VJP") recompute the very same numbers, so the sampling log-prob of every token equals the
trainer's bit for bit, whatever the batch sizes on either side.

Cost: one full forward of ``row_len`` tokens per generated token and slot (no cache), i.e.
about ``row_len`` times the work of a cached decode step; the benchmark
(``launch/bench_fidelity.py``) reports the ratio. Sampling: ``temperature`` (``τ > 0``; 0 =
greedy) as :func:`cascade_jax.rollout.sampler.sample_tokens` draws, no top-p / top-k (a
truncated support is not what the trainer's log-probs describe).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.rl.logprobs import (DEFAULT_VOCAB_CHUNK, inverse_temperature,
                                     invariant_next_logprobs, next_token_logprobs)
from models import nemotron_h
from models.nemotron_h import invariant

from .engine import JaxEngine, scatter_admitted
from .sampler import sample_tokens
from .types import Sample, sample_seed

__all__ = ["generate_exact", "ExactEngine"]


@functools.partial(jax.jit, static_argnames=("cfg", "vocab_chunk", "routed", "model"))
def _next(params, buf, lengths, inv_t, greedy, keys, *, cfg, vocab_chunk, routed, model):
    out = next_token_logprobs(params, buf, lengths, cfg, inv_temperature=inv_t,
                              vocab_chunk=vocab_chunk, model=model, return_routed_experts=routed)
    logp, experts = out if routed else (out, None)
    S = buf.shape[0]
    # logp already holds log softmax(z / τ): draw from it at unit temperature (0 = greedy)
    ids, _ = sample_tokens(logp, keys, jnp.where(greedy, 0.0, 1.0), jnp.ones((S,), jnp.float32),
                           jnp.full((S,), -1, jnp.int32))
    lp = jnp.take_along_axis(logp, ids[:, None], -1)[:, 0]
    return ids, lp, experts


def generate_exact(params, cfg, prompts: Sequence[Sequence[int]], *, row_len: int,
                   num_slots: int, max_new_tokens: int, seed: int = 0,
                   seeds: Optional[Sequence[int]] = None, temperature: float = 1.0,
                   stop_token_ids: Sequence[int] = (), return_routed_experts: bool = False,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None,
                   weight_version: str = "0") -> list:
    """One :class:`~cascade_jax.rollout.types.Sample` per prompt (in order), decoded over
    ``num_slots`` slots refilled as samples finish. Prompt ``i`` draws its ``t``-th token with
    the key ``fold_in(key(s_i), t)`` (independent of slot and batch), ``s_i = seeds[i]``, by
    default ``sample_seed(seed, i)``: the engine's rule, so ``n`` copies of a prompt are the
    ``n`` samples of one request seeded ``seed``. A sample
    stops at a stop token (kept, ``stop``) or after ``max_new_tokens`` (``length``);
    ``len(prompt) + max_new_tokens <= row_len``. ``return_routed_experts``: each sample's
    ``routed_experts [P + R − 1, L_moe, K]`` (the trainer's unreplayed routing of its tokens)."""
    if model is None:
        model = nemotron_h
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}]: empty prompt")
        if len(p) + max_new_tokens > row_len:
            raise ValueError(f"prompts[{i}]: length {len(p)} + max_new_tokens {max_new_tokens} "
                             f"exceeds row_len {row_len}")
    if seeds is None:
        seeds = [sample_seed(seed, i) for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
    S = int(num_slots)
    stops = set(int(t) for t in stop_token_ids)
    # threefry key data of each 64-bit seed (= jax.random.key(s) for s < 2**32), as the engine
    base = jax.random.wrap_key_data(jnp.asarray(np.asarray(
        [[(int(s) >> 32) & 0xFFFFFFFF, int(s) & 0xFFFFFFFF] for s in seeds], np.uint32)))
    inv = np.broadcast_to(inverse_temperature(temperature), (S,)).astype(np.float32)
    greedy = np.full((S,), temperature <= 0)
    queue = list(range(len(prompts)))
    slots: list = [None] * S  # prompt index or None
    buf = np.zeros((S, row_len), np.int32)
    length = np.ones(S, np.int32)
    out_tok = {i: [] for i in range(len(prompts))}
    out_lp = {i: [] for i in range(len(prompts))}
    results: dict = {}
    while queue or any(s is not None for s in slots):
        for s in range(S):
            if slots[s] is None and queue:
                i = queue.pop(0)
                slots[s] = i
                buf[s] = 0
                buf[s, :len(prompts[i])] = prompts[i]
                length[s] = len(prompts[i])
        keys = jnp.stack([jax.random.fold_in(base[i if i is not None else 0],
                                             len(out_tok[i]) if i is not None else 0)
                          for i in slots])
        ids, lp, experts = _next(params, buf, length, inv, greedy, keys, cfg=cfg,
                                 vocab_chunk=vocab_chunk, routed=return_routed_experts, model=model)
        ids, lp = np.asarray(ids), np.asarray(lp)
        for s, i in enumerate(slots):
            if i is None:
                continue
            y = int(ids[s])
            out_tok[i].append(y)
            out_lp[i].append(float(lp[s]))
            reason = "stop" if y in stops else ("length" if len(out_tok[i]) >= max_new_tokens else None)
            if reason is None:
                buf[s, length[s]] = y
                length[s] += 1
                continue
            rx = None
            if return_routed_experts:  # this step's row held all P + R − 1 fed tokens
                rx = np.asarray(experts[s, :length[s]])
            results[i] = Sample(prompt_ids=np.asarray(prompts[i], np.int32),
                                response_ids=np.asarray(out_tok[i], np.int32),
                                logprobs=np.asarray(out_lp[i], np.float32), finish_reason=reason,
                                weight_version=weight_version, routed_experts=rx)
            slots[s] = None
    return [results[i] for i in range(len(prompts))]


class ExactEngine(JaxEngine):
    """The zero-mismatch mode of the continuous-batching engine: :class:`JaxEngine`'s scheduling
    (slots, refill, seeds, streaming, aborts, weight updates) with cached prefill / decode by the
    kernel-invariant model (:mod:`models.nemotron_h.invariant`): every token's log-prob is
    computed with the same arithmetic, in the same order, as the trainer's
    :func:`cascade_jax.rl.token_logprobs` with ``model=models.nemotron_h.invariant`` computes it
    for the finished row, whatever the slot, the other slots or the row length, so the two are
    equal bit for bit (fp32 and bf16). Cost per token: one cached decode step (linear in the
    response length).

    The slot's distribution is ``logp = log softmax(z / τ)`` by the trainer's chunked
    log-softmax (:func:`cascade_jax.rl.logprobs.invariant_next_logprobs`, ``1/τ`` rounded as the
    trainer's :func:`~cascade_jax.rl.logprobs.inverse_temperature`); a token is drawn from it
    at unit temperature (``τ = 0``: greedy, log-probs of the unscaled logits) and reported with
    ``logp[y]`` itself. No top-p / top-k (a truncated support is not what the trainer's
    log-probs describe): requests with them are refused. ``max_len`` must be a multiple of
    :data:`models.nemotron_h.invariant.KV_BLOCK`. Same arguments as :class:`JaxEngine`, less
    ``model``; ``vocab_chunk`` must be the trainer's."""

    def __init__(self, model_cfg, params, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **kw):
        if "model" in kw:
            raise ValueError("model: the zero-mismatch engine always runs models.nemotron_h.invariant")
        max_len = int(kw.get("max_len", 2048))
        if max_len % invariant.KV_BLOCK:
            raise ValueError(f"max_len: must be a multiple of {invariant.KV_BLOCK} (the invariant "
                             f"attention's key block), got {max_len}")
        self.vocab_chunk = int(vocab_chunk)
        super().__init__(model_cfg, params, model=invariant, **kw)
        self._slots["inv_t"] = jnp.ones(self.num_slots, jnp.float32)

    def submit(self, request, on_done=None):
        sp = request.sampling
        if sp.top_p < 1.0 or (sp.top_k > 0):
            raise ValueError("top_p / top_k: the zero-mismatch engine samples the full "
                             "distribution (top_p = 1, top_k = -1)")
        return super().submit(request, on_done)

    def _admit_impl(self, params, cache, logits, slots_state, tokens, ints, floats, stops):
        Pb = tokens.shape[1]
        lengths, slots = ints[:, 0], ints[:, 1]
        pre = self.model.prefill(params, tokens, self.model_cfg, lengths=lengths, max_len=Pb,
                                 return_routed_experts=self.return_routed_experts)
        temp, inv_t = floats[:, 0], floats[:, 2]  # inv_t: the trainer's 1/τ (see _admit)
        logp = invariant_next_logprobs(params, pre[0], inv_t, vocab_chunk=self.vocab_chunk,
                                       model=self.model)
        # logp holds log softmax(z / τ): drawn at unit temperature (0 = greedy), untruncated
        values = {**self._admitted_state(ints, floats, stops), "temp": jnp.where(temp > 0, 1.0, 0.0),
                  "top_p": jnp.ones_like(temp), "top_k": jnp.full_like(lengths, -1), "inv_t": inv_t}
        return scatter_admitted(cache, logits, slots_state, pre[1], logp, values, slots,
                                pre[2] if self.return_routed_experts else None)

    def _admit(self, params, slots: list):
        # the trainer's 1/τ (rounded from double precision on the host) rides in a third float
        orig = self._admit_fn
        jobs = {s: self._jobs[s] for s in slots}

        def admit_fn(params, cache, logits, st, tokens, ints, floats, stops):
            inv = np.ones((floats.shape[0], 1), np.float32)
            for r in range(floats.shape[0]):
                s = int(ints[r, 1])
                if s in jobs:
                    inv[r, 0] = inverse_temperature(jobs[s].sp.temperature)
            return orig(params, cache, logits, st, tokens, ints,
                        np.concatenate([floats, inv], 1), stops)

        self._admit_fn = admit_fn
        try:
            super()._admit(params, slots)
        finally:
            self._admit_fn = orig

    def _decode_logits(self, params, cache, tokens, positions, st=None):
        out = self.model.decode_step(params, cache, tokens, positions, self.model_cfg,
                                     return_routed_experts=self.return_routed_experts)
        logp = invariant_next_logprobs(params, out[0], st["inv_t"], vocab_chunk=self.vocab_chunk,
                                       model=self.model)
        return (logp,) + tuple(out[1:])

    def _sample(self, z, keys, live, st):
        # z holds log softmax(z / τ): draw at unit temperature (0 = greedy), report logp[y]
        S = z.shape[0]
        ids, _ = sample_tokens(z, keys, jnp.where(live, st["temp"], 0.0), jnp.ones((S,), jnp.float32),
                               jnp.full((S,), -1, jnp.int32))
        return ids, jnp.take_along_axis(z, ids[:, None], -1)[:, 0]

    def warmup(self) -> None:
        orig = self._admit_fn
        self._admit_fn = lambda p, c, l, st, t, i, f, s: orig(
            p, c, l, st, t, i, np.concatenate([f, np.ones((f.shape[0], 1), np.float32)], 1), s)
        try:
            super().warmup()
        finally:
            self._admit_fn = orig
