"""``long_context``: judged QA over long inputs.

Metadata: ``answer`` (reference answer); optional ``question`` (the question alone — recommended,
so the judge does not re-read the long context; default: the whole prompt).

Rules: the final answer (after ``</think>``; unclosed ``<think>`` scores 0, empty answer scores 0)
is sent with question and reference to the judge (:class:`~cascade_jax.rewards.judges.ServedJudge`
with the ``long_context_qa`` prompt for the paper's Qwen3-235B judge, or the rule-based
:class:`~cascade_jax.rewards.judges.RuleQAJudge` for the tiny preset); reward = judge value.
A judge failure scores 0 with the error as reason and ``metrics["judge_error"] = 1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from cascade_jax.rewards.base import NO_ANSWER, Score, final_answer, require
from cascade_jax.rewards.judges import Judge, RuleQAJudge

__all__ = ["LongContextQA"]


@dataclasses.dataclass
class LongContextQA:
    """Pointwise function ``(prompt, response, meta) -> Score`` around a QA judge."""

    judge: Judge = dataclasses.field(default_factory=RuleQAJudge)

    def __call__(self, prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
        reference = str(require(meta, "answer", (str, int, float)))
        final = final_answer(response)
        if final is None:
            return Score(0.0, NO_ANSWER)
        if not final:
            return Score(0.0, "empty final answer")
        fields = {"question": meta.get("question", prompt), "reference": reference,
                  "response": final}
        try:
            v = self.judge(fields)
        except Exception as e:
            return Score(0.0, f"judge error: {type(e).__name__}: {e}", {"judge_error": 1.0})
        return Score(v.value, f"judge: {v.label} ({v.reason})", {"judge_error": 0.0})
