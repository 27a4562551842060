"""Scan over repeated layer groups, so a deep hybrid stack compiles one body per distinct group.

The pattern is split into segments ``(start, unit, repeats)`` that cover it in order; a segment
with ``repeats > 1`` runs as one ``lax.scan`` over the unit's parameters stacked along a new
leading axis, the others as plain layers. The split minimises the number of layer bodies the
compiler sees (``Σ len(unit)``; ties: fewer segments), e.g. nano-30b-a3b's 52 layers
``MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME`` need 14 bodies instead of 52.

The scan computes exactly the layer loop's arithmetic (same ops per layer, same order), so the
forward is numerically equal to the loop; only the parameters are stacked per segment (one
copy of each scanned layer's compute weights, which the loop does not make).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

__all__ = ["layer_groups", "run_layers"]


@functools.lru_cache(maxsize=64)
def layer_groups(pattern: str) -> tuple:
    """Segments ``((start, unit, repeats), ...)`` covering ``pattern`` in order (see module)."""
    n = len(pattern)
    best = [(0, 0)] * (n + 1)  # (bodies, segments) to cover pattern[i:]
    choice: list = [None] * (n + 1)
    for i in range(n - 1, -1, -1):
        cands = []
        for length in range(1, n - i + 1):
            unit = pattern[i:i + length]
            reps = 1
            while pattern[i + reps * length:i + (reps + 1) * length] == unit:
                reps += 1
            for r in range(1, reps + 1):
                if r == 1 and length > 1:
                    continue  # an unrepeated run is just single layers
                tail = best[i + r * length]
                cands.append(((length + tail[0], 1 + tail[1]), (unit, r)))
        best[i], choice[i] = min(cands, key=lambda c: c[0])
    out, i = [], 0
    while i < n:
        unit, r = choice[i]
        out.append((i, unit, r))
        i += len(unit) * r
    return tuple(out)


def run_layers(layer: Callable, layers: Sequence, h, pattern: str, *, xs: Optional[Sequence] = None,
               scan: bool = True, remat: Optional[Callable] = None):
    """Apply ``layer(kind, lp, h, x) -> (h, y)`` for every layer of ``pattern`` in order.

    ``layers``: the per-layer parameter dicts; ``xs``: optional per-layer inputs (a pytree or
    None each); returns ``(h, ys)`` with ``ys`` the per-layer outputs in pattern order.
    ``scan``: scan repeated groups (else a plain loop); ``remat``: wraps each layer (loop) or
    each group body (scan), e.g. ``functools.partial(jax.checkpoint, policy=...)``."""
    n = len(pattern)
    xs = [None] * n if xs is None else list(xs)
    ys: list = [None] * n
    wrap = remat or (lambda f: f)
    segments = layer_groups(pattern) if scan else tuple((i, k, 1) for i, k in enumerate(pattern))
    for start, unit, reps in segments:
        if reps == 1:
            for j, kind in enumerate(unit):
                i = start + j
                h, ys[i] = wrap(functools.partial(layer, kind))(layers[i], h, xs[i])
            continue
        width = len(unit)
        idx = [[start + rep * width + j for j in range(width)] for rep in range(reps)]
        stack = lambda *t: jnp.stack(t)
        params = [jax.tree.map(stack, *[layers[row[j]] for row in idx]) for j in range(width)]
        inputs = [None if xs[idx[0][j]] is None else jax.tree.map(stack, *[xs[row[j]] for row in idx])
                  for j in range(width)]

        def body(h, per, unit=unit):
            outs = []
            for j, kind in enumerate(unit):
                h, y = layer(kind, per[0][j], h, per[1][j])
                outs.append(y)
            return h, outs

        h, outs = jax.lax.scan(wrap(body), h, (params, inputs))
        for j in range(width):
            for rep, row in enumerate(idx):
                ys[row[j]] = None if outs[j] is None else jax.tree.map(lambda a, rep=rep: a[rep], outs[j])
    return h, ys
