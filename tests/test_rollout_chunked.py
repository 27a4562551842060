"""Chunked prefill: ``prefill_continue`` (a chunk that continues a row's cache) against one
``prefill`` of the whole sequence, and the engine's chunked admission against unchunked.

Tolerance: fp32 logits / cache within 1e-5 absolute (the split changes only the summation order
of the SSD scan's chunks and the attention softmax over more keys); engine log-probs within
1e-6 and greedy tokens equal, as the issue asks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cascade_jax.config as C
from cascade_jax.rollout import Request, SamplingParams
from cascade_jax.rollout.engine import JaxEngine
from cascade_jax.rollout.exact import ExactEngine
from cascade_jax.agentic.driver import run_episodes
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.data.tokenizer import tiny_tokenizer
from models import nemotron_h as nh
from models.nemotron_h import init_cache
from tests.multidevice import run_on_cpu_devices
from tests.test_agentic_engine import LIMITS as AGENT_LIMITS
from tests.test_agentic_engine import TASKS as AGENT_TASKS
from tests.test_agentic_engine import CountingEnv

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

TOL = 1e-5
prefill = jax.jit(nh.prefill, static_argnames=("cfg", "max_len", "last_only"))
prefill_continue = jax.jit(nh.prefill_continue, static_argnames=("cfg", "last_only"))


@pytest.fixture(scope="module")
def tiny(tiny_cfg, tiny_params):
    cfg = tiny_cfg()
    return cfg, tiny_params(cfg)


def _assert_cache_equal(got, want, lengths, err):
    """Mamba conv / SSM state everywhere; K/V only at each row's valid positions."""
    for i, (g, w) in enumerate(zip(got, want)):
        for name in w:
            a, b = np.asarray(g[name]), np.asarray(w[name])
            if name in ("k", "v"):
                for r, n in enumerate(lengths):
                    np.testing.assert_allclose(a[r, :n], b[r, :n], atol=TOL, rtol=0,
                                               err_msg=f"{err}: layer {i} {name} row {r}")
            else:
                np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"{err}: layer {i} {name}")


# conv kernel 4 (window 3) and SSD chunk 16 in the tiny preset: a split at 2 leaves the conv window
# partly from the zero start; 9 / 16 / 18 land inside an SSD chunk, and the 7- and 8-token chunks
# carry a full window
@pytest.mark.parametrize("splits", [(2,), (9, 16), (18,)])
def test_prefill_continue_equals_one_prefill(tiny, splits):
    cfg, params = tiny
    T, S = 26, 32
    toks = jax.random.randint(jax.random.key(5), (2, T), 0, cfg.vocab_size)
    want_logits, want_cache = prefill(params, toks, cfg, max_len=S)
    cache = init_cache(cfg, 2, S, dtype=jnp.float32)
    bounds = (0,) + tuple(splits) + (T,)
    got = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        logits, cache = prefill_continue(params, cache, toks[:, a:b], jnp.full((2,), a), cfg)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want_logits, atol=TOL, rtol=0)
    _assert_cache_equal(cache, want_cache, (T, T), f"splits {splits}")


def test_prefill_continue_ragged_rows(tiny):
    """Rows at different positions with right-padded chunks of different valid lengths (one row
    with nothing to add keeps its state): next-token logits and cache equal one prefill each."""
    cfg, params = tiny
    S = 40
    rows = [jax.random.randint(jax.random.key(11 + i), (n,), 0, cfg.vocab_size)
            for i, n in enumerate((7, 30, 12))]
    first = (3, 17, 12)  # tokens prefilled before the continued chunk
    cache = init_cache(cfg, 3, S, dtype=jnp.float32)
    pad = lambda xs, w: jnp.stack([jnp.pad(x, (0, w - len(x))) for x in xs])
    head = pad([r[:f] for r, f in zip(rows, first)], 17)
    head_last, cache = prefill_continue(params, cache, head, jnp.zeros(3, jnp.int32), cfg,
                                        lengths=jnp.array(first), last_only=True)
    tail = [r[f:] for r, f in zip(rows, first)]
    last, cache = prefill_continue(params, cache, pad(tail, 13), jnp.array(first), cfg,
                                   lengths=jnp.array([len(x) for x in tail]), last_only=True)
    lengths = [len(r) for r in rows]
    want_logits, want_cache = prefill(params, pad(rows, 30), cfg, lengths=jnp.array(lengths),
                                      max_len=S, last_only=True)  # one ragged prefill
    for i in range(3):
        got = last[i] if len(tail[i]) else head_last[i]  # nothing added: the head's logits stand
        np.testing.assert_allclose(got, want_logits[i], atol=TOL, rtol=0, err_msg=f"row {i}")
    _assert_cache_equal(cache, want_cache, lengths, "ragged rows")


