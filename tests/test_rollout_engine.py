"""The embedded JAX engine (continuous batching) against the model's full forward.

* greedy equals the step-by-step argmax of the full forward, and its log-probs equal the full
  forward's log-softmax (fp32, 2e-5 absolute);
* seeded sampling (τ = 1, top-p 0.9, top-k 20) gives the same tokens whatever the slot, the
  companions and the number of slots (log-probs within 2e-5: other batch shapes may round
  differently);
* stop / length / abort finish reasons, n-grouping (sample ``i`` of a group = the one-sample
  request seeded ``sample_seed(seed, i)``), requests joining a running batch from other threads;
* no compilation after warm-up on a steady mixed-length workload;
* ``score`` equals the trainer's ``token_logprobs``; weight updates (version rule, no copy,
  outputs change); bad requests are errors naming the field.
"""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax.rl as rl
from cascade_jax.rollout import Request, RolloutEngine, RolloutError, SamplingParams
from cascade_jax.rollout.engine import JaxEngine
from cascade_jax.rollout.types import sample_seed
from models import nemotron_h as nh

CFG = nh.preset("tiny", pattern="ME*", vocab_size=64)
LENGTHS = [(3, 9), (9, 4), (5, 14), (2, 6), (12, 3), (4, 11), (7, 8)]  # (prompt, max_new)


@pytest.fixture(scope="module")
def params():
    return nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)


@pytest.fixture(scope="module")
def engine(params):
    eng = JaxEngine(CFG, params, num_slots=4, max_len=40, prompt_buckets=(8, 16),
                    prefill_sizes=(4,), steps_per_call=3, overlap=True)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def engine2(params):
    """Another slot count (2), decode chunk (2 tokens per call), no host/device overlap (the
    default; the module engine overlaps)."""
    return JaxEngine(CFG, params, num_slots=2, max_len=40, prompt_buckets=(16,),
                     prefill_sizes=(2,), steps_per_call=2, overlap=False)


def prompt(n, offset=0):
    return tuple(int(x) for x in (np.arange(n) * 7 + 3 + offset) % CFG.vocab_size)


@jax.jit
def _full_logp(params, tokens):
    return jax.nn.log_softmax(nh.forward(params, tokens, CFG)[0], -1)


def full_logp(params, seq):
    """``[len(seq), V]`` log-softmax of the full forward (right-padded to 32: causal, so the
    padding does not change the rows kept; one compilation)."""
    tokens = np.zeros((1, 32), np.int32)
    tokens[0, :len(seq)] = seq
    return np.asarray(_full_logp(params, tokens))[:len(seq)]


def test_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.health() and engine.weight_version() == "0"


def test_greedy_equals_full_forward_argmax(engine, params):
    reqs = [Request(prompt_ids=prompt(p, i), sampling=SamplingParams(max_new_tokens=m, temperature=0.0))
            for i, (p, m) in enumerate(LENGTHS)]
    out = engine.generate(reqs)
    assert len(out.groups) == len(reqs)
    for (p, m), group in zip(LENGTHS, out.groups):
        (s,) = group
        assert s.finish_reason == "length" and len(s.response_ids) == m
        seq = np.concatenate([s.prompt_ids, s.response_ids])
        lp = full_logp(params, seq)[p - 1:-1]  # predictions of the response tokens
        # step-by-step: every token is the argmax given the prefix the engine produced
        np.testing.assert_array_equal(lp.argmax(-1), s.response_ids)
        np.testing.assert_allclose(s.logprobs, lp[np.arange(m), s.response_ids], atol=2e-5)
        assert s.weight_version == "0"


SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=1234)


