"""The sampling contract (``cascade_jax.contract.sampling``): teacher and reference log-probs at
``τ ≠ 1`` against hand-computed values (``log softmax(z / τ)``, exact to 1e-6 on a bigram toy
model whose logits are written out); the train step computes its log-probs at the contract's
temperature (fp32: rollout log-probs recomputed at τ give a mismatch below 1e-5) and refuses a
batch recorded at another one; the packer records the contract (the engine's rows against the
trainer: tests/test_rl_steps.py); the runner's requests are the contract with a seed (field for
field what it built before); the removed ``greedy`` switch is an error saying what to write, and
a run dir written with it still resumes."""

import collections
import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cascade_jax.rl as rl
from cascade_jax import config as C
from cascade_jax.contract import SamplingMismatchError, SamplingParams
from cascade_jax.rollout import Request, Rollouts, Sample
from cascade_jax.rollout.client import ServedTeachers
from cascade_jax.rollout.packing import pack_rollouts
from cascade_jax.rollout.teachers import Teachers
from cascade_jax.runner import build as B
from cascade_jax.runner.errors import RunDirError
from cascade_jax.runner.loop import check_run_dir
from cascade_jax.runner.stage import Stage
from models import nemotron_h as nh

ToyCfg = collections.namedtuple("ToyCfg", "vocab_size")
TOY = ToyCfg(vocab_size=3)
LN2, LN3 = math.log(2.0), math.log(3.0)
#: logits of the token after token i: row i (the toy's hidden state of token i is one-hot i)
W = np.asarray([[0.0, LN2 / 2, LN3 / 2],   # / 0.5 -> (0, ln 2, ln 3): p = (1, 2, 3) / 6
                [LN3 / 2, 0.0, 0.0],       # / 0.5 -> (ln 3, 0, 0):   p = (3, 1, 1) / 5
                [0.0, 0.0, 0.0]], np.float32)
TOY_PARAMS = {"emb": jnp.eye(3, dtype=jnp.float32), "lm_head": jnp.asarray(W)}


class Bigram:
    """A model whose hidden state of token ``t`` is ``emb[t]`` (so logits after ``t`` = ``W[t]``)."""

    @staticmethod
    def hidden_states(params, tokens, cfg, *, positions=None, segment_ids=None, **kw):
        return params["emb"][tokens]


def toy_rollouts(temperature, response=(1, 0, 2)):
    req = Request(prompt_ids=(0,), sampling=SamplingParams(temperature=temperature, seed=3),
                  domain="math", rid="r0")
    smp = Sample(prompt_ids=np.asarray([0], np.int32), response_ids=np.asarray(response, np.int32),
                 logprobs=np.zeros(len(response), np.float32), finish_reason="stop", weight_version="1")
    return Rollouts(requests=(req,), groups=((smp,),))


#: response (1, 0, 2) after prompt (0,): token 1 after 0, token 0 after 1, token 2 after 0
HAND_TAU_HALF = [math.log(2 / 6), math.log(3 / 5), math.log(3 / 6)]
HAND_TAU_ONE = [LN2 / 2 - math.log(1 + math.sqrt(2) + math.sqrt(3)),
                LN3 / 2 - math.log(math.sqrt(3) + 2),
                LN3 / 2 - math.log(1 + math.sqrt(2) + math.sqrt(3))]


def test_teacher_logprobs_at_the_rollout_temperature_by_hand():
    teachers = Teachers({"math": (TOY, TOY_PARAMS)}, model=Bigram)
    np.testing.assert_allclose(teachers.score(toy_rollouts(0.5))[0], HAND_TAU_HALF, atol=1e-6)
    np.testing.assert_allclose(teachers.score(toy_rollouts(1.0))[0], HAND_TAU_ONE, atol=1e-6)
    # greedy rollouts: log-probs of the unscaled logits (the sampler's semantics)
    np.testing.assert_allclose(teachers.score(toy_rollouts(0.0))[0], HAND_TAU_ONE, atol=1e-6)
    a, b = toy_rollouts(0.5), toy_rollouts(0.7)
    mixed = Rollouts(requests=a.requests + b.requests, groups=a.groups + b.groups)
    with pytest.raises(SamplingMismatchError, match=r"requests\[1\] was sampled at temperature 0.7"):
        teachers.score(mixed)