# --------------------------------------------------------------------------------------------
# engine: chunked admission


ECFG = nh.preset("tiny", vocab_size=64)  # Mamba, attention and MoE layers
PROMPTS = [(5, 6), (23, 5), (40, 4), (17, 7), (9, 3)]  # (prompt length, max_new) around chunk 8


def _prompt(n, offset):
    return tuple(int(x) for x in (np.arange(n) * 5 + 2 + offset) % ECFG.vocab_size)


def _requests(greedy: bool):
    sp = lambda m, i: (SamplingParams(max_new_tokens=m, temperature=0.0) if greedy else
                       SamplingParams(max_new_tokens=m, seed=i, top_p=0.9, top_k=20))
    return [Request(prompt_ids=_prompt(n, i), sampling=sp(m, i)) for i, (n, m) in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def engines():
    params = nh.init_params(ECFG, jax.random.key(3), dtype=jnp.float32)
    kw = dict(num_slots=2, max_len=48, prefill_sizes=(2,), steps_per_call=3,
              return_routed_experts=True)
    return (JaxEngine(ECFG, params, prompt_buckets=(8, 16, 48), **kw),
            JaxEngine(ECFG, params, prompt_buckets=(8,), prefill_chunk=8, **kw))


@pytest.mark.parametrize("greedy", [True, False])
def test_chunked_admission_equals_unchunked(engines, greedy):
    """Prompts of 5..40 tokens with chunks of 8 (one chunk, several, a partial last one, slot
    refills): the same tokens, log-probs within 1e-6 (fp32) and routed experts as prefilling
    each prompt in one call; prompts longer than the largest bucket (8) are accepted."""
    whole, chunked = engines
    want = whole.generate(_requests(greedy)).samples()
    got = chunked.generate(_requests(greedy)).samples()
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g.response_ids, w.response_ids)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-6, rtol=0)
        assert g.finish_reason == w.finish_reason
        np.testing.assert_array_equal(np.sort(g.routed_experts, -1), np.sort(w.routed_experts, -1))


def test_prefill_chunk_bad_values_name_the_field(engines):
    whole, _ = engines
    with pytest.raises(ValueError, match="prefill_chunk"):
        JaxEngine(ECFG, whole.params(), num_slots=2, max_len=48, prompt_buckets=(8,), prefill_chunk=16)
    with pytest.raises(ValueError, match="prefill_chunk"):
        JaxEngine(ECFG, whole.params(), num_slots=2, max_len=48, prefill_chunk=0)
    with pytest.raises(ValueError, match="prompt_ids"):  # unchunked: the bucket still bounds it
        whole.submit(Request(prompt_ids=_prompt(49, 0), sampling=SamplingParams(max_new_tokens=1)))
    with pytest.raises(ValueError, match="prefill_chunk: not supported by ExactEngine"):
        ExactEngine(ECFG, whole.params(), num_slots=2, max_len=64, prefill_chunk=8)
    for bad in (-1, 1.5, True):
        with pytest.raises(C.ConfigError, match="rollout.batching.prefill_chunk"):
            C.from_dict(C.Config, {"rollout": {"prefill_chunk": bad}})


# --------------------------------------------------------------------------------------------
# multi-turn: a kept slot continues with only the appended tokens


def _run_turns(eng, sessions: bool, n_turns=3, n_eps=3):
    """``n_eps`` episodes of ``n_turns`` turns: each next prompt = the last prompt + its response
    + 11 or 5 new tokens; all episodes' turn ``t`` submitted together, then stepped to the end."""
    rows = [list(_prompt(6, 10 * e)) for e in range(n_eps)]
    out = []
    for t in range(n_turns):
        hs = [eng.submit(Request(prompt_ids=tuple(rows[e]), sampling=SamplingParams(
                  max_new_tokens=4, seed=100 * e + t, top_k=20, temperature=0.0 if e == 1 else 1.0)),
                  session=e if sessions else None) for e in range(n_eps)]
        while not all(h.done() for h in hs):
            eng.step()
        for e, h in enumerate(hs):
            smp = h.result(timeout=60)[0]
            out.append(smp)
            rows[e] = rows[e] + smp.response_ids.tolist() + list(_prompt(11 if t == 0 else 5, e + t))
    return out