def test_seeded_sampling_independent_of_slot_batch_and_slot_count(engine, engine2, params):
    target = Request(prompt_ids=prompt(6), sampling=SAMPLED)
    alone = engine.generate([target]).groups[0][0]
    again = engine.generate([target]).groups[0][0]
    np.testing.assert_array_equal(alone.response_ids, again.response_ids)
    others = [Request(prompt_ids=prompt(p, 5 + i), sampling=SamplingParams(
        max_new_tokens=m, temperature=0.7, top_p=0.5, seed=i)) for i, (p, m) in enumerate(LENGTHS)]
    # lands in a later slot, after refills, beside other settings; then on a 2-slot engine
    crowded = engine.generate(others[:5] + [target] + others[5:]).groups[5][0]
    small = engine2.generate(others[:3] + [target]).groups[3][0]
    for s in (crowded, small):
        np.testing.assert_array_equal(s.response_ids, alone.response_ids)
        np.testing.assert_allclose(s.logprobs, alone.logprobs, atol=2e-5)
    # the log-probs are SGLang's: log softmax(z / τ) of the full forward, not renormalised
    seq = np.concatenate([alone.prompt_ids, alone.response_ids])
    lp = full_logp(params, seq)[5:-1]
    np.testing.assert_allclose(alone.logprobs, lp[np.arange(10), alone.response_ids], atol=2e-5)
    # a different seed gives a different sample
    other = engine.generate([Request(prompt_ids=prompt(6), sampling=SamplingParams(
        max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=1235))]).groups[0][0]
    assert not np.array_equal(other.response_ids, alone.response_ids)


def test_n_grouping(engine):
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=77)
    out = engine.generate([Request(prompt_ids=prompt(4), sampling=sp, rid="g"),
                           Request(prompt_ids=prompt(3, 1), sampling=SamplingParams(max_new_tokens=2))])
    group = out.groups[0]
    assert len(group) == 3 and len(out.groups[1]) == 1 and len(out.samples()) == 4
    assert len({tuple(s.response_ids) for s in group}) == 3  # distinct streams
    # sample k = the one-sample request seeded sample_seed(77, k) (what the HTTP client sends;
    # sample_seed(77, 0) = 77)
    singles = engine.generate([Request(prompt_ids=prompt(4), sampling=SamplingParams(
        max_new_tokens=6, temperature=1.0, n=1, seed=sample_seed(77, k))) for k in range(3)])
    assert sample_seed(77, 0) == 77
    for s, one in zip(group, singles.samples()):
        np.testing.assert_array_equal(s.response_ids, one.response_ids)
        np.testing.assert_allclose(s.logprobs, one.logprobs, atol=2e-5, rtol=0)


def test_finish_reasons_stop_length_abort(engine):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    ref = engine.generate([Request(prompt_ids=prompt(5), sampling=greedy)]).groups[0][0]
    stop_tok = int(ref.response_ids[2])
    first = int(np.flatnonzero(ref.response_ids == stop_tok)[0])
    sp = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop_tok,))
    s = engine.generate([Request(prompt_ids=prompt(5), sampling=sp)]).groups[0][0]
    assert s.finish_reason == "stop" and len(s.response_ids) == first + 1
    np.testing.assert_array_equal(s.response_ids, ref.response_ids[:first + 1])
    assert ref.finish_reason == "length" and len(ref.response_ids) == 8

    # abort: a running request keeps its tokens so far, a queued one ends empty
    long = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)
    running = [engine.submit(Request(prompt_ids=prompt(3, i), sampling=long, rid=f"run{i}"))
               for i in range(4)]
    queued = engine.submit(Request(prompt_ids=prompt(3), sampling=long, rid="queued"))
    engine.step()
    engine.step()  # with overlap the first call's tokens are read during the second step
    assert engine.num_running() == 4 and engine.num_queued() == 1
    assert engine.abort("run1") and engine.abort("queued") and not engine.abort("nope")
    (a,) = running[1].result(timeout=5)
    assert a.finish_reason == "abort" and len(a.response_ids) == engine.steps_per_call
    assert queued.result(timeout=5)[0].finish_reason == "abort"
    assert len(queued.result()[0].response_ids) == 0
    assert engine.abort_all() == 3
    assert all(h.result(timeout=5)[0].finish_reason == "abort" for h in running)
    assert engine.num_running() == 0 and engine.flush_cache()


