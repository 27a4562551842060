"""SFT pipeline: sources -> grain (shuffle, shard, repeat, mix, render + tokenize) -> packed rows.

::

    it = sft_batches(config, tokenizer, process_index=jax.process_index(),
                     process_count=jax.process_count())
    batch = next(it)            # SFTBatch of numpy arrays, each [data.batch_rows // process_count, seq_len]
    state = it.get_state()      # JSON-able dict; store it with the train state
    it.set_state(state)         # (in a new process: a new iterator, then set_state) -> same next batch

Per source ``i`` a grain ``MapDataset``: rows shuffled globally with a seed derived from
``data.shuffle_seed`` (reshuffled every epoch), process ``p`` of ``P`` keeps elements ``p, p+P,
...`` of each epoch's order (disjoint shards that together cover the data), repeated
``data.num_epochs`` times (``None``: forever); several sources are mixed with their weights
(``MapDataset.mix``; with a finite ``num_epochs`` the mixture ends when a source runs out at
its weight). Each element is rendered with the chat template (no generation prompt) and
tokenized; its loss mask covers the assistant tokens (:func:`cascade_jax.data.chat.render_chat`).

Examples longer than ``seq_len`` are dropped or truncated to their first ``seq_len`` tokens
(``data.overlong``); examples without a loss token are dropped; bad rows raise a
:class:`~cascade_jax.data.rows.DataError` naming ``file:line`` or are skipped
(``data.on_bad_row``). All are counted in :attr:`SFTIterator.stats` (the first location of each
kind in :attr:`SFTIterator.first_skipped`); a whole pass over the sources without one usable
example is a :class:`DataError` (it would otherwise loop forever), and
:meth:`SFTIterator.check` draws the first batch up front so bad data fails before a run starts.

Packing (:mod:`cascade_jax.data.packing`): first-fit decreasing over a look-ahead buffer of
``data.pack_buffer`` examples. The iterator state is the next element index, the element indices
in the buffer (re-read and re-tokenized on restore, deterministically) and the counters.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import grain
import numpy as np

from cascade_jax.contract.batch import SFTBatch
from cascade_jax.data import packing
from cascade_jax.data.chat import ChatTemplateError, render_chat
from cascade_jax.data.rows import BadRow, DataError, map_row
from cascade_jax.data.sources import open_source
from cascade_jax.data.tokenizer import Tokenizer

__all__ = ["sft_batches", "SFTIterator", "Example", "Skipped", "example_dataset", "sft_example"]

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized SFT example: ``ids`` [L] int32, ``loss_mask`` [L] float32."""

    ids: np.ndarray
    loss_mask: np.ndarray
    where: str
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An element that yields no example; ``reason`` in ``bad_row | overlong | no_loss_tokens``."""

    where: str
    reason: str
    detail: str = ""


def sft_example(record, tokenizer: Tokenizer, *, fields: dict, seq_len: int, overlong: str,
                on_bad_row: str, source_domain: Optional[str] = None):
    """``(location, raw row)`` -> :class:`Example` or :class:`Skipped` (or raise ``DataError``)."""
    where, row = record
    try:
        if isinstance(row, BadRow):
            raise row
        r = map_row(row, fields, kind="sft", source_domain=source_domain)
        _, ids, mask = render_chat(tokenizer, r["messages"], tools=r["tools"],
                                   add_generation_prompt=False, train_turns=r["train_turns"])
    except (BadRow, ChatTemplateError) as e:
        if on_bad_row == "error":
            raise DataError(f"{where}: {e}") from None
        return Skipped(where, "bad_row", str(e))
    truncated = False
    if len(ids) > seq_len:
        if overlong == "drop":
            return Skipped(where, "overlong", f"{len(ids)} tokens > seq_len {seq_len}")
        ids, mask, truncated = ids[:seq_len], mask[:seq_len], True
    if len(ids) == 0 or not mask[1:].any():
        return Skipped(where, "no_loss_tokens")
    return Example(ids, mask, where, truncated)


def _seed(base: int, i: int) -> int:
    return (int(base) * 1_000_003 + 7919 * i) % (2 ** 32)


def example_dataset(config, tokenizer: Tokenizer, *, process_index: int = 0,
                    process_count: int = 1) -> grain.MapDataset:
    """The grain ``MapDataset`` of :class:`Example` / :class:`Skipped` elements (before packing)."""
    return _examples(config, tokenizer, process_index, process_count)[0]


def _examples(config, tokenizer: Tokenizer, process_index: int, process_count: int):
    """``(dataset, rows per epoch)``: :func:`example_dataset` and the number of elements one
    pass over every source's shard of this process holds."""
    data = config.data
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    parts, weights, epoch = [], [], 0
    for i, src in enumerate(data.sources):
        reader = open_source(src, domains=data.domains, tiny_rows_per_domain=data.tiny_rows_per_domain,
                             tiny_near_miss_rate=data.tiny_near_miss_rate, seed=data.shuffle_seed,
                             thinking=config.rollout.sampling.thinking)
        if len(reader) < process_count:
            raise DataError(f"{src.path or 'tiny'}: {len(reader)} rows < {process_count} processes")
        ds = grain.MapDataset.source(reader).shuffle(seed=_seed(data.shuffle_seed, i))
        ds = ds[process_index::process_count]
        epoch += len(ds)
        ds = ds.repeat(data.num_epochs)
        fn = dict(fields=dict(src.fields), seq_len=data.seq_len, overlong=data.overlong,
                  on_bad_row=data.on_bad_row, source_domain=src.domain)
        parts.append(ds.map(lambda rec, fn=fn: sft_example(rec, tokenizer, **fn)))
        weights.append(src.weight)
    return (parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)), epoch


