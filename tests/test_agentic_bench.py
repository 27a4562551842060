"""launch/bench_agentic.py: the default (SWE) run fits its first prompts and reports finite
ratios; a context too short for the first prompt is a one-line error naming ``--max-len``
(it was a ZeroDivisionError: every episode ended before its first turn, nothing was sampled)."""

import math

import pytest

from cascade_jax.agentic.lookup import LookupEnv, lookup_tasks
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.agentic.swe import SWEEnv
from cascade_jax.agentic.swe_tasks import swe_tasks
from cascade_jax.data.tokenizer import tiny_tokenizer
from launch import bench_agentic


def test_default_contexts_fit_the_first_prompts():
    r = ChatRenderer(tiny_tokenizer())
    for env, make_env, tasks in (("swe", SWEEnv, swe_tasks(8)), ("lookup", LookupEnv, lookup_tasks(8))):
        longest = max(bench_agentic.first_prompt_len(make_env, t, r) for t in tasks)
        # the default --max-new-tokens (32) and at least one more turn's worth of room
        assert longest + 2 * 32 <= bench_agentic.DEFAULT_MAX_LEN[env], (env, longest)
    assert bench_agentic.first_prompt_len(SWEEnv, swe_tasks(1)[0], r) > 1024  # why swe needs 2048


def test_too_short_context_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"--max-len: 1024 tokens leave no room for a first turn "
                                         r"\(longest first prompt \d+"):
        bench_agentic.main(["--env", "swe", "--episodes", "2", "--max-len", "1024"])


@pytest.mark.slow
def test_default_swe_bench_runs():
    out = bench_agentic.main(["--episodes", "2", "--slots", "2", "--tool-workers", "2",
                              "--max-new-tokens", "8", "--max-turns", "2"])
    assert out["env"] == "swe"
    for mode in ("concurrent", "sequential"):
        assert out[mode]["episodes"] == 2 and out[mode]["sampled_tokens"] > 0
    for k in ("speedup_vs_sequential", "multi_vs_single_turn_throughput"):
        assert math.isfinite(out[k]) and out[k] > 0, k
