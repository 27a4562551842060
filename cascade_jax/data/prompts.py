"""RL prompt streams: batches of rendered prompts per domain, with verifier metadata.

::

    it = prompt_batches(config, tokenizer, process_index=0, process_count=1)
    pb = next(it)                       # PromptBatch of P = ceil(batch_prompts * oversample / process_count)
    tokens, lengths, group_ids, domain_ids = pb.expand()   # [P * n, L], each prompt n times
    scores = make_scorer(pb.domains[i])(pb.prompts[i:i+1], responses, pb.metadata[i:i+1])
    state = it.get_state(); it.set_state(state)            # exact resume

Rows of every source are read once (RL prompt sets are small: ~56K rows released), mapped to
canonical rows (:mod:`cascade_jax.data.rows`; a domain is required) and grouped into one pool per
domain; ``data.domains`` restricts the domains (a listed domain without rows is an error). Each
process keeps the pool elements ``p, p+P, ...`` (disjoint shards).

Batch ``k`` of ``B`` prompts draws its per-domain counts ``c_d`` from the domain weights ``w_d``
(``data.domain_weights``; default: proportional to the rows per domain, i.e. the blend of the
data itself) with a generator seeded by ``(shuffle_seed, k)``, as ``data.domain_draw`` says:

- ``multinomial``: ``c ~ Multinomial(B, w)``; a domain of weight 1/6 gets no prompt in a batch of
  8 with probability ``(5/6)^8 = 0.23``.
- ``stratified`` (systematic sampling): with ``u ~ U[0, 1)`` and ``W_d = sum_{e <= d} w_e``,
  ``c_d = floor(B W_d + u) - floor(B W_{d-1} + u)``, so ``c_d`` is ``floor(B w_d)`` or
  ``ceil(B w_d)`` and ``E[c_d] = B w_d`` exactly, as for the multinomial, without its spread.

Each domain serves prompts from its
own permutation of its pool, reshuffled (seed ``(shuffle_seed, domain, epoch)``) at every pass.
Prompts whose rendering is longer than ``rollout.sampling.max_prompt_len`` tokens (or bad rows, with
``data.on_bad_row = "skip"``) are skipped, counted, and replaced by the domain's next prompt;
:meth:`PromptIterator.check` fails early for a domain none of whose prompts fits.
The state is ``(k, per-domain epoch and cursor, counters)``.

``oversample`` (>= 1) draws more prompts than ``batch_prompts`` so that dynamic filtering (drop
groups whose ``n`` rewards are all equal) can still fill a batch; ``n_samples`` =
``rollout.sampling.n_samples`` responses per prompt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cascade_jax import domains as _domains
from cascade_jax.data.chat import ChatTemplateError, render_chat
from cascade_jax.data.rows import BadRow, DataError, map_row
from cascade_jax.data.sources import open_source
from cascade_jax.data.tokenizer import Tokenizer

__all__ = ["PromptBatch", "PromptIterator", "prompt_batches", "load_prompt_rows"]

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """``P`` rendered prompts. Arrays: ``tokens`` [P, L] int32 (right-padded with the pad id,
    ``L = rollout.sampling.max_prompt_len``), ``lengths`` [P] int32, ``domain_ids`` [P] int32
    (:func:`cascade_jax.domains.domain_id`). Per prompt: ``domains`` (names), ``prompts`` (the
    last user message text, for the scorers), ``texts`` (the rendered prompt), ``messages``,
    ``tools``, ``metadata`` (verifier metadata for ``make_scorer(domain)``), ``row_ids``.
    ``n_samples``: responses to draw per prompt; ``step``: the batch index."""

    tokens: np.ndarray
    lengths: np.ndarray
    domain_ids: np.ndarray
    domains: tuple
    prompts: tuple
    texts: tuple
    messages: tuple
    tools: tuple
    metadata: tuple
    row_ids: tuple
    n_samples: int
    step: int

    def __len__(self) -> int:
        return len(self.domains)

    def expand(self):
        """Each prompt ``n_samples`` times (group-major): ``(tokens [P*n, L], lengths [P*n],
        group_ids [P*n], domain_ids [P*n])``; group id = prompt index in this batch."""
        n = self.n_samples
        return (np.repeat(self.tokens, n, axis=0), np.repeat(self.lengths, n),
                np.repeat(np.arange(len(self), dtype=np.int32), n), np.repeat(self.domain_ids, n))


def load_prompt_rows(config, *, process_index: int = 0, process_count: int = 1) -> dict:
    """``{"pools": {domain: [(location, canonical row), ...]}, "bad_rows": n_skipped}`` for this
    process (see module doc)."""
    data = config.data
    wanted = tuple(_domains.check_domain(d) for d in data.domains)
    for d in data.domain_weights:
        _domains.check_domain(d)
    pools: dict[str, list] = {}
    skipped = 0
    for src in data.sources:
        reader = open_source(src, domains=wanted, tiny_rows_per_domain=data.tiny_rows_per_domain,
                             tiny_near_miss_rate=data.tiny_near_miss_rate, seed=data.shuffle_seed)
        for i in range(len(reader)):
            where, row = reader[i]
            try:
                if isinstance(row, BadRow):
                    raise row
                r = map_row(row, src.fields, kind="rl", source_domain=src.domain)
            except BadRow as e:
                if data.on_bad_row == "error":
                    raise DataError(f"{where}: {e}") from None
                skipped += 1
                continue
            if wanted and r["domain"] not in wanted:
                continue
            pools.setdefault(r["domain"], []).append((where, r))
    missing = [d for d in wanted if d not in pools]
    if missing or not pools:
        raise DataError(f"no RL prompts for domain(s) {missing or list(wanted) or 'any'} in "
                        f"data.sources ({', '.join(s.path or s.format for s in data.sources)})")
    out = {}
    for d in sorted(pools, key=_domains.domain_id):
        shard = pools[d][process_index::process_count]
        if not shard:
            raise DataError(f"domain {d}: {len(pools[d])} prompts < {process_count} processes")
        out[d] = shard
    return {"pools": out, "bad_rows": skipped}


class PromptIterator:
    """Infinite iterator of :class:`PromptBatch` with exact :meth:`get_state` / :meth:`set_state`."""

    def __init__(self, config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1):
        data, r = config.data, config.rollout.sampling
        loaded = load_prompt_rows(config, process_index=process_index, process_count=process_count)
        self._pools = loaded["pools"]
        self._domains = list(self._pools)
        w = np.array([float(data.domain_weights.get(d, 0.0)) if data.domain_weights
                      else float(len(self._pools[d])) for d in self._domains])
        if not w.sum() > 0:
            raise DataError(f"data.domain_weights: all weights are 0 for domains {self._domains}")
        self._weights = w / w.sum()
        self.batch_size = math.ceil(data.batch_prompts * data.oversample / process_count)
        self.domain_draw = data.domain_draw
        self.n_samples = r.n_samples
        self.max_prompt_len = r.max_prompt_len
        self.thinking = r.thinking
        self.on_bad_row = data.on_bad_row
        self._seed = int(data.shuffle_seed)
        self._tok = tokenizer
        self._step = 0
        self._cursor = {d: [0, 0] for d in self._domains}  # domain -> [epoch, position]
        self._perm_cache: dict = {}
        self.stats = {"prompts": 0, "overlong": 0, "bad_row": loaded["bad_rows"]}
        self.first_skipped: dict = {}  # reason -> location of the first prompt skipped for it

    @property
    def domains(self) -> list[str]:
        return list(self._domains)

    @property
    def weights(self) -> dict:
        return dict(zip(self._domains, self._weights.tolist()))

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "step": self._step,
                "cursor": {d: list(c) for d, c in self._cursor.items()}, "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"prompt iterator state version {state.get('version')!r} != {_STATE_VERSION}")
        if set(state["cursor"]) != set(self._domains):
            raise ValueError(f"prompt iterator state has domains {sorted(state['cursor'])}, "
                             f"this stream has {sorted(self._domains)}")
        self._step = int(state["step"])
        self._cursor = {d: [int(e), int(p)] for d, (e, p) in state["cursor"].items()}
        self.stats = dict(state["stats"])

    def _perm(self, d: str, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self._domains):
                self._perm_cache.clear()
            rng = np.random.default_rng([self._seed, _domains.domain_id(d), epoch])
            self._perm_cache[key] = rng.permutation(len(self._pools[d]))
        return self._perm_cache[key]

    def _take(self, d: str):
        """Next usable prompt of domain ``d``: ``(where, row, text, ids)``."""
        pool = self._pools[d]
        for _ in range(len(pool) + 1):
            epoch, pos = self._cursor[d]
            where, row = pool[int(self._perm(d, epoch)[pos])]
            self._cursor[d] = [epoch + 1, 0] if pos + 1 == len(pool) else [epoch, pos + 1]
            got = self._render(where, row)
            if got is None:
                continue
            return (where, row, *got)
        raise DataError(f"domain {d}: no prompt of its {len(pool)} fits rollout.sampling.max_prompt_len "
                        f"= {self.max_prompt_len} tokens")

    def _render(self, where: str, row: dict):
        """``(text, ids)`` of a prompt, or ``None`` if it is skipped (bad or too long)."""
        try:
            text, ids, _ = render_chat(self._tok, row["messages"], tools=row["tools"],
                                       thinking=self.thinking, add_generation_prompt=True)
        except ChatTemplateError as e:
            if self.on_bad_row == "error":
                raise DataError(f"{where}: {e}") from None
            self.stats["bad_row"] += 1
            self.first_skipped.setdefault("bad_row", where)
            return None
        if len(ids) > self.max_prompt_len:
            self.stats["overlong"] += 1
            self.first_skipped.setdefault("overlong", f"{where}: {len(ids)} tokens")
            return None
        return text, ids

    def check(self) -> None:
        """Every domain has a prompt that renders within ``rollout.sampling.max_prompt_len`` tokens
        (scanning each pool in its first epoch's order until one fits: one prompt per domain
        for usable data), else a :class:`DataError` naming the domain and the limit -- before a
        run writes anything. The iterator's state is untouched."""
        for d in self._domains:
            pool, longest = self._pools[d], 0
            for j in self._perm(d, 0):
                where, row = pool[int(j)]
                try:
                    n = len(render_chat(self._tok, row["messages"], tools=row["tools"],
                                        thinking=self.thinking, add_generation_prompt=True)[1])
                except ChatTemplateError as e:
                    if self.on_bad_row == "error":
                        raise DataError(f"{where}: {e}") from None
                    continue
                if n <= self.max_prompt_len:
                    break
                longest = max(longest, n)
            else:
                raise DataError(f"domain {d}: none of its {len(pool)} prompts fits "
                                f"rollout.sampling.max_prompt_len = {self.max_prompt_len} tokens (the "
                                f"longest has {longest}); raise rollout.sampling.max_prompt_len")

    def __iter__(self):
        return self

    def __next__(self) -> PromptBatch:
        rng = np.random.default_rng([self._seed, self._step, 0x5EED])
        if self.domain_draw == "stratified":
            edges = np.floor(self.batch_size * np.concatenate([[0.0], np.cumsum(self._weights)])
                             + rng.random())
            edges[-1] = edges[0] + self.batch_size  # the cumulative sum may round below 1
            counts = np.diff(edges).astype(np.int64)
        else:
            counts = rng.multinomial(self.batch_size, self._weights)
        picked = []
        for d, c in zip(self._domains, counts):
            picked += [(d, *self._take(d)) for _ in range(int(c))]
        picked = [picked[i] for i in rng.permutation(len(picked))]  # domains interleaved
        P, L = len(picked), self.max_prompt_len
        tokens = np.full((P, L), self._tok.pad_id, np.int32)
        lengths = np.zeros(P, np.int32)
        for i, (_, _, _, _, ids) in enumerate(picked):
            tokens[i, :len(ids)] = ids
            lengths[i] = len(ids)
        batch = PromptBatch(
            tokens=tokens, lengths=lengths,
            domain_ids=np.array([_domains.domain_id(p[0]) for p in picked], np.int32),
            domains=tuple(p[0] for p in picked),
            prompts=tuple(next((m["content"] for m in reversed(p[2]["messages"]) if m["role"] == "user"), "")
                          for p in picked),
            texts=tuple(p[3] for p in picked), messages=tuple(p[2]["messages"] for p in picked),
            tools=tuple(p[2]["tools"] for p in picked), metadata=tuple(p[2]["metadata"] for p in picked),
            row_ids=tuple(p[2]["id"] or p[1] for p in picked), n_samples=self.n_samples,
            step=self._step)
        self._step += 1
        self.stats["prompts"] += P
        return batch


def prompt_batches(config, tokenizer: Tokenizer, *, process_index: int = 0,
                   process_count: int = 1) -> PromptIterator:
    """RL prompt batches for this process; see the module doc."""
    return PromptIterator(config, tokenizer, process_index=process_index, process_count=process_count)