def test_served_teachers_refuse_rollouts_sampled_at_another_temperature():
    """Servers' prompt log-probs are at temperature 1 (docs/rollout-protocol.md §3): served
    teachers refuse τ ≠ 1 before any request is sent (no server listens at the URL)."""
    teachers = ServedTeachers({"math": "http://127.0.0.1:9"}, max_retries=0, timeout_s=1)
    try:
        with pytest.raises(SamplingMismatchError, match="servers score at temperature 1, the rollouts "
                                                        "were sampled at temperature 0.5"):
            teachers.score(toy_rollouts(0.5))
    finally:
        teachers.close()


def toy_batch(temperature):
    """The toy rollout packed (prompt 0, response 1 0 2), recorded at ``temperature``."""
    return pack_rollouts(toy_rollouts(temperature), [0.0], pad_multiple=4)


def test_reference_logprobs_at_the_batch_temperature_by_hand():
    batch = toy_batch(0.5)
    assert batch.sampling == SamplingParams(temperature=0.5)  # the request's, seed dropped
    lp, _ = rl.token_logprobs(TOY_PARAMS, batch, TOY, temperature=batch.sampling.logprob_temperature,
                              model=Bigram)
    np.testing.assert_allclose(np.asarray(lp)[0], [0.0] + HAND_TAU_HALF, atol=1e-6)


def test_stage_reference_reads_the_batch_contract(tiny_cfg, tiny_params):
    """``Stage._ref_logp`` at the batch's τ = 0.5 equals ``log softmax(z / 0.5)`` of the full
    forward's logits (an independent path: no vocabulary chunking), fp32 to 1e-5."""
    cfg = tiny_cfg(vocab_size=32, hidden_size=32, pattern="*-", intermediate_size=48)
    params = tiny_params(cfg)
    ro = toy_rollouts(0.5, response=(7, 9, 11, 2))
    batch = pack_rollouts(ro, [0.0], pad_multiple=8)
    host = types.SimpleNamespace(_ref_fn=None, ref_params=params,
                                 config=types.SimpleNamespace(optimizer=types.SimpleNamespace(grad_accum=1)),
                                 parts=types.SimpleNamespace(model_cfg=cfg, mesh=None))
    got = np.asarray(Stage._ref_logp(host, batch).ref_logp)[0]
    z = np.asarray(nh.forward(params, batch.tokens, cfg, segment_ids=batch.segment_ids), np.float64)[0]
    want = np.asarray(jax.nn.log_softmax(jnp.asarray(z / 0.5), -1))
    toks = np.asarray(batch.tokens)[0]
    ref = [want[t - 1, toks[t]] for t in range(1, 5)]  # response tokens at columns 1..4
    np.testing.assert_allclose(got[1:5], ref, atol=1e-5)
    assert np.all(got[5:] == 0) and got[0] == 0


CFG = nh.preset("tiny", vocab_size=48, hidden_size=32, pattern="*-", intermediate_size=48)


def rl_batch(params, tau, record):
    """GRPO rows whose rollout log-probs are the trainer's at ``tau`` (fp32)."""
    rng = np.random.default_rng(0)
    B, T = 4, 10
    tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
    pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    seg = (pos < 8).astype(np.int32)
    mask = ((pos >= 3) & (seg > 0)).astype(np.float32)
    view = rl.SFTBatch(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(mask))
    lp, _ = jax.jit(lambda p, b: rl.token_logprobs(p, b, CFG, temperature=tau))(params, view)
    return rl.RLBatch(tokens=view.tokens, positions=view.positions, segment_ids=view.segment_ids,
                      loss_mask=view.loss_mask, rollout_logp=lp * view.loss_mask,
                      rewards=jnp.asarray([1.0, 0.0, 1.0, 0.0]), group_ids=jnp.asarray([0, 0, 1, 1], jnp.int32),
                      finish_reason=jnp.zeros((B,), jnp.int32), domain_ids=jnp.zeros((B,), jnp.int32),
                      teacher_logp=lp * view.loss_mask,
                      sampling=SamplingParams(temperature=tau) if record else None)


@pytest.mark.integration
def test_train_step_reads_the_contract_temperature(tiny_params):
    params = tiny_params(CFG, 1)
    state = rl.TrainState.create(params, optax.sgd(1e-3))
    contract = SamplingParams(temperature=0.7)
    batch = rl_batch(params, 0.7, record=True)
    step = rl.make_train_step("grpo", model_cfg=CFG, compute_dtype=jnp.float32, sampling=contract)
    _, m = step(state, batch)
    assert float(m["mismatch_abs_max"]) < 1e-5
    # an unrecorded batch under a step without a contract trains at τ = 1: the 0.7 log-probs differ
    _, m1 = rl.make_train_step("grpo", model_cfg=CFG, compute_dtype=jnp.float32)(
        state, batch.replace(sampling=None))
    assert float(m1["mismatch_abs_max"]) > 1e-2