def test_no_compilation_after_warmup(engine):
    from jax._src import dispatch
    compiles = []

    def listener(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for rep in range(2):
            reqs = [Request(prompt_ids=prompt(p, rep + i), sampling=SamplingParams(
                max_new_tokens=m, temperature=[0.0, 1.0, 0.8][i % 3], top_p=[1.0, 0.9][i % 2],
                seed=i, n=1 + i % 2)) for i, (p, m) in enumerate(LENGTHS * 2)]
            out = engine.generate(reqs)
            assert len(out.samples()) == sum(1 + i % 2 for i in range(len(reqs)))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_background_loop_joins_requests_from_threads(engine):
    engine.start()
    try:
        done = []
        results = [None] * 6

        def client(i):
            h = engine.submit(Request(prompt_ids=prompt(2 + i, i), rid=f"bg{i}", sampling=SamplingParams(
                max_new_tokens=4 + 2 * i, temperature=1.0, seed=i)), on_done=lambda h: done.append(h.rid))
            results[i] = h.result(timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(done) == sorted(f"bg{i}" for i in range(6))
        for i, (s,) in enumerate(results):
            assert len(s.response_ids) == 4 + 2 * i and s.finish_reason == "length"
        # the same request through the synchronous path gives the same sample
        sync = Request(prompt_ids=prompt(4, 2), sampling=SamplingParams(max_new_tokens=8, temperature=1.0, seed=2))
        np.testing.assert_array_equal(engine.generate([sync]).groups[0][0].response_ids,
                                      results[2][0].response_ids)
    finally:
        engine.stop()


def test_score_equals_trainer_logprobs(engine, params):
    prompts = [prompt(3), prompt(7, 1), prompt(1, 2)]
    responses = [prompt(5, 3), prompt(2, 4), prompt(9, 5)]
    got = engine.score(prompts, responses)
    T = 16
    B = len(prompts)
    tokens = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        tokens[b, :len(p) + len(r)] = p + r
        seg[b, :len(p) + len(r)] = 1
    batch = rl.SFTBatch(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
                        positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
                        loss_mask=jnp.zeros((B, T)))
    ref = np.asarray(jax.jit(lambda p, b: rl.token_logprobs(p, b, CFG)[0])(params, batch))
    for b, (p, r) in enumerate(zip(prompts, responses)):
        assert got[b].shape == (len(r),) and got[b].dtype == np.float32
        np.testing.assert_allclose(got[b], ref[b, len(p):len(p) + len(r)], atol=1e-5)


def test_update_weights(engine2, params):
    eng = engine2
    eng.update_weights(params, "3")  # from "0"
    req = [Request(prompt_ids=prompt(5), sampling=SamplingParams(max_new_tokens=6, temperature=0.0))]
    before = eng.generate(req).groups[0][0]
    new = nh.init_params(CFG, jax.random.key(1), dtype=jnp.float32)
    with pytest.raises(RolloutError, match="'3'.*unchanged"):
        eng.update_weights(new, "3")
    with pytest.raises(RolloutError, match="'2'"):
        eng.update_weights(new, "2")
    bad = jax.tree.map(lambda x: x, new)
    bad["lm_head"] = bad["lm_head"][:, :10]
    with pytest.raises(RolloutError, match=r"\['lm_head'\]"):
        eng.update_weights(bad, "4")
    eng.update_weights(new, "4")
    assert eng.weight_version() == "4"
    assert eng.params()["lm_head"] is new["lm_head"]  # same sharding and dtype: no copy
    after = eng.generate(req).groups[0][0]
    assert after.weight_version == "4" and before.weight_version == "3"
    assert not np.array_equal(after.response_ids, before.response_ids)
    np.testing.assert_allclose(eng.score([prompt(5)], [after.response_ids])[0], after.logprobs, atol=2e-5)
    # paused with samples in their slots: refused, the old weights keep serving
    h = eng.submit(Request(prompt_ids=prompt(5), sampling=SamplingParams(max_new_tokens=20)))
    eng.step()
    eng.pause()
    with pytest.raises(RolloutError, match="paused"):
        eng.update_weights(params, "5")
    assert eng.weight_version() == "4"
    eng.resume()
    eng.update_weights(params, "5")  # drains the running sample first
    assert h.result(timeout=1)[0].weight_version == "4" and eng.weight_version() == "5"


@pytest.mark.parametrize("kw,field", [
    (dict(prompt_ids=()), "prompt_ids"),
    (dict(prompt_ids=(1, 99)), "prompt_ids"),
    (dict(prompt_ids=tuple(range(17))), "prompt_ids"),
    (dict(prompt_ids=(1, 2), sampling=SamplingParams(max_new_tokens=39)), "max_new_tokens"),
    (dict(prompt_ids=(1, 2), sampling=SamplingParams(max_new_tokens=5, seed=-1)), "seed"),
    (dict(prompt_ids=(1, 2), sampling=SamplingParams(max_new_tokens=5, stop_token_ids=tuple(range(9)))),
     "stop_token_ids"),
])
def test_bad_requests_name_the_field(engine, kw, field):
    with pytest.raises(ValueError, match=field):
        engine.submit(Request(**kw))
    assert engine.health() and engine.num_queued() == 0


@pytest.mark.integration
def test_routed_experts_follow_sglang_layout_and_match_the_forward(engine):
    """``return_routed_experts``: each sample carries ``[P + R - 1, L_moe, K]`` expert ids (the
    prompt's from prefill, each fed response token's from decode), equal as top-k sets to the
    full forward's routing of the same tokens (fp32), through slot refills and with overlap."""
    cfg = nh.preset("tiny", vocab_size=64)  # three MoE layers, top-2 of 8 experts
    p = nh.init_params(cfg, jax.random.key(1), dtype=jnp.float32)
    n_moe = cfg.pattern.count("E")
    fwd = jax.jit(lambda t: nh.forward(p, t, cfg, return_routed_experts=True)[1])
    eng = JaxEngine(cfg, p, num_slots=2, max_len=32, prompt_buckets=(16,), prefill_sizes=(2,),
                    steps_per_call=3, overlap=True, return_routed_experts=True)
    reqs = [Request(prompt_ids=prompt(P, i), sampling=SamplingParams(max_new_tokens=M, seed=i))
            for i, (P, M) in enumerate(LENGTHS[:5])]
    for s in eng.generate(reqs).samples():
        P, R = len(s.prompt_ids), len(s.response_ids)
        assert s.routed_experts.shape == (P + R - 1, n_moe, cfg.num_experts_per_tok)
        seq = np.zeros((1, 32), np.int32)  # one shape (causal: the padding changes nothing)
        seq[0, :P + R] = np.concatenate([s.prompt_ids, s.response_ids])
        want = np.sort(np.asarray(fwd(jnp.asarray(seq)))[0, :P + R - 1], -1)
        np.testing.assert_array_equal(np.sort(s.routed_experts, -1), want)
    assert engine.generate(reqs[:1]).samples()[0].routed_experts is None  # off by default


def test_bare_decode_is_the_decode_program_alone(engine):
    """The benchmark's baseline runs the engine's own decode program ``ceil(steps / K)`` times
    with no early exit, and leaves the engine as it was (same seeded sample before and after)."""
    req = [Request(prompt_ids=prompt(5), sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=7))]
    before = engine.generate(req).samples()[0]
    calls, orig = [], engine._decode_fn
    engine._decode_fn = lambda *a: calls.append(int(a[-1])) or orig(*a)
    try:
        bare = engine.bare_decode(7, prompt_len=5)
        bare()
        bare()
    finally:
        engine._decode_fn = orig
    assert calls == [0] * 6  # 3 calls of K = 3 steps per run, refill 0: never an early exit
    after = engine.generate(req).samples()[0]
    assert after.response_ids.tolist() == before.response_ids.tolist()
    assert np.array_equal(after.logprobs, before.logprobs) and engine.num_running() == 0
