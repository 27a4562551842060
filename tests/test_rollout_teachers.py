"""MOPD teachers in process: two tiny checkpoints exported and reloaded, samples routed by
domain; scores equal the trainer's routed teacher log-probs on the packed batch (fp32, 1e-5);
missing routes are errors naming the domain."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax.rl as rl
from cascade_jax import domains
from cascade_jax.rollout import Request, Rollouts, Sample, SamplingParams
from cascade_jax.rollout.packing import pack_rollouts
from cascade_jax.rollout.teachers import Teachers
from models import nemotron_h as nh

CFG = nh.preset("tiny", pattern="M*E", vocab_size=32)


def sample(prompt, resp):
    return Sample(prompt_ids=np.asarray(prompt, np.int32), response_ids=np.asarray(resp, np.int32),
                  logprobs=np.zeros(len(resp), np.float32), finish_reason="stop", weight_version="1")


def rollouts(domain_of=("math", "code", "mcq")):
    reqs, groups = [], []
    rng = np.random.default_rng(0)
    for i, d in enumerate(domain_of):
        p = rng.integers(3, 32, 2 + i).tolist()
        reqs.append(Request(prompt_ids=tuple(p), sampling=SamplingParams(n=2), domain=d, rid=f"r{i}"))
        groups.append(tuple(sample(p, rng.integers(3, 32, 3 + k + i).tolist()) for k in range(2)))
    return Rollouts(tuple(reqs), tuple(groups))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for k in range(2):
        params = nh.init_params(CFG, jax.random.key(10 + k), dtype=jnp.float32)
        nh.save_checkpoint(params, CFG, str(root / f"t{k}"))
        paths.append(str(root / f"t{k}"))
    return paths


def test_scores_route_by_domain_and_match_trainer(checkpoints):
    a, b = checkpoints
    teachers = Teachers.from_checkpoints({"math": a, "mcq": a, "code": b}, dtype=jnp.float32)
    assert teachers.num_teachers() == 2  # a loaded once
    ro = rollouts()
    tlp = teachers.score(ro)
    batch = pack_rollouts(ro, np.zeros(6), teacher_logp=tlp)
    params = [nh.load_checkpoint(p, dtype=jnp.float32)[1] for p in (a, b)]
    lps = [np.asarray(jax.jit(lambda p, bt: rl.token_logprobs(p, bt, CFG)[0])(p, batch)) for p in params]
    code = np.asarray(batch.domain_ids)[np.asarray(rl.sequence_index(batch))] == domains.domain_id("code")
    ref = np.where(code, lps[1], lps[0])  # the trainer's log-probs under each row's teacher
    m = np.asarray(batch.loss_mask)
    np.testing.assert_allclose(np.asarray(batch.teacher_logp) * m, ref * m, atol=1e-5)
    assert all(t.shape == (len(s.response_ids),) for t, s in zip(tlp, ro.samples()))
    assert np.abs((lps[1] - lps[0]) * m)[code].max() > 1e-3  # the two teachers really differ on code


def test_missing_routes_name_the_domain(checkpoints):
    teachers = Teachers.from_checkpoints({"math": checkpoints[0]}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="'code'"):
        teachers.score(rollouts(("math", "code")))
    with pytest.raises(ValueError, match="domain"):
        teachers.score(rollouts(("math", None)))
    with pytest.raises(ValueError, match="unknown domain"):
        Teachers.from_checkpoints({"maths": checkpoints[0]})


def test_topk_scores_match_the_full_distribution_and_pack_aligned(checkpoints):
    """``score(topk=K)``: the log-probs are ``score()``'s, and at each response position the K
    ids / log-probs are the top K of the teacher's full log-softmax at the rollouts' τ for that
    token's prefix (computed here from the model's logits); the packer puts them at the
    response tokens' columns, the train step's student side reads the same ids there."""
    a, b = checkpoints
    teachers = Teachers.from_checkpoints({"math": a, "mcq": a, "code": b}, dtype=jnp.float32)
    ro = rollouts()
    tau = 1.5
    ro = Rollouts(tuple(dataclasses.replace(r, sampling=SamplingParams(n=2, temperature=tau))
                        for r in ro.requests), ro.groups)
    K = 5
    plain, top = teachers.score(ro), teachers.score(ro, topk=K)
    params = {d: nh.load_checkpoint(p, dtype=jnp.float32)[1] for d, p in (("a", a), ("b", b))}
    for n, (req, smp) in enumerate((r, s) for r, g in zip(ro.requests, ro.groups) for s in g):
        np.testing.assert_array_equal(top[n].logp, plain[n])
        seq = np.concatenate([smp.prompt_ids, smp.response_ids])[None]
        pp = params["b" if req.domain == "code" else "a"]
        z = np.asarray(nh.hidden_states(pp, jnp.asarray(seq), CFG)[0] @ pp["lm_head"], np.float64) / tau
        ls = z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1))[:, None]
        P, R = len(smp.prompt_ids), len(smp.response_ids)
        want = ls[P - 1:P + R - 1]  # the distribution each response token was drawn from
        want_ids = np.argsort(-want, -1)[:, :K]
        np.testing.assert_array_equal(top[n].topk_ids, want_ids)
        np.testing.assert_allclose(top[n].topk_logp, np.take_along_axis(want, want_ids, -1),
                                   atol=1e-5)
        np.testing.assert_allclose(top[n].logp, want[np.arange(R), smp.response_ids], atol=1e-5)
    batch = pack_rollouts(ro, np.zeros(6), teacher_logp=top)
    np.testing.assert_array_equal(np.asarray(batch.teacher_logp),
                                  np.asarray(pack_rollouts(ro, np.zeros(6), teacher_logp=plain).teacher_logp))
    m = np.asarray(batch.loss_mask) > 0
    ids, lp = np.asarray(batch.teacher_topk_ids), np.asarray(batch.teacher_topk_logp)
    assert ids.shape == lp.shape == m.shape + (K,)
    got = [ids[r][m[r]] for r in range(m.shape[0])]
    for g, t in zip(got, top):
        np.testing.assert_array_equal(g, t.topk_ids)
    assert not ids[~m].any() and not lp[~m].any()
    bad = list(top)
    bad[3] = bad[3]._replace(topk_ids=bad[3].topk_ids[:, :2])
    with pytest.raises(ValueError, match=r"teacher_logp\[3\]: expected TopKScores"):
        pack_rollouts(ro, np.zeros(6), teacher_logp=bad)