class SFTIterator:
    """Iterator of packed :class:`~cascade_jax.rl.batch.SFTBatch` (numpy arrays, ``[B, T]``)
    with exact :meth:`get_state` / :meth:`set_state`."""

    def __init__(self, config, tokenizer: Tokenizer, *, process_index: int = 0,
                 process_count: int = 1, rows: Optional[int] = None):
        data = config.data
        self._ds, self._epoch = _examples(config, tokenizer, process_index, process_count)
        self._len = len(self._ds)
        self._finite = data.num_epochs is not None
        self.seq_len = data.seq_len
        if rows is None and data.batch_rows % process_count:
            raise ValueError(f"data.batch_rows {data.batch_rows} is not divisible by "
                             f"{process_count} processes")
        self.rows = rows if rows is not None else data.batch_rows // process_count
        self.buffer_size = data.pack_buffer
        self.pad_id = tokenizer.pad_id
        self._next = 0
        self._buffer: list[tuple[int, Example]] = []
        self.stats = self._zero_stats()
        self.first_skipped: dict = {}  # reason -> location of the first row skipped for it
        self._run = 0  # elements skipped since the last example
        self._window: dict = {}  # their reasons

    @staticmethod
    def _zero_stats() -> dict:
        return {"examples": 0, "bad_row": 0, "overlong": 0, "truncated": 0, "no_loss_tokens": 0,
                "rows": 0, "real_tokens": 0, "slots": 0}

    # ---- state
    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "next": self._next,
                "buffer": [i for i, _ in self._buffer], "stats": dict(self.stats)}

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"SFT iterator state version {state.get('version')!r} != {_STATE_VERSION}")
        buf = []
        for i in state["buffer"]:
            ex = self._ds[int(i)]
            if not isinstance(ex, Example):
                raise ValueError(f"SFT iterator state: buffered element {i} is not an example "
                                 f"(was the config or the data changed?)")
            buf.append((int(i), ex))
        self._next, self._buffer = int(state["next"]), buf
        self.stats = {**self._zero_stats(), **state["stats"]}

    # ---- iteration
    def _fill(self) -> None:
        while len(self._buffer) < self.buffer_size and not (self._finite and self._next >= self._len):
            i = self._next
            ex = self._ds[i]
            self._next += 1
            if isinstance(ex, Skipped):
                self.stats[ex.reason] += 1
                self.first_skipped.setdefault(ex.reason, f"{ex.where}: {ex.detail}" if ex.detail
                                              else ex.where)
                self._run += 1
                self._window[ex.reason] = self._window.get(ex.reason, 0) + 1
                if self._run >= self._epoch:
                    raise DataError(self._nothing_fits())
                continue
            self._run, self._window = 0, {}
            self.stats["examples"] += 1
            self.stats["truncated"] += int(ex.truncated)
            self._buffer.append((i, ex))

    def _nothing_fits(self) -> str:
        st = {k: self._window.get(k, 0) for k in ("overlong", "bad_row", "no_loss_tokens")}
        hint = ("; raise data.seq_len or set data.overlong='truncate'" if st["overlong"] else "")
        return (f"no usable SFT example in a whole pass over data.sources ({self._epoch} rows: "
                f"{st['overlong']} longer than data.seq_len={self.seq_len}, {st['bad_row']} bad, "
                f"{st['no_loss_tokens']} without loss tokens; first: "
                f"{next(iter(self.first_skipped.values()), '-')}){hint}")

    def check(self) -> None:
        """Draw the first batch and rewind (the state is restored exactly), so bad data --
        rows that do not parse, a source with no usable example -- is a :class:`DataError`
        before a run writes anything."""
        state = self.get_state()
        try:
            next(self)
        except StopIteration:
            raise DataError(self._nothing_fits()) from None
        self.set_state(state)
        self._run, self._window = 0, {}

    def _row(self):
        self._fill()
        pick = packing.fill_row([len(ex.ids) for _, ex in self._buffer], self.seq_len)
        chosen = [self._buffer[j][1] for j in pick]
        taken = set(pick)
        self._buffer = [b for j, b in enumerate(self._buffer) if j not in taken]
        self.stats["real_tokens"] += sum(len(ex.ids) for ex in chosen)
        return packing.build_row([(ex.ids, ex.loss_mask) for ex in chosen], self.seq_len, self.pad_id), len(chosen)

    def __iter__(self):
        return self

    def __next__(self):
        rows, n_examples = [], 0
        for _ in range(self.rows):
            row, n = self._row()
            rows.append(row)
            n_examples += n
        if n_examples == 0:
            raise StopIteration
        self.stats["rows"] += self.rows
        self.stats["slots"] += self.rows * self.seq_len
        tokens, positions, segments, mask = (np.stack(x) for x in zip(*rows))
        return SFTBatch(tokens=tokens, positions=positions, segment_ids=segments, loss_mask=mask)

    @property
    def efficiency(self) -> float:
        """Real tokens / slots over the batches so far."""
        return self.stats["real_tokens"] / max(1, self.stats["slots"])


def sft_batches(config, tokenizer: Tokenizer, *, process_index: int = 0, process_count: int = 1,
                rows: Optional[int] = None) -> SFTIterator:
    """Packed SFT batches for this process (``rows`` per batch, default
    ``data.batch_rows // process_count``); see the module doc."""
    return SFTIterator(config, tokenizer, process_index=process_index, process_count=process_count,
                       rows=rows)
