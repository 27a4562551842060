"""``math``: final-answer equivalence with ``math-verify``.

Metadata: ``answer`` (str or number) — the gold final answer, LaTeX or plain.

Rules, in order (reward is binary):
1. Only the final answer (after ``</think>``) is graded; an unclosed ``<think>`` scores 0.
2. Hedging is rejected: two or more ``\\boxed{…}`` with different contents score 0.
3. The prediction is extracted by ``math_verify.parse`` (boxed answers take priority, else the
   last LaTeX/plain expression, e.g. "the answer is 1/2"); nothing extracted scores 0.
4. Reward 1 iff ``math_verify.verify(gold, prediction)`` (symbolic/numeric equivalence).

Time bounds: adversarial answers (``\\boxed{9^{9^{9^9}}}``) can make sympy run for ever.
math-verify's timeouts use ``SIGALRM``, which only works in the main thread, so
``make_scorer("math")`` scores sequentially in the calling thread (the work is CPU-bound Python,
threads would not speed it up) and each parse/verify is cut at ``TIMEOUT_S`` there; called from
another thread, only the :class:`~cascade_jax.rewards.base.Pointwise` per-item timeout applies.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from cascade_jax.rewards.base import NO_ANSWER, Score, final_answer, require

__all__ = ["score_math", "boxed_contents", "TIMEOUT_S"]

TIMEOUT_S = 5  # seconds per math-verify parse/verify call (main thread only)

logging.getLogger("math_verify").setLevel(logging.ERROR)


def boxed_contents(text: str) -> list[str]:
    """Contents of every top-level ``\\boxed{…}`` / ``\\fbox{…}`` in ``text`` (brace-matched)."""
    out = []
    for macro in ("\\boxed", "\\fbox"):
        start = 0
        while True:
            i = text.find(macro, start)
            if i < 0:
                break
            j = i + len(macro)
            while j < len(text) and text[j] == " ":
                j += 1
            if j >= len(text) or text[j] != "{":
                start = j
                continue
            depth, k = 0, j
            while k < len(text):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            out.append(text[j + 1:k].strip())
            start = k + 1
    return out


def score_math(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    from math_verify import parse, verify

    gold_raw = str(require(meta, "answer", (str, int, float)))
    t = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER)
    boxes = boxed_contents(final)
    if len({b.replace(" ", "") for b in boxes}) > 1:
        return Score(0.0, f"multiple different boxed answers: {boxes[:4]}")
    gold = parse(f"\\boxed{{{gold_raw}}}", parsing_timeout=t)
    if not gold:
        gold = parse(gold_raw, parsing_timeout=t)
    if not gold:
        raise ValueError(f"gold answer {gold_raw!r} could not be parsed by math-verify")
    pred = parse(final, parsing_timeout=t)
    if not pred:
        return Score(0.0, "no final answer could be extracted")
    shown = str(pred[-1])[:80]
    if verify(gold, pred, timeout_seconds=t):
        return Score(1.0, f"answer {shown!r} matches gold {gold_raw!r}")
    return Score(0.0, f"answer {shown!r} does not match gold {gold_raw!r}")
