"""Zero-mismatch generation: every token is sampled from the trainer's own log-probs.

Two modes of the continuous-batching engine (:class:`~cascade_jax.rollout.engine.JaxEngine`'s
scheduling: slots, refill, seeds, streaming, aborts, weight updates), which differ in how a
slot's next-token distribution is computed:

* :class:`ExactEngine` (what the runner and ``launch/serve.py --zero-mismatch`` use): cached
  prefill / decode by the kernel-invariant model (:mod:`models.nemotron_h.invariant`), one
  decode step per token; the trainer recomputes its log-probs with
  ``model=models.nemotron_h.invariant`` (:func:`cascade_jax.rl.token_logprobs`) bit for bit.
* :class:`RowExactEngine`, the row form at the default kernels (and :func:`generate_exact`, a
  call of it): no KV-cache / recurrent decode step; each slot keeps its row of tokens and its
  next-token distribution is :func:`cascade_jax.rl.next_token_logprobs` — the trainer's forward
  and chunked log-softmax over the slot's row at the fixed shape ``[1, row_len]``, with the
  vocabulary sums in a written-out order. The trainer's :func:`cascade_jax.rl.token_logprobs`
  with ``row_len=row_len`` (and the train steps with ``row_len``, inside ``value_and_grad`` too:
  :mod:`cascade_jax.rl.logprobs`, "Why a custom VJP") recompute the very same numbers, so the
  sampling log-prob of every token equals the trainer's bit for bit, whatever the batch sizes on
  either side. Cost: one full forward of ``row_len`` tokens per generated token and slot, i.e.
  about ``row_len`` times the work of a cached decode step (``launch/bench_fidelity.py``).

Both draw a token from ``logp = log softmax(z / τ)`` (``1/τ`` rounded as the trainer's
:func:`~cascade_jax.rl.logprobs.inverse_temperature`) at unit temperature with
:func:`cascade_jax.rollout.sampler.sample_tokens` (``τ = 0``: greedy, log-probs of the unscaled
logits) and report ``logp[y]`` itself. No top-p / top-k (a truncated support is not what the
trainer's log-probs describe): requests with them are refused.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cascade_jax.rl.logprobs import (DEFAULT_VOCAB_CHUNK, inverse_temperature,
                                     invariant_next_logprobs, next_token_logprobs)
from models.nemotron_h import invariant

from .engine import JaxEngine, scatter_admitted
from .sampler import sample_tokens
from .types import Request, SamplingParams, sample_seed

__all__ = ["ExactEngine", "RowExactEngine", "generate_exact"]


class _TrainerLogprobEngine(JaxEngine):
    """What both zero-mismatch modes share (module doc): the slot's next-token "logits" are the
    trainer's ``log softmax(z / τ)`` (the trainer's ``1/τ`` per slot in the slot state
    ``inv_t``, carried to admission as a third float), drawn from at unit temperature (0 =
    greedy) and reported as ``logp[y]``; no top-p / top-k. Subclasses compute the distribution
    (``_admit_impl``, ``_decode_logits``)."""

    def __init__(self, model_cfg, params, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **kw):
        self.vocab_chunk = int(vocab_chunk)
        super().__init__(model_cfg, params, **kw)
        self._slots["inv_t"] = jnp.ones(self.num_slots, jnp.float32)

    def submit(self, request, on_done=None):
        sp = request.sampling
        if sp.top_p < 1.0 or (sp.top_k > 0):
            raise ValueError("top_p / top_k: the zero-mismatch engine samples the full "
                             "distribution (top_p = 1, top_k = -1)")
        return super().submit(request, on_done)

    def _exact_state(self, ints, floats, stops) -> dict:
        """The admitted rows' slot state: as :meth:`JaxEngine._admitted_state`, drawn at unit
        temperature (0 = greedy) untruncated, ``inv_t = floats[:, 2]`` (see :meth:`_admit`)."""
        temp = floats[:, 0]
        return {**self._admitted_state(ints, floats, stops), "temp": jnp.where(temp > 0, 1.0, 0.0),
                "top_p": jnp.ones_like(temp), "top_k": jnp.full_like(ints[:, 0], -1),
                "inv_t": floats[:, 2]}

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


class ExactEngine(_TrainerLogprobEngine):
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
        super().__init__(model_cfg, params, vocab_chunk=vocab_chunk, model=invariant, **kw)

    def _admit_impl(self, params, cache, logits, slots_state, tokens, ints, floats, stops):
        lengths, slots = ints[:, 0], ints[:, 1]
        pre = self.model.prefill(params, tokens, self.model_cfg, lengths=lengths,
                                 max_len=tokens.shape[1],
                                 return_routed_experts=self.return_routed_experts)
        logp = invariant_next_logprobs(params, pre[0], floats[:, 2], vocab_chunk=self.vocab_chunk,
                                       model=self.model)
        return scatter_admitted(cache, logits, slots_state, pre[1], logp,
                                self._exact_state(ints, floats, stops), slots,
                                pre[2] if self.return_routed_experts else None)

    def _decode_logits(self, params, cache, tokens, positions, st=None):
        out = self.model.decode_step(params, cache, tokens, positions, self.model_cfg,
                                     return_routed_experts=self.return_routed_experts)
        logp = invariant_next_logprobs(params, out[0], st["inv_t"], vocab_chunk=self.vocab_chunk,
                                       model=self.model)
        return (logp,) + tuple(out[1:])


class RowExactEngine(_TrainerLogprobEngine):
    """The row form of the zero-mismatch engine (module doc): the default kernels (``model``,
    default :mod:`models.nemotron_h`), each slot's row of ``max_len = row_len`` tokens kept in
    place of a decode cache, and every next-token distribution computed by
    :func:`cascade_jax.rl.next_token_logprobs` over that row alone at ``[1, row_len]``: the
    trainer's :func:`cascade_jax.rl.token_logprobs` with ``row_len`` recomputes the sampling
    log-probs bit for bit. With ``return_routed_experts`` a sample's ``routed_experts [P + R − 1,
    L_moe, K]`` are those of the row forward its last token was drawn from (the trainer's
    unreplayed routing of the row). One device (no ``mesh``); no ``prefill_chunk`` /
    ``keep_sessions``. Otherwise :class:`JaxEngine`'s arguments; ``vocab_chunk`` must be the
    trainer's."""

    def __init__(self, model_cfg, params, *, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, **kw):
        if kw.get("mesh") is not None:
            raise ValueError("mesh: the row-form zero-mismatch engine runs on one device")
        super().__init__(model_cfg, params, vocab_chunk=vocab_chunk, **kw)

    def _new_cache(self):
        """The slots' rows ``[S, row_len]`` int32 (one pseudo-layer ``{"row": ...}``)."""
        return [{"row": jnp.zeros((self.num_slots, self.max_len), jnp.int32)}]

    def _row_logprobs(self, params, rows, lengths, inv_t):
        """``(logp [n, V], experts [n, row_len, L_moe, K] or None)`` of the token following
        ``rows[r, :lengths[r]]``."""
        out = next_token_logprobs(params, rows, lengths, self.model_cfg, inv_temperature=inv_t,
                                  vocab_chunk=self.vocab_chunk, model=self.model,
                                  return_routed_experts=self.return_routed_experts)
        return out if self.return_routed_experts else (out, None)

    def _admit_impl(self, params, cache, logits, slots_state, tokens, ints, floats, stops):
        lengths, slots = ints[:, 0], ints[:, 1]
        rows = jnp.zeros((tokens.shape[0], self.max_len), jnp.int32).at[:, :tokens.shape[1]].set(tokens)
        logp, experts = self._row_logprobs(params, rows, lengths, floats[:, 2])
        return scatter_admitted(cache, logits, slots_state, [{"row": rows}], logp,
                                self._exact_state(ints, floats, stops), slots, experts)

    def _decode_logits(self, params, cache, tokens, positions, st=None):
        rows = cache[0]["row"].at[jnp.arange(self.num_slots), positions].set(tokens)
        logp, experts = self._row_logprobs(params, rows, positions + 1, st["inv_t"])
        return (logp, [{"row": rows}]) + ((experts,) if self.return_routed_experts else ())

    def _record_experts(self, rx, experts, positions, going):
        # the whole row's routing, kept from the last forward of a row that goes on
        return jnp.where(going[:, None, None, None], experts, rx)