def test_train_steps_refuse_a_batch_sampled_at_another_temperature(tiny_params):
    params = tiny_params(CFG, 1)
    batch = rl_batch(params, 0.7, record=True)
    one = SamplingParams(temperature=1.0)
    msg = r"sampled at temperature 0.7 but the step computes log-probs at temperature 1.0"
    for obj in ("grpo", "mopd"):
        with pytest.raises(SamplingMismatchError, match=msg):  # refused before the state is read
            rl.make_train_step(obj, jit=False, model_cfg=CFG, sampling=one)(None, batch)
        with pytest.raises(SamplingMismatchError, match=msg):  # and at trace time under jit
            rl.make_train_step(obj, model_cfg=CFG, sampling=one)(None, batch)


def test_packer_records_the_contract():
    """The packer (every generator's rows become an RLBatch through it) records the requests'
    contract without the seed and refuses requests at two temperatures; a greedy contract's
    log-probs are at τ = 1."""
    a, b = toy_rollouts(0.5), toy_rollouts(0.7)
    mixed = Rollouts(requests=a.requests + b.requests, groups=a.groups + b.groups)
    with pytest.raises(SamplingMismatchError, match="pack_rollouts"):
        pack_rollouts(mixed, [0.0, 0.0])
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, top_p=0.9, stop_token_ids=(2,))
    ro = toy_rollouts(0.0)
    req = dataclasses.replace(ro.requests[0], sampling=dataclasses.replace(greedy, seed=5))
    batch = pack_rollouts(Rollouts(requests=(req,), groups=ro.groups), [0.0])
    assert batch.sampling == greedy
    assert batch.sampling.greedy and batch.sampling.logprob_temperature == 1.0


def test_runner_requests_are_the_contract_with_a_seed():
    """What ``Stage._requests`` built before the contract, field for field: the engines read
    nothing else, so the tokens and log-probs of a run are unchanged."""
    cfg = C.apply_overrides(C.Config(), ["rollout.sampling.temperature=0.6", "rollout.sampling.top_p=0.9",
                                         "rollout.sampling.top_k=7", "rollout.sampling.n_samples=3",
                                         "rollout.sampling.max_response_len=40"])
    tok = types.SimpleNamespace(eos_id=5)
    host = types.SimpleNamespace(config=cfg, tok=tok, state=types.SimpleNamespace(step=4),
                                 parts=types.SimpleNamespace(sampling=B.build_sampling(cfg, tok)))
    prompts = [types.SimpleNamespace(ids=[1, 2], domain="math", metadata={"a": 1})]
    (req,) = Stage._requests(host, prompts, [123])
    r = cfg.rollout.sampling
    before = SamplingParams(max_new_tokens=r.max_response_len, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, n=r.n_samples, seed=123, stop_token_ids=(tok.eos_id,))
    assert req.sampling == before and req.rid == "s4-123" and req.prompt_ids == (1, 2)


def test_greedy_switch_is_gone_with_a_migration_message():
    with pytest.raises(C.ConfigError, match=r'rollout.greedy: removed; temperature 0 means greedy: write '
                                            r'"rollout": \{"sampling": \{"temperature": 0\}\}'):
        C.from_dict(C.Config, {"rollout": {"greedy": True, "temperature": 0.0}})
    with pytest.raises(C.ConfigError, match=r"eval.greedy: removed; eval.temperature alone sets the "
                                            r"sampling \(0 = greedy\): drop eval.greedy"):
        C.from_dict(C.Config, {"eval": {"greedy": False}})
    with pytest.raises(C.ConfigError, match="rollout.greedy: removed"):
        C.apply_overrides(C.Config(), ["rollout.greedy=true"])
    with pytest.raises(C.ConfigError, match="eval.greedy: removed"):
        C.replace_path(C.Config(), "eval.greedy", True)
    assert C.from_dict(C.Config, {"rollout": {"sampling": {"temperature": 0}}}).rollout.sampling.temperature == 0.0


def test_run_dir_written_with_greedy_still_resumes(tmp_path):
    cfg = C.apply_overrides(C.Config(), ["eval.temperature=0"])
    old = C.to_dict(cfg)
    old["rollout"]["greedy"] = False
    old["eval"]["greedy"] = True  # the old layout of eval.temperature 0
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a started run (runner.loop.started)
    assert check_run_dir(cfg, tmp_path) is True
    other = C.replace_path(cfg, "rollout.sampling.temperature", 0.5)
    with pytest.raises(RunDirError, match=r"differs in rollout.sampling.temperature\)"):
        check_run_dir(other, tmp_path)
