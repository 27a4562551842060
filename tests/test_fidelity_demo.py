"""The GRPO rollout-fidelity demonstration (launch/bench_fidelity.py) end to end: with bf16
rollouts from a perturbed router the default mode shows a log-prob and routing mismatch; routing
replay makes the trainer use exactly the rollout's experts; zero-mismatch mode makes every
train-step IS ratio exactly 1. Slow (compiles three train steps)."""

import pytest

from launch import bench_fidelity


@pytest.mark.slow
def test_mismatch_metrics_fall_to_zero_with_the_options_on():
    """Response lengths 8 and 64 (bf16 rows of 64+ tokens are where the gradient program's
    forward used to differ from the sampler's)."""
    out = bench_fidelity.main(["--steps", "1", "--response-lens", "8,64"])["lengths"]
    assert sorted(out) == ["64", "8"]
    for r in (out[k]["modes"] for k in out):
        d, rr, zm = (r[m]["steps"][0] for m in ("default", "routing_replay", "zero_mismatch"))
        assert d["mismatch_abs_max"] > 0 and d["routing_used_token_diff_frac"] > 0
        assert rr["routing_used_token_diff_frac"] == 0.0 and rr["routing_token_diff_frac"] > 0
        assert zm["mismatch_abs_max"] == 0.0 and zm["mismatch_exact_frac"] == 1.0
        assert zm["is_abs_delta_max"] == 0.0 and zm["routing_used_token_diff_frac"] == 0.0
        assert r["default"]["generate_ratio_to_default"] == 1.0