def generate_exact(params, cfg, prompts: Sequence[Sequence[int]], *, row_len: int,
                   num_slots: int, max_new_tokens: int, seed: int = 0,
                   seeds: Optional[Sequence[int]] = None, temperature: float = 1.0,
                   stop_token_ids: Sequence[int] = (), return_routed_experts: bool = False,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK, model=None,
                   weight_version: str = "0") -> list:
    """One :class:`~cascade_jax.rollout.types.Sample` per prompt (in order) from a
    :class:`RowExactEngine` of ``num_slots`` slots and rows of ``row_len``: prompt ``i`` is a
    one-sample request seeded ``s_i = seeds[i]``, by default ``sample_seed(seed, i)`` (so ``n``
    copies of a prompt are the ``n`` samples of one request seeded ``seed``), drawing its
    ``t``-th token with the key ``fold_in(key(s_i), t)``. A sample stops at a stop token (kept,
    ``stop``) or after ``max_new_tokens`` (``length``); ``len(prompt) + max_new_tokens <=
    row_len``. The engines are kept per setting (:func:`_row_engine`), so repeated calls
    compile nothing new."""
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
    stops = tuple(int(t) for t in stop_token_ids)
    requests = [Request(prompt_ids=tuple(int(t) for t in p),
                        sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                stop_token_ids=stops, seed=int(s)))
                for p, s in zip(prompts, seeds)]
    dtypes = tuple(str(x.dtype) for x in jax.tree.leaves(params))
    key = (cfg, int(row_len), int(num_slots), int(vocab_chunk), model, bool(return_routed_experts),
           max(8, 1 << (len(stops) - 1).bit_length()), dtypes)
    with _ROW_ENGINES_LOCK:
        eng = _ROW_ENGINES.pop(key, None)
        if eng is None:
            eng = RowExactEngine(cfg, params, num_slots=num_slots, max_len=row_len,
                                 prompt_buckets=(row_len,), max_stop_tokens=key[6], model=model,
                                 vocab_chunk=vocab_chunk, return_routed_experts=return_routed_experts,
                                 weight_version=str(weight_version))
        else:
            eng.update_weights(params, str(weight_version), check_order=False)
        _ROW_ENGINES[key] = eng  # most recently used last
        while len(_ROW_ENGINES) > _ROW_ENGINES_MAX:
            _ROW_ENGINES.pop(next(iter(_ROW_ENGINES)))
        return [g[0] for g in eng.generate(requests).groups]


#: :func:`generate_exact`'s engines by setting (config, sizes, model, dtypes), least recently
#: used first; one call at a time
_ROW_ENGINES: dict = {}
_ROW_ENGINES_MAX = 4
_ROW_ENGINES_LOCK = threading.Lock()
