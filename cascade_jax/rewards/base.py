"""The one reward interface shared by every domain.

A scorer is any callable with the signature

    scorer(prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping]) -> list[Score]

returning one :class:`Score` per response, in order: ``value`` in [0, 1], a human-readable
``reason`` and optional numeric ``metrics`` (e.g. the fraction of tests passed). Pairwise domains
(RLHF) return the same per-response scores after aggregating preferences; their raw pairwise
outcomes travel in ``Score.preferences``.

Most domains are pointwise: a pure function ``score_one(prompt, response, meta) -> Score``
wrapped by :class:`Pointwise`, which runs items on a thread pool with a per-item timeout (a
timed-out item scores 0 with reason ``"timeout ..."``; Python threads cannot be killed, so the
scorer functions themselves must be bounded — sandbox runs and HTTP calls carry their own limits).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import time
import traceback
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

__all__ = [
    "Score", "Scorer", "Pointwise", "MetadataError", "require", "final_answer", "check_batch",
    "NO_ANSWER", "values_match",
]


class MetadataError(ValueError):
    """A metadata row lacks a field or has a wrong type: a data bug, raised (never scored 0)."""


def require(meta: Mapping[str, Any], key: str, types: type | tuple = object) -> Any:
    """``meta[key]`` checked against ``types``; raises :class:`MetadataError` naming the field."""
    if key not in meta:
        raise MetadataError(f"missing field {key!r} (present: {sorted(meta)})")
    v = meta[key]
    if not isinstance(v, types):
        want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise MetadataError(f"field {key!r}: expected {want}, got {type(v).__name__}")
    return v


@dataclasses.dataclass(frozen=True)
class Score:
    """Reward of one response. ``value`` is in [0, 1]."""

    value: float
    reason: str
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    preferences: tuple = ()  # RLHF: ((other_index, outcome in {1, 0.5, 0}), ...)

    def __post_init__(self):
        if not (0.0 <= float(self.value) <= 1.0):
            raise ValueError(f"Score.value must lie in [0, 1], got {self.value!r} ({self.reason})")


class Scorer(Protocol):
    """``(prompts, responses, metadata) -> list[Score]``, one per response."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[Score]: ...


def check_batch(prompts: Sequence[str], responses: Sequence[str],
                metadata: Sequence[Mapping[str, Any]]) -> None:
    """Raise ``ValueError`` naming the mismatch when the three sequences differ in length or a
    metadata row is not a mapping."""
    if not (len(prompts) == len(responses) == len(metadata)):
        raise ValueError(f"batch length mismatch: {len(prompts)} prompts, {len(responses)} "
                         f"responses, {len(metadata)} metadata rows")
    for i, m in enumerate(metadata):
        if not isinstance(m, Mapping):
            raise ValueError(f"metadata[{i}]: expected a mapping, got {type(m).__name__}")


_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def final_answer(response: str) -> Optional[str]:
    """The part of a response that is graded: the text after the last ``</think>``.

    Rules (chat template, docs/algorithms.md §9): a response in thinking mode is
    ``reasoning </think> answer``; a non-thinking one is ``<think></think>answer`` or plain text.
    Returns ``None`` when a ``<think>`` block was opened but never closed (the model never left its
    reasoning, e.g. truncated) — such a response has no answer and scores 0. Anything inside the
    reasoning is ignored, so an answer hidden in the reasoning does not count.
    """
    if _THINK_CLOSE in response:
        return response.rsplit(_THINK_CLOSE, 1)[1].strip()
    if _THINK_OPEN in response:
        return None
    return response.strip()


NO_ANSWER = "no final answer: <think> block never closed"


@dataclasses.dataclass
class Pointwise:
    """Wrap ``fn(prompt, response, meta) -> Score`` into a parallel batch :class:`Scorer`.

    ``workers`` threads score items concurrently; each item gets ``timeout_s`` seconds (measured
    from the moment the batch is submitted plus its queueing share) before it is scored 0 with a
    timeout reason. An exception inside ``fn`` scores 0 with the exception text as reason (the
    traceback tail is kept so nothing is lost).
    """

    fn: Callable[[str, str, Mapping[str, Any]], Score]
    workers: int = 8
    timeout_s: float = 60.0
    name: str = ""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[Score]:
        check_batch(prompts, responses, metadata)
        n = len(responses)
        if n == 0:
            return []
        if self.workers <= 1:
            return [self._safe(prompts[i], responses[i], metadata[i], i) for i in range(n)]
        pool = cf.ThreadPoolExecutor(max_workers=min(self.workers, n),
                                     thread_name_prefix=f"score-{self.name or 'pointwise'}")
        try:
            futures = [pool.submit(self._safe, prompts[i], responses[i], metadata[i], i)
                       for i in range(n)]
            # item i may wait for earlier ones; its budget starts when a worker could take it
            rounds = lambda i: 1 + i // max(1, min(self.workers, n))  # noqa: E731
            start = time.monotonic()
            out = []
            for i, fut in enumerate(futures):
                remaining = start + self.timeout_s * rounds(i) - time.monotonic()
                try:
                    out.append(fut.result(timeout=max(remaining, 0.0)))
                except cf.TimeoutError:
                    fut.cancel()
                    out.append(Score(0.0, f"timeout: scoring exceeded {self.timeout_s}s",
                                     {"timeout": 1.0}))
            return out
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _safe(self, prompt: str, response: str, meta: Mapping[str, Any], i: int) -> Score:
        try:
            s = self.fn(prompt, response, meta)
        except MetadataError as e:
            raise MetadataError(f"metadata[{i}]: {e}") from e
        except Exception as e:  # a scorer bug or bad metadata must not kill the batch
            tb = traceback.format_exc(limit=3).strip().splitlines()
            return Score(0.0, f"error scoring item {i}: {type(e).__name__}: {e} "
                              f"[{' | '.join(tb[-3:])}]", {"error": 1.0})
        if not isinstance(s, Score):
            raise TypeError(f"{self.name or self.fn}: expected Score, got {type(s).__name__}")
        return s


def values_match(got: Any, expected: Any, tol: float = 1e-6) -> bool:
    """Equality of JSON values, lists == tuples, numbers within ``tol`` (bools stay bools)."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return type(got) is type(expected) and got == expected
    if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(got, float) or isinstance(expected, float):
            if math.isnan(got) or math.isnan(expected):
                return False
            return abs(got - expected) <= tol or abs(got - expected) <= tol * abs(expected)
        return got == expected
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(values_match(x, y, tol)
                                                 for x, y in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(values_match(got[k], expected[k], tol)
                                                     for k in got)
    return got == expected
