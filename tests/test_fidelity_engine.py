"""The zero-mismatch mode of the continuous-batching engine (:class:`cascade_jax.rollout.exact.
ExactEngine`): the log-prob each token is sampled with equals the one the trainer computes with
the kernel-invariant model (``model=models.nemotron_h.invariant``) bit for bit
(``np.array_equal``), in fp32 and bf16:

* with cached decode over refilled slots and mixed response lengths, the trainer at another
  batch size and row length, plain ``jit`` and inside the real GRPO train step
  (``value_and_grad``, ``grad_accum=2``), which then logs ``mismatch_abs_max == 0``;
* across batch compositions: the same requests through engines with 1 and 3 slots and in
  another order give the same tokens and the same log-prob bits;
* with routing replay: the engine's recorded experts are those the trainer's forward routes to.

The independent reference for the invariant model's numbers themselves is the default model
(``test_invariant_model_matches_the_default_model``): same function, different kernels, equal
to rounding. Long rows (bf16 engine rows of >= 512 tokens through the train step) are ``slow``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax import rl
from cascade_jax.config import OptimizerConfig
from cascade_jax.rollout.exact import ExactEngine
from cascade_jax.rollout.types import Request, SamplingParams
from models import nemotron_h as nh
from models.nemotron_h import invariant

CHUNK = 128  # vocab chunk: the tiny vocabulary of 512 = 4 chunks
PROMPTS = [[5, 9, 31], [7, 1, 8, 100, 201, 3, 4], [11, 12, 13, 14, 15], list(range(40, 51))]
STOPS = (0, 64, 128, 192, 256, 320, 384, 448)  # 1/64 of the vocabulary: mixed lengths


def _params(dtype):
    cfg = nh.preset("tiny")
    master = nh.init_params(cfg, jax.random.key(0), jnp.float32)
    return cfg, master, rl.compute_params(master, nh.param_specs(cfg), dtype)


def _requests(new_tokens, temperature=0.9, prompts=PROMPTS, stops=STOPS):
    return [Request(prompt_ids=tuple(p), rid=f"r{i}",
                    sampling=SamplingParams(n=1, max_new_tokens=new_tokens, seed=11 + i,
                                            temperature=temperature, stop_token_ids=stops))
            for i, p in enumerate(prompts)]


def _generate(cfg, params, reqs, *, slots, max_len, routed=False):
    eng = ExactEngine(cfg, params, num_slots=slots, max_len=max_len, vocab_chunk=CHUNK,
                      steps_per_call=8, prompt_buckets=(16,), return_routed_experts=routed)
    return [g[0] for g in eng.generate(reqs).groups]


def _rl_batch(samples, T):
    n = len(samples)
    tok, seg = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
    mask, lp = np.zeros((n, T), np.float32), np.zeros((n, T), np.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tok[i, :p], tok[i, p:p + r] = s.prompt_ids, s.response_ids
        seg[i, :p + r], mask[i, p:p + r], lp[i, p:p + r] = 1, 1, s.logprobs
    return rl.RLBatch(tokens=jnp.asarray(tok),
                      positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (n, T)),
                      segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask),
                      rollout_logp=jnp.asarray(lp),
                      rewards=jnp.asarray(np.arange(n) % 2, jnp.float32),
                      group_ids=jnp.zeros((n,), jnp.int32), finish_reason=jnp.zeros((n,), jnp.int32),
                      domain_ids=jnp.zeros((n,), jnp.int32))


def _train_step_metrics(cfg, master, batch, dtype, temperature):
    opt = OptimizerConfig(lr=1e-3)
    state = rl.TrainState.from_config(master, opt, nh.param_specs(cfg))
    step = rl.make_train_step("grpo", model_cfg=cfg, opt_cfg=opt, grad_accum=2,
                              settings=rl.GRPOSettings(is_correction="none"),
                              compute_dtype=dtype, vocab_chunk=CHUNK, model=invariant,
                              sampling=SamplingParams(temperature=temperature))
    _, m = step(state, batch)
    return {k: float(m[k]) for k in ("mismatch_abs_max", "mismatch_exact_frac", "grad_norm")}


@pytest.mark.integration
def test_invariant_model_matches_the_default_model():
    """The invariant kernels compute the default model's function: fp32 hidden states and
    log-probs agree to rounding (|Δ| <= 1e-5 on O(1) values), and the cached prefill + decode
    reproduce the full-row forward bit for bit at every position, for rows at different
    positions in one decode batch."""
    cfg, _, params = _params(jnp.float32)
    rng = np.random.default_rng(0)
    T = 24
    tok = jnp.asarray(rng.integers(1, 512, (3, T)), jnp.int32)
    h = jax.jit(lambda p, t: invariant.hidden_states(p, t, cfg))(params, tok)
    ref = jax.jit(lambda p, t: nh.hidden_states(p, t, cfg))(params, tok)
    assert float(jnp.abs(h - ref).max()) <= 1e-5, float(jnp.abs(h - ref).max())
    P = np.array([5, 9, 3])
    ptok = np.zeros((3, 16), np.int32)
    for i in range(3):
        ptok[i, :P[i]] = np.asarray(tok[i, :P[i]])
    last, cache = jax.jit(lambda p, t, n: invariant.prefill(p, t, cfg, lengths=n, max_len=32))(
        params, jnp.asarray(ptok), jnp.asarray(P))
    for i in range(3):
        assert np.array_equal(np.asarray(last[i]), np.asarray(h[i, P[i] - 1]))
    dec = jax.jit(lambda p, c, t, n: invariant.decode_step(p, c, t, n, cfg))
    pos = P.copy()
    for _ in range(T - 9):
        out, cache = dec(params, cache, jnp.asarray([int(tok[i, pos[i]]) for i in range(3)]),
                         jnp.asarray(pos))
        for i in range(3):
            assert np.array_equal(np.asarray(out[i]), np.asarray(h[i, pos[i]])), (i, pos[i])
        pos += 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float32, marks=pytest.mark.slow)],
                         ids=["bf16", "fp32"])
@pytest.mark.integration
def test_engine_logprobs_equal_the_train_step_bitwise(dtype):
    cfg, master, params = _params(dtype)
    reqs = _requests(24)
    samples = _generate(cfg, params, reqs, slots=2, max_len=48, routed=True)
    lens = [len(s.response_ids) for s in samples]
    assert len(set(lens)) > 1 and "stop" in {s.finish_reason for s in samples}, lens
    T = 40  # trainer rows: another length than the engine's 48, all four rows in one batch
    batch = _rl_batch(samples, T)
    m = np.asarray(batch.loss_mask) > 0
    want = np.asarray(batch.rollout_logp)[m]
    tl = jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg, vocab_chunk=CHUNK, temperature=0.9,
                                                 model=invariant)[0])
    assert np.array_equal(np.asarray(tl(params, batch))[m], want)
    metrics = _train_step_metrics(cfg, master, batch, dtype, 0.9)
    assert metrics["mismatch_abs_max"] == 0.0 and metrics["mismatch_exact_frac"] == 1.0, metrics
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0, metrics
    # the default trainer is not exact against these rows (the check can fail)
    default = np.asarray(jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg, vocab_chunk=CHUNK,
                                                                temperature=0.9)[0])(params, batch))
    assert np.abs(default[m] - want).max() > 0
    # routing replay: the recorded experts are the trainer's (invariant forward, unreplayed)
    L, K = nh.num_moe_layers(cfg), cfg.num_experts_per_tok
    packed = rl.pack_routed_experts([s.routed_experts for s in samples], T,
                                    num_experts=cfg.n_routed_experts)
    used = jax.jit(lambda p, t: invariant.hidden_states(p, t, cfg, return_routed_experts=True)[1])(
        params, batch.tokens)
    assert packed.shape[2:] == (L, K)
    rm = rl.routing_mismatch(jnp.asarray(packed), used, batch.segment_ids)
    assert float(rm["routing_token_diff_frac"]) == 0.0


@pytest.mark.slow
def test_engine_samples_do_not_depend_on_slots_or_batch_composition():
    """bf16: the same requests through 1 slot, and through 3 slots in reverse order beside an
    extra request, give the same tokens and log-prob bits as through 2 slots."""
    cfg, _, params = _params(jnp.bfloat16)
    reqs = _requests(12)
    a = _generate(cfg, params, reqs, slots=2, max_len=32)
    b = _generate(cfg, params, reqs[:2], slots=1, max_len=32)
    extra = _requests(12, prompts=[[2, 3, 4, 5, 6, 7, 8]])[0]
    extra = Request(prompt_ids=extra.prompt_ids, rid="extra", sampling=extra.sampling)
    c = _generate(cfg, params, [extra] + reqs[::-1], slots=3, max_len=32)[1:][::-1]
    for x, y in zip(a[:2], b):
        assert np.array_equal(x.response_ids, y.response_ids)
        assert np.array_equal(x.logprobs, y.logprobs)
    for x, y in zip(a, c):
        assert np.array_equal(x.response_ids, y.response_ids)
        assert np.array_equal(x.logprobs, y.logprobs)


def test_engine_refuses_truncated_sampling_and_unaligned_max_len():
    cfg, _, params = _params(jnp.float32)
    with pytest.raises(ValueError, match="max_len: must be a multiple of 16"):
        ExactEngine(cfg, params, num_slots=1, max_len=40)
    eng = ExactEngine(cfg, params, num_slots=1, max_len=32)
    bad = Request(prompt_ids=(1, 2), sampling=SamplingParams(max_new_tokens=2, top_p=0.5))
    with pytest.raises(ValueError, match="top_p / top_k"):
        eng.submit(bad)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
def test_engine_rows_of_512_tokens_through_the_train_step(dtype):
    """Engine-generated rows of 16 + 512 tokens (no stops), 3 slots for 4 requests (a refill),
    through the real GRPO step: zero mismatch."""
    cfg, master, params = _params(dtype)
    prompts = [list(range(3 + i, 13 + i)) for i in range(4)]
    reqs = _requests(512, prompts=prompts, stops=())
    samples = _generate(cfg, params, reqs, slots=3, max_len=528)
    assert all(len(s.response_ids) == 512 for s in samples)
    metrics = _train_step_metrics(cfg, master, _rl_batch(samples, 528), dtype, 0.9)
    assert metrics["mismatch_abs_max"] == 0.0 and metrics["mismatch_exact_frac"] == 1.0, metrics


@pytest.mark.integration
def test_served_engine_zero_mismatch_with_routed_experts():
    """``launch/serve.py --zero-mismatch`` (a :class:`RolloutServer` around a started
    :class:`ExactEngine`): a ``/generate`` body of two prompts x ``n = 2`` (four samples over two
    slots, continuously batched) asking for ``return_routed_experts``: the returned log-probs
    equal the invariant trainer's bit for bit (fp32) and the returned experts (SGLang layout,
    MoE layers at their global index) are those the trainer's forward routes each token to."""
    import base64

    from fastapi.testclient import TestClient

    from cascade_jax.rollout.server import RolloutServer

    cfg = nh.preset("tiny", vocab_size=64)
    params = nh.init_params(cfg, jax.random.key(3), dtype=jnp.float32)
    T = 16
    eng = ExactEngine(cfg, params, num_slots=2, max_len=T, prompt_buckets=(8,), prefill_sizes=(2,),
                      steps_per_call=3, return_routed_experts=True)
    body = {"input_ids": [[5, 9, 3, 7], [4, 2]], "return_logprob": True, "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": 6, "sampling_seed": 3, "n": 2, "temperature": 0.7}}
    eng.start()
    try:
        with TestClient(RolloutServer(eng, cfg, checkpoint="tiny", zero_mismatch=True).app) as client:
            r = client.post("/generate", json=body)
    finally:
        eng.stop()
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 4
    hf = cfg.to_hf_dict()
    L, K = hf["num_hidden_layers"], hf["num_experts_per_tok"]
    moe = [i for i, c in enumerate(hf["hybrid_override_pattern"]) if c == "E"]
    tok, seg = np.zeros((4, T), np.int32), np.zeros((4, T), np.int32)
    mask, served = np.zeros((4, T), np.float32), np.zeros((4, T), np.float32)
    rxs = []
    for i, o in enumerate(out):
        p = body["input_ids"][i // 2]
        seq = p + o["output_ids"]
        tok[i, :len(seq)], seg[i, :len(seq)], mask[i, len(p):len(seq)] = seq, 1, 1
        served[i, len(p):len(seq)] = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
        rx = np.frombuffer(base64.b64decode(o["meta_info"]["routed_experts"]), np.int32)
        rxs.append(rx.reshape(len(seq) - 1, L, K)[:, moe])
    view = rl.SFTBatch(tokens=jnp.asarray(tok), positions=jnp.broadcast_to(jnp.arange(T), (4, T)),
                       segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask))
    lp = np.asarray(rl.token_logprobs(params, view, cfg, temperature=0.7, model=invariant)[0])
    assert np.all(served[mask > 0] < 0)
    np.testing.assert_array_equal(lp * mask, served)  # bit for bit
    used = np.asarray(invariant.hidden_states(params, jnp.asarray(tok), cfg, return_routed_experts=True)[1])
    for i, rx in enumerate(rxs):
        np.testing.assert_array_equal(rx, used[i, :len(rx)])