@pytest.mark.parametrize("n_eps,n_continued", [(2, 4), (3, 1)])
def test_kept_sessions_equal_reprefill(engines, n_eps, n_continued):
    """3-turn episodes on two slots, chunks of 8 (an 11-token continuation takes two): every
    turn's tokens, log-probs (fp32, 1e-6) and routed experts equal re-prefilling the whole
    conversation each turn. Two episodes: every later turn (4) continues its kept cache; three:
    kept caches are also given up for queued turns (those are prefilled whole; 1 continues)."""
    whole, _ = engines
    eng = JaxEngine(ECFG, whole.params(), num_slots=2, max_len=48, prefill_sizes=(2,), steps_per_call=3,
                    return_routed_experts=True, prompt_buckets=(8,), prefill_chunk=8,
                    keep_sessions=True)
    continued = []
    orig = eng._extend
    eng._extend = lambda params, rest, fresh: (continued.extend(fresh), orig(params, rest, fresh))[1]
    eng.warmup()  # compiles the continuation program too
    compiled = eng._extend_fn._cache_size()
    got = _run_turns(eng, True, n_eps=n_eps)
    assert eng._extend_fn._cache_size() == compiled  # no compile while the turns ran
    want = _run_turns(whole, False, n_eps=n_eps)
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.response_ids, w.response_ids, err_msg=f"turn row {i}")
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-6, rtol=0, err_msg=f"turn row {i}")
        np.testing.assert_array_equal(np.sort(g.routed_experts, -1), np.sort(w.routed_experts, -1))
    assert len(continued) == n_continued, continued
    assert eng._held and eng.flush_cache() and not eng._held  # idle: the kept caches dropped
    with pytest.raises(ValueError, match="session"):
        whole.submit(Request(prompt_ids=(1, 2), sampling=SamplingParams(max_new_tokens=1)), session=0)


def test_episode_driver_keep_cache_equals_reprefill():
    """``run_episodes(keep_cache=True)`` on an engine with ``keep_sessions``: the same episode rows
    and log-probs (fp32, 1e-6) as re-prefilling every turn, with later turns continued."""
    cfg = nh.preset("tiny")  # the tiny tokenizer's vocabulary
    params = nh.init_params(cfg, jax.random.key(4), dtype=jnp.float32)
    renderer = ChatRenderer(tiny_tokenizer())
    kw = dict(num_slots=4, max_len=128, prompt_buckets=(32, 128), prefill_sizes=(4,), steps_per_call=4)
    eps = []
    continued = []
    for keep in (False, True):
        eng = JaxEngine(cfg, params, keep_sessions=keep, **kw)
        if keep:
            orig = eng._extend
            eng._extend = lambda params, rest, fresh: (continued.extend(fresh), orig(params, rest, fresh))[1]
        try:
            eps.append(run_episodes(eng, AGENT_TASKS, CountingEnv, renderer, limits=AGENT_LIMITS, seed=5,
                                    tool_workers=2, timeout_s=600, keep_cache=keep))
        finally:
            eng.stop()
    for a, b in zip(*eps):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    assert sum(len(e.turns) - 1 for e in eps[1]) >= len(continued) >= 1, continued


# --------------------------------------------------------------------------------------------
# on a mesh (8 simulated CPU devices in a child process, as tests/test_rollout_mesh.py)


@pytest.mark.slow
def test_chunked_admission_on_a_mesh_equals_unsharded_unchunked():
    """``tensor:2,expert:4`` with ``prefill_chunk`` 8: the same tokens and routed experts as the
    unsharded one-call prefill, log-probs within 1e-6 (tensor-parallel sums add in another
    order), the cache kept on its shardings through the donated continuation program."""
    r = run_on_cpu_devices(__file__, timeout=1200)
    assert r["tokens_equal"] and r["experts_equal"] and r["cache_kept"], r
    assert r["logp_diff"] <= 1e-6 and r["n_tokens"] > 20, r


def _mesh_child():
    import json

    params = nh.init_params(ECFG, jax.random.key(3), dtype=jnp.float32)
    kw = dict(num_slots=8, max_len=48, prefill_sizes=(8,), steps_per_call=3, return_routed_experts=True)
    whole = JaxEngine(ECFG, params, prompt_buckets=(8, 16, 48), **kw)
    meshed = JaxEngine(ECFG, params, prompt_buckets=(8,), prefill_chunk=8, mesh="tensor:2,expert:4", **kw)
    k_sh = meshed._cache[2]["k"].sharding
    out = []
    for eng in (whole, meshed):
        out.append(eng.generate(_requests(False) + _requests(True)).samples())
    a, b = out
    print(json.dumps({
        "tokens_equal": all(np.array_equal(x.response_ids, y.response_ids) for x, y in zip(a, b)),
        "experts_equal": all(np.array_equal(x.routed_experts, y.routed_experts) for x, y in zip(a, b)),
        "logp_diff": max(float(np.max(np.abs(x.logprobs - y.logprobs))) for x, y in zip(a, b)),
        "n_tokens": sum(len(x.response_ids) for x in a),
        "cache_kept": meshed._cache[2]["k"].sharding == k_sh}))


if __name__ == "__main__":
    _mesh_child()
