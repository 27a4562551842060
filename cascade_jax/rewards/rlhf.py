"""``rlhf``: GenRM pairwise preferences over all rollout pairs, aggregated per response.

Grouping: responses sharing ``metadata["group"]`` (default: the same prompt text) are the G
rollouts of one prompt. For every unordered pair (i, j) of a group the judge compares the two
final answers (text after ``</think>``; the reasoning is not shown to the judge) and returns
``o_ij`` in [0, 1] (1 = i better, 0.5 = tie); ``o_ji = 1 - o_ij``. That is C(G, 2) judge calls
per prompt (120 for G = 16), or twice that with ``both_orders`` (each pair judged as (A, B) and
(B, A) and averaged, ``o_ij = (v_AB + 1 - v_BA) / 2``, which cancels position bias).

Special cases: a response without a final answer (unclosed ``<think>``) loses to every response
that has one (``o = 0``) and ties with other such responses, without a judge call; a judge error
or unparseable verdict counts as a tie and is reported in ``metrics["judge_errors"]``.

Aggregation (Nano-v3 style; the exact Nano-v3 constants are not published — **[choice]**):

    w_i = mean_{j != i} o_ij                                   (mean pairwise win rate)
    s_i = w_i - alpha * (L_i - mean(L)) / (std(L) + 1e-6)      (length normalisation, alpha >= 0)
    s_i += beta * (1 - L_i / max(L))   if w_i >= gate         (quality-gated conciseness bonus)
    score_i = clip(s_i, 0, 1)

with ``L_i`` the word count of response i's final answer, ``alpha = length_penalty``,
``beta = conciseness_bonus`` and ``gate = quality_gate``; both adjustments are off by default,
so the score is the plain win rate. A group of one response scores 0.5.
``Score.preferences`` holds ``(j, o_ij)`` for every opponent j (batch indices).

Extra judge fields: keys of ``metadata["judge_fields"]`` (a mapping) are passed to the judge with
every comparison (the tiny synthetic judge reads ``keyword`` from there).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import statistics
from typing import Any, Mapping, Sequence

from cascade_jax.rewards.base import Score, check_batch, final_answer
from cascade_jax.rewards.judges import Judge, RulePairwiseJudge

__all__ = ["GenRMScorer", "aggregate_win_rates"]


def _win_rates(outcomes: Sequence[Sequence[float]]) -> list[float]:
    """Mean pairwise win rate of each response (diagonal ignored); 0.5 for a group of one."""
    n = len(outcomes)
    if n == 1:
        return [0.5]
    return [sum(outcomes[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]


def aggregate_win_rates(outcomes: Sequence[Sequence[float]], lengths: Sequence[float],
                        length_penalty: float = 0.0, conciseness_bonus: float = 0.0,
                        quality_gate: float = 0.5) -> list[float]:
    """Per-response scores from an n x n outcome matrix (diagonal ignored); formulas above."""
    n = len(outcomes)
    if n == 1:
        return [0.5]
    win = _win_rates(outcomes)
    mean_l, std_l, max_l = statistics.fmean(lengths), statistics.pstdev(lengths), max(lengths)
    out = []
    for i in range(n):
        s = win[i]
        if length_penalty:
            s -= length_penalty * (lengths[i] - mean_l) / (std_l + 1e-6)
        if conciseness_bonus and win[i] >= quality_gate and max_l > 0:
            s += conciseness_bonus * (1.0 - lengths[i] / max_l)
        out.append(min(1.0, max(0.0, s)))
    return out


@dataclasses.dataclass
class GenRMScorer:
    """Batch scorer of the ``rlhf`` domain. ``judge`` defaults to the rule-based synthetic
    pairwise judge (tiny preset); pass a :class:`~cascade_jax.rewards.judges.ServedJudge` loaded
    with the ``genrm_pairwise`` prompt for the real GenRM."""

    judge: Judge = dataclasses.field(default_factory=RulePairwiseJudge)
    both_orders: bool = False
    length_penalty: float = 0.0
    conciseness_bonus: float = 0.0
    quality_gate: float = 0.5
    workers: int = 16

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> list[Score]:
        check_batch(prompts, responses, metadata)
        groups: dict[Any, list[int]] = {}
        for i, (p, m) in enumerate(zip(prompts, metadata)):
            groups.setdefault(("group", m["group"]) if "group" in m else ("prompt", p), []).append(i)
        finals = [final_answer(r) for r in responses]
        jobs = []  # (i, j, order) with i < j in batch indices
        for idx in groups.values():
            for i, j in itertools.combinations(idx, 2):
                if finals[i] is not None and finals[j] is not None:
                    jobs.append((i, j, 0))
                    if self.both_orders:
                        jobs.append((i, j, 1))
        results: dict[tuple, tuple[float, int]] = {}
        first_error: dict[int, str] = {}
        if jobs:
            with cf.ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs))),
                                       thread_name_prefix="genrm") as pool:
                futs = {job: pool.submit(self._compare, prompts[job[0]], finals, metadata, job)
                        for job in jobs}
                for job, f in futs.items():
                    v, err = f.result()
                    if err:
                        first_error.setdefault(job[0], err)
                        first_error.setdefault(job[1], err)
                    results[job] = (v, int(bool(err)))
        scores: list[Score | None] = [None] * len(responses)
        for idx in groups.values():
            n = len(idx)
            o = [[0.5] * n for _ in range(n)]
            errors = [0] * n
            for a, b in itertools.combinations(range(n), 2):
                i, j = idx[a], idx[b]
                if finals[i] is None or finals[j] is None:
                    v = 0.5 if finals[i] is None and finals[j] is None else float(finals[j] is None)
                else:
                    v, err = results[(i, j, 0)]
                    if self.both_orders:
                        v2, err2 = results[(i, j, 1)]
                        v, err = (v + v2) / 2, err + err2
                    errors[a] += err
                    errors[b] += err
                o[a][b], o[b][a] = v, 1.0 - v
            lengths = [len((finals[i] or "").split()) for i in idx]
            final_scores = aggregate_win_rates(o, lengths, self.length_penalty,
                                               self.conciseness_bonus, self.quality_gate)
            wins = _win_rates(o)
            for a, i in enumerate(idx):
                win = wins[a]
                prefs = tuple((idx[b], o[a][b]) for b in range(n) if b != a)
                if finals[i] is None:
                    reason = "no final answer (<think> never closed): loses every comparison"
                else:
                    reason = f"mean pairwise win rate {win:.3f} over {n - 1} opponent(s)"
                    if i in first_error:
                        reason += f"; {errors[a]} judge error(s) scored as ties, e.g. {first_error[i]}"
                scores[i] = Score(final_scores[a], reason,
                                  {"win_rate": win, "judge_errors": float(errors[a]),
                                   "length_words": float(lengths[a])}, prefs)
        return scores  # type: ignore[return-value]

    def _compare(self, prompt: str, finals: list, metadata, job) -> tuple[float, str]:
        i, j, order = job
        a, b = (finals[i], finals[j]) if order == 0 else (finals[j], finals[i])
        fields = {**dict(metadata[i].get("judge_fields") or {}), "prompt": prompt,
                  "response_a": a, "response_b": b}
        try:
            v = self.judge(fields).value
        except Exception as e:  # judge transport or parse failure: count it, score as a tie
            return 0.5, f"{type(e).__name__}: {str(e)[:200]}"
        return (v if order == 0 else 1.0 - v), ""
