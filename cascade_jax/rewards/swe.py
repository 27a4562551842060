"""``swe``: judged agentless repair (SWE agentless RL).

Metadata: ``gold_patch`` (reference fix, unified diff); optional ``issue`` (default: the prompt)
and ``context`` (the localised code shown to the model).

Rules: the candidate patch is taken from the final answer (after ``</think>``): the last
```` ```diff ```` / ```` ```patch ```` block, else Agentless ``<<<<<<< SEARCH / ======= / >>>>>>> REPLACE``
edits (converted to removed/added lines), else a bare unified diff starting at ``diff --git`` or
``--- ``. No patch scores 0. The repair judge rates it in [0, 1]: the paper's GPT-OSS-120B judge
via :class:`~cascade_jax.rewards.judges.ServedJudge` with the ``swe_repair`` prompt (0–10 scale),
or the rule-based :class:`~cascade_jax.rewards.judges.RulePatchJudge` (changed-line F1) for the
tiny preset. ``metrics["above_half"]`` marks scores > 0.5: the stage masks the loss of prompts where
no rollout exceeds 0.5 (docs/algorithms.md §3).

**Agentic SWE RL (OpenHands).** The multi-turn counterpart lives in :mod:`cascade_jax.agentic`
(docs/agentic.md): :class:`cascade_jax.agentic.swe.SWEEnv` runs an OpenHands-style scaffold
(``execute_bash``, ``str_replace_editor``, ``finish``) with tool calls parsed by
:func:`cascade_jax.rewards.tool_call.parse_tool_calls` and tool results in the template's tool
role, each action executed in the bubblewrap sandbox on a per-episode writable copy of the
repository; the reward is 1 iff the task's FAIL_TO_PASS and PASS_TO_PASS tests pass there after
the test patch is applied. :func:`cascade_jax.agentic.swe_tasks.swe_tasks` generates
SWE-bench-format tasks for tests and the tiny preset. Still out of scope: real SWE-Gym
repositories need their own environment (a container image per repository; bubblewrap over the
host's ``/usr`` does not provide their dependencies), and the episodes re-prefill the
conversation every turn (cache reuse needs an engine change). The domain name ``swe`` and this
agentless scorer stay as they are.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

from cascade_jax.rewards.base import NO_ANSWER, Score, final_answer, require
from cascade_jax.rewards.judges import Judge, RulePatchJudge

__all__ = ["SWERepair", "extract_patch"]

_DIFF_FENCE = re.compile(r"```[ \t]*(?:diff|patch)[^\n]*\n(.*?)```", re.S)
_BARE_DIFF = re.compile(r"^(diff --git |--- )", re.M)
_SEARCH_REPLACE = re.compile(r"<<<<<<< SEARCH\n(.*?)\n?=======\n(.*?)\n?>>>>>>> REPLACE", re.S)


def extract_patch(text: str) -> Optional[str]:
    """The candidate patch in ``text`` (rules above), as a unified-diff-like string, or None."""
    fences = _DIFF_FENCE.findall(text)
    if fences:
        return fences[-1]
    edits = _SEARCH_REPLACE.findall(text)
    if edits:
        lines = []
        for search, replace in edits:
            lines += ["-" + ln for ln in search.splitlines()] + ["+" + ln for ln in replace.splitlines()]
        return "\n".join(lines)
    m = _BARE_DIFF.search(text)
    if m:
        return text[m.start():]
    return None


@dataclasses.dataclass
class SWERepair:
    """Pointwise function ``(prompt, response, meta) -> Score`` around a repair judge."""

    judge: Judge = dataclasses.field(default_factory=RulePatchJudge)

    def __call__(self, prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
        gold = str(require(meta, "gold_patch", str))
        final = final_answer(response)
        if final is None:
            return Score(0.0, NO_ANSWER, {"above_half": 0.0})
        patch = extract_patch(final)
        if patch is None or not patch.strip():
            return Score(0.0, "no patch (```diff block, SEARCH/REPLACE edit or unified diff) "
                              "in the final answer", {"above_half": 0.0})
        fields = {"issue": meta.get("issue", prompt), "context": meta.get("context", ""),
                  "gold_patch": gold, "patch": patch}
        try:
            v = self.judge(fields)
        except Exception as e:
            return Score(0.0, f"judge error: {type(e).__name__}: {e}",
                         {"judge_error": 1.0, "above_half": 0.0})
        return Score(v.value, f"repair judge: {v.label} ({v.reason})",
                     {"judge_error": 0.0, "above_half": float(v.value > 0.5)})
