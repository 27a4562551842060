"""The packer on hand-built Rollouts: every field of the padded and packed layouts checked by
hand; both layouts give the same trainer log-probs per response token (fp32, 1e-5); teacher
log-probs are ``None`` unless given; bad inputs name the field; the mismatch helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax.rl as rl
from cascade_jax import domains
from cascade_jax.rollout import Request, Rollouts, Sample, SamplingParams
from cascade_jax.rollout.packing import pack_rollouts


def S(prompt, resp, lp, reason="stop", version="5"):
    return Sample(prompt_ids=np.asarray(prompt, np.int32), response_ids=np.asarray(resp, np.int32),
                  logprobs=np.asarray(lp, np.float32), finish_reason=reason, weight_version=version)


def rollouts():
    r0 = Request(prompt_ids=(1, 2, 3), sampling=SamplingParams(n=2), domain="math")
    r1 = Request(prompt_ids=(4, 5), domain=None)
    g0 = (S([1, 2, 3], [7, 8], [-0.1, -0.2]), S([1, 2, 3], [9], [-0.3], "length"))
    g1 = (S([4, 5], [6, 6, 2], [-0.4, -0.5, -0.6], "abort", "6"),)
    return Rollouts(requests=(r0, r1), groups=(g0, g1))


def test_padded_layout_by_hand():
    b = pack_rollouts(rollouts(), [1.0, 0.0, 0.5], pad_multiple=4, group_offset=10)
    assert b.tokens.shape == (3, 8) and b.seq_index is None and b.teacher_logp is None
    np.testing.assert_array_equal(b.tokens, [[1, 2, 3, 7, 8, 0, 0, 0], [1, 2, 3, 9, 0, 0, 0, 0],
                                             [4, 5, 6, 6, 2, 0, 0, 0]])
    np.testing.assert_array_equal(b.segment_ids, [[1] * 5 + [0] * 3, [1] * 4 + [0] * 4, [1] * 5 + [0] * 3])
    np.testing.assert_array_equal(b.loss_mask, [[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0],
                                                [0, 0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_allclose(b.rollout_logp[0], [0, 0, 0, -0.1, -0.2, 0, 0, 0])
    np.testing.assert_allclose(b.rollout_logp[2], [0, 0, -0.4, -0.5, -0.6, 0, 0, 0])
    np.testing.assert_array_equal(b.positions[1], np.arange(8))
    np.testing.assert_array_equal(b.group_ids, [10, 10, 11])
    np.testing.assert_array_equal(b.finish_reason, [rl.FINISH_STOP, rl.FINISH_LENGTH, rl.FINISH_ABORT])
    np.testing.assert_array_equal(b.domain_ids, [domains.domain_id("math")] * 2 + [-1])
    np.testing.assert_array_equal(b.policy_version, [5, 5, 6])
    np.testing.assert_allclose(b.rewards, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(rl.response_lengths(b), [2, 1, 3])


def test_packed_layout_by_hand_with_teacher():
    teacher = [np.asarray([-1.0, -2.0]), np.asarray([-3.0]), np.asarray([-4.0, -5.0, -6.0])]
    b = pack_rollouts(rollouts(), [1.0, 0.0, 0.5], teacher_logp=teacher, layout="packed",
                      seq_len=10, num_rows=3)
    assert b.tokens.shape == (3, 10)
    # sample 0 (5 tokens) and 1 (4 tokens) share row 0; sample 2 (5 tokens) starts row 1
    np.testing.assert_array_equal(b.tokens[0], [1, 2, 3, 7, 8, 1, 2, 3, 9, 0])
    np.testing.assert_array_equal(b.segment_ids[0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(b.seq_index[0, :9], [0] * 5 + [1] * 4)
    np.testing.assert_array_equal(b.tokens[1, :5], [4, 5, 6, 6, 2])
    np.testing.assert_array_equal(b.seq_index[1, :5], [2] * 5)
    np.testing.assert_array_equal(b.segment_ids[2], 0)  # empty padding row
    np.testing.assert_allclose(b.teacher_logp[0], [0, 0, 0, -1, -2, 0, 0, 0, -3, 0])
    np.testing.assert_allclose(b.teacher_logp[1, :5], [0, 0, -4, -5, -6])
    np.testing.assert_allclose(rl.response_lengths(b), [2, 1, 3])


def test_layouts_agree_under_the_trainer(tiny_cfg, tiny_params):
    cfg = tiny_cfg(pattern="M*", vocab_size=16)
    params = tiny_params(cfg)
    ro = rollouts()
    padded = pack_rollouts(ro, np.zeros(3), pad_multiple=8)
    packed = pack_rollouts(ro, np.zeros(3), layout="packed", seq_len=16)
    lp = jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg)[0])
    a, c = np.asarray(lp(params, padded)), np.asarray(lp(params, packed))
    for n in range(3):
        want = a[n][np.asarray(padded.loss_mask[n]) > 0]
        got = c[(np.asarray(packed.seq_index) == n) & (np.asarray(packed.loss_mask) > 0)]
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kw,field", [
    (dict(rewards=[1.0, 2.0]), "rewards"),
    (dict(teacher_logp=[np.zeros(2), None, np.zeros(3)]), r"teacher_logp\[1\]"),
    (dict(teacher_logp=[np.zeros(2), np.zeros(2), np.zeros(3)]), r"teacher_logp\[1\]"),
    (dict(layout="packed"), "seq_len"),
    (dict(layout="packed", seq_len=4), "seq_len"),
    (dict(layout="packed", seq_len=5, num_rows=2), "num_rows"),
    (dict(layout="ragged"), "layout"),
])
def test_bad_inputs_name_the_field(kw, field):
    kw = {"rewards": [0.0, 0.0, 0.0], **kw}
    with pytest.raises(ValueError, match=field):
        pack_rollouts(rollouts(), kw.pop("rewards"), **kw)


def test_non_integer_versions_and_mismatch_helper():
    ro = rollouts()
    g = (tuple(s.__class__(**{**s.__dict__, "weight_version": "ckpt-a"}) for s in ro.groups[0]), ro.groups[1])
    assert pack_rollouts(Rollouts(ro.requests, g), np.zeros(3)).policy_version is None
    m = rl.logprob_mismatch(jnp.asarray([[5.0, -1.5, -1.75]]), jnp.asarray([[0.0, -1.0, -2.0]]),
                            jnp.asarray([[0, 1, 1]]))  # (train, rollout, mask)
    assert {k: float(v) for k, v in m.items()} == {
        "mismatch_abs_max": 0.5, "mismatch_abs_mean": 0.375, "mismatch_exact_frac": 0.0,
        "mismatch_out_of_band": 0.0}


def test_routed_experts_by_hand_padded_and_packed():
    """Samples with ``routed_experts [P + R - 1, L, K]`` fill ``RLBatch.routed_experts`` at their
    columns (-1 elsewhere, and for a sample without them); none at all: ``None``."""
    import dataclasses

    ro = rollouts()
    rx = lambda n, v: np.full((n, 2, 1), v, np.int32)  # noqa: E731 - L = 2 layers, K = 1
    g0 = (dataclasses.replace(ro.groups[0][0], routed_experts=rx(4, 1)),
          dataclasses.replace(ro.groups[0][1], routed_experts=rx(3, 2)))
    ro = Rollouts(requests=ro.requests, groups=(g0, ro.groups[1]))  # sample 2 has none
    assert pack_rollouts(rollouts(), [0.0] * 3).routed_experts is None
    b = pack_rollouts(ro, [0.0] * 3, pad_multiple=4, num_experts=4)
    np.testing.assert_array_equal(b.routed_experts[..., 0, 0], [[1, 1, 1, 1, -1, -1, -1, -1],
                                                                [2, 2, 2, -1, -1, -1, -1, -1],
                                                                [-1] * 8])
    b = pack_rollouts(ro, [0.0] * 3, layout="packed", seq_len=10, num_experts=4)
    np.testing.assert_array_equal(b.routed_experts[..., 1, 0], [[1, 1, 1, 1, -1, 2, 2, 2, -1, -1],
                                                                [-1] * 10])
    with pytest.raises(ValueError, match="num_experts"):
        pack_rollouts(ro, [0.0] * 3)
    bad = Rollouts(requests=ro.requests, groups=((dataclasses.replace(g0[0], routed_experts=rx(5, 1)),
                                                  g0[1]), ro.groups[1]))
    with pytest.raises(ValueError, match=r"samples\[0\].routed_experts"):
        pack_rollouts(bad, [0.0] * 3, num_experts=4)
    with pytest.raises(ValueError, match="expert id"):
        pack_rollouts(ro, [0.0] * 3, num_experts=1)
