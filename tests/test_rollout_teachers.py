"""MOPD teachers in process: two tiny checkpoints exported and reloaded, samples routed by
domain; scores equal the trainer's routed teacher log-probs on the packed batch (fp32, 1e-5);
missing routes are errors naming the domain."""

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
    ref_of_domain = np.zeros(len(domains.DOMAINS), np.int32)
    ref_of_domain[domains.domain_id("code")] = 1
    params = [nh.load_checkpoint(p, dtype=jnp.float32)[1] for p in (a, b)]
    ref = jax.jit(lambda ps, bt: rl.routed_logprobs(ps, jnp.asarray(ref_of_domain), bt, CFG))(params, batch)
    m = np.asarray(batch.loss_mask)
    np.testing.assert_allclose(np.asarray(batch.teacher_logp) * m, np.asarray(ref) * m, atol=1e-5)
    assert all(t.shape == (len(s.response_ids),) for t, s in zip(tlp, ro.samples()))
    # the two teachers really differ on the code samples
    assert np.abs(np.asarray(ref)[2:4] * m[2:4] - np.asarray(
        rl.routed_logprobs(params, jnp.zeros(len(domains.DOMAINS), jnp.int32), batch, CFG))[2:4] * m[2:4]).max() > 1e-3


def test_missing_routes_name_the_domain(checkpoints):
    teachers = Teachers.from_checkpoints({"math": checkpoints[0]}, dtype=jnp.float32)
    with pytest.raises(ValueError, match="'code'"):
        teachers.score(rollouts(("math", "code")))
    with pytest.raises(ValueError, match="domain"):
        teachers.score(rollouts(("math", None)))
    with pytest.raises(ValueError, match="unknown domain"):
        Teachers.from_checkpoints({"maths": checkpoints[0]})


def test_routed_logprobs_never_wrap_a_missing_route_to_the_last_teacher(checkpoints):
    """Domain id -1 (no domain) and teacher index -1 (no teacher for the domain) give NaN rows,
    not the last teacher's log-probs (which plain ``table[-1]`` indexing would pick)."""
    params = [nh.load_checkpoint(p, dtype=jnp.float32)[1] for p in checkpoints]
    batch = pack_rollouts(rollouts(("math", None, "code")), np.zeros(6))
    table = np.ones(len(domains.DOMAINS), np.int32)
    table[domains.domain_id("code")] = -1
    out = np.asarray(rl.routed_logprobs(params, jnp.asarray(table), batch, CFG))
    dom = np.asarray(batch.domain_ids)[np.asarray(rl.sequence_index(batch))]  # [B, T]
    assert np.isfinite(out[dom == domains.domain_id("math")]).all()
    assert np.isnan(out[dom == -1]).all() and (dom == -1).any()
    assert np.isnan(out[dom == domains.domain_id("code")]).all()
