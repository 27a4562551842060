"""Sequence packing: examples of different lengths into rows of ``seq_len`` token slots.

Algorithm (streaming, deterministic): keep a look-ahead buffer of up to ``K`` examples in arrival
order; to build a row, walk the buffer by decreasing length (ties: earlier arrival first) and put
every example that still fits into the row (first-fit decreasing, one bin at a time); the chosen
examples leave the buffer, which is refilled from the stream before the next row. The largest
buffered example always opens a row (it fits an empty one), so long examples never starve; short
ones fill the gaps. Efficiency = real tokens / (rows * seq_len).

Baseline (:func:`greedy_in_order`): next-fit in arrival order (close the row when the next example
does not fit), the usual "concatenate until full" packer without splitting examples.

Row layout (:func:`build_row`), all ``[seq_len]``: ``tokens`` (pad id on padding), ``positions``
(0 at each segment start, +1 per token; 0 on padding), ``segment_ids`` (1, 2, ... per example in
row order; 0 on padding) and ``loss_mask`` (the example's assistant mask; 0 on each segment's
first token, which has no prefix, and on padding).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["fill_row", "greedy_in_order", "ffd_stream", "build_row", "efficiency"]


def fill_row(lengths: Sequence[int], capacity: int) -> list[int]:
    """Indices (into ``lengths``, in the order chosen) of the examples first-fit-decreasing puts in
    one row of ``capacity`` slots. ``lengths`` are in arrival order; every length must be
    ``<= capacity``.

    Walking the examples by decreasing length and taking each one that fits equals repeatedly
    taking the longest remaining example that fits (all skipped ones are longer than the room
    left), found by binary search: O(K log K) per row for a buffer of K.
    """
    lens = np.asarray(lengths, np.int64)
    if len(lens) == 0:
        return []
    order = np.lexsort((np.arange(len(lens)), -lens))  # decreasing length, then arrival
    neg = -lens[order]  # ascending
    chosen, room, j = [], int(capacity), 0
    while j < len(order):
        j = max(j, int(np.searchsorted(neg, -room, side="left")))  # first with length <= room
        if j >= len(order):
            break
        chosen.append(int(order[j]))
        room -= int(lens[order[j]])
        j += 1
    return chosen


def ffd_stream(lengths: Sequence[int], capacity: int, buffer: int) -> list[list[int]]:
    """Rows (lists of example indices) of the streaming look-ahead packer over ``lengths``."""
    rows, pending, nxt = [], [], 0
    while pending or nxt < len(lengths):
        while len(pending) < buffer and nxt < len(lengths):
            pending.append(nxt)
            nxt += 1
        pick = fill_row([lengths[i] for i in pending], capacity)
        rows.append([pending[j] for j in pick])
        taken = set(pick)
        pending = [p for j, p in enumerate(pending) if j not in taken]
    return rows


def greedy_in_order(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Baseline: next-fit in arrival order."""
    rows, cur, room = [], [], capacity
    for i, n in enumerate(lengths):
        if n > room and cur:
            rows.append(cur)
            cur, room = [], capacity
        cur.append(i)
        room -= n
    if cur:
        rows.append(cur)
    return rows


def efficiency(rows: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> float:
    """Real tokens / slots."""
    return float(sum(lengths[i] for r in rows for i in r)) / max(1, len(rows) * capacity)


def build_row(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int):
    """One packed row from ``[(ids [L_k], loss_mask [L_k]), ...]`` (``sum L_k <= seq_len``).
    Returns ``(tokens, positions, segment_ids, loss_mask)``, each ``[seq_len]``."""
    tokens = np.full(seq_len, pad_id, np.int32)
    positions = np.zeros(seq_len, np.int32)
    segments = np.zeros(seq_len, np.int32)
    mask = np.zeros(seq_len, np.float32)
    t = 0
    for k, (ids, m) in enumerate(examples):
        n = len(ids)
        if t + n > seq_len:
            raise ValueError(f"examples need {t + n} slots > seq_len {seq_len}")
        tokens[t:t + n] = ids
        positions[t:t + n] = np.arange(n, dtype=np.int32)
        segments[t:t + n] = k + 1
        mask[t:t + n] = m
        mask[t] = 0.0
        t += n
    return tokens, positions, segments, mask
