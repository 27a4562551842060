"""Rewards and environments for every cascade domain.

One interface (:mod:`cascade_jax.rewards.base`): a scorer maps ``(prompts, responses, metadata)``
to one :class:`Score` per response (``value`` in [0, 1], ``reason``, ``metrics``; RLHF adds
``preferences``), runs items in parallel and bounds each item's time. Build one per canonical
domain (:mod:`cascade_jax.domains`) with :func:`make_scorer`, or call :func:`score` directly::

    from cascade_jax.rewards import make_scorer
    scores = make_scorer("math")(prompts, responses, [{"answer": "1/2"}, ...])

=====================  ============================================  ===========================
domain                 scorer                                        metadata fields
=====================  ============================================  ===========================
math                   :func:`~.math.score_math`                     answer
instruction_following  :func:`~.instruction_following.score_instruction_following`
                                                                     instruction_id_list, kwargs
mcq                    :func:`~.mcq.score_mcq`                       answer, choices/letters
structured_output      :func:`~.structured.score_structured`         schema, strict
tool_call              :func:`~.tool_call.score_tool_call`           expected_calls, ordered
code                   :class:`~.code.CodeScorer` (sandbox pool)     tests, fn_name, language,
                                                                     limits, expression
rlhf                   :class:`~.rlhf.GenRMScorer` (pairwise)        group, judge_fields
long_context           :class:`~.long_context.LongContextQA` judge   answer, question
swe                    :class:`~.swe.SWERepair` judge                gold_patch, issue, context
=====================  ============================================  ===========================

Judged domains take ``judge=``: a :class:`~.judges.ServedJudge` (SGLang ``/generate``, prompts in
``configs/judges/``) or, by default, the rule-based synthetic judges of the tiny preset.
Tiny learnable environments for every domain (their generators) live with the data in
:mod:`cascade_jax.data.tiny`; these scorers score them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from cascade_jax import domains as _d
from cascade_jax.rewards import sandbox
from cascade_jax.rewards.base import (MetadataError, Pointwise, Score, Scorer, final_answer)
from cascade_jax.rewards.code import CodeScorer, score_code
from cascade_jax.rewards.instruction_following import score_instruction_following
from cascade_jax.rewards.judges import (HttpTransport, Judge, JudgeError, JudgePrompt,
                                        RulePairwiseJudge, RulePatchJudge, RuleQAJudge,
                                        ServedJudge, Transport, Verdict, load_judge_prompt)
from cascade_jax.rewards.long_context import LongContextQA
from cascade_jax.rewards.math import score_math
from cascade_jax.rewards.mcq import score_mcq
from cascade_jax.rewards.rlhf import GenRMScorer, aggregate_win_rates
from cascade_jax.rewards.structured import score_structured
from cascade_jax.rewards.swe import SWERepair
from cascade_jax.rewards.tool_call import format_tool_call, parse_tool_calls, score_tool_call

__all__ = [
    "Score", "Scorer", "Pointwise", "MetadataError", "final_answer", "make_scorer", "score",
    "POINTWISE", "sandbox", "CodeScorer", "GenRMScorer", "LongContextQA", "SWERepair",
    "aggregate_win_rates", "Judge", "Verdict", "JudgeError", "Transport", "HttpTransport",
    "JudgePrompt", "load_judge_prompt", "ServedJudge", "RulePairwiseJudge", "RuleQAJudge",
    "RulePatchJudge", "score_math", "score_mcq", "score_structured", "score_tool_call",
    "score_instruction_following", "score_code", "format_tool_call", "parse_tool_calls",
]

#: Pure per-item scorers of the rule-verified domains.
POINTWISE = {
    _d.MATH: score_math,
    _d.INSTRUCTION_FOLLOWING: score_instruction_following,
    _d.MCQ: score_mcq,
    _d.STRUCTURED_OUTPUT: score_structured,
    _d.TOOL_CALL: score_tool_call,
}


def make_scorer(domain: str, *, judge: Optional[Judge] = None, workers: Optional[int] = None,
                timeout_s: float = 60.0, **options: Any) -> Scorer:
    """The batch scorer of ``domain``.

    ``workers``: threads (default 8; ``math`` 1, see :mod:`~.math`; ``code`` the CPU count).
    ``timeout_s``: per-item limit of pointwise scorers (code runs are bounded by their sandbox
    limits instead). ``judge``: for ``rlhf``/``long_context``/``swe`` (default: rule-based
    synthetic judge). ``options`` go to :class:`CodeScorer` or :class:`GenRMScorer` (e.g.
    ``both_orders=True``, ``length_penalty=0.1``)."""
    _d.check_domain(domain)
    if domain == _d.CODE:
        return CodeScorer(**({"workers": workers} if workers else {}), **options)
    if domain == _d.RLHF:
        return GenRMScorer(judge=judge or RulePairwiseJudge(), workers=workers or 16, **options)
    if options:
        raise TypeError(f"make_scorer({domain!r}): unexpected options {sorted(options)}")
    if domain == _d.LONG_CONTEXT:
        fn = LongContextQA(judge or RuleQAJudge())
    elif domain == _d.SWE:
        fn = SWERepair(judge or RulePatchJudge())
    else:
        if judge is not None:
            raise TypeError(f"domain {domain!r} is rule-verified and takes no judge")
        fn = POINTWISE[domain]
    default_workers = 1 if domain == _d.MATH else 8  # math: main-thread timeouts (math.py)
    return Pointwise(fn, workers=workers or default_workers, timeout_s=timeout_s, name=domain)


def score(domain: str, prompts: Sequence[str], responses: Sequence[str],
          metadata: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[Score]:
    """``make_scorer(domain, **kwargs)(prompts, responses, metadata)``."""
    return make_scorer(domain, **kwargs)(prompts, responses, metadata)
