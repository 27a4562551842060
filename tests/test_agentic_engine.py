"""Episodes through the embedded JAX engine (random tiny model, fp32).

* concurrent multi-turn episodes (3 turns each, tool steps on a thread pool) give rows whose
  loss mask is 1 exactly on the sampled tokens, whose context equals the template's rendering
  of the conversation (recomputed here from the messages), and whose sampling log-probs equal a
  teacher-forced forward of the whole row (atol 1e-5);
* seeded: the rows do not depend on the number of tool workers (timing);
* the same episodes through the HTTP protocol (the JAX rollout server and ServerClient) are
  token-identical; with kept sessions (``session_params.id``) too, and the server continues
  later turns from the kept caches;
* the rows pack into an RLBatch (fields checked on synthetic episodes) the GRPO step takes
  (slow: finite loss, non-zero gradient).
"""

import contextlib
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

import cascade_jax.rl as rl
from cascade_jax.agentic.driver import (BlockingEngine, DriverStats, pack_episodes, run_episodes,
                                        union_length)
from cascade_jax.agentic.env import Reset, Step
from cascade_jax.agentic.episode import Episode, EpisodeLimits
from cascade_jax.agentic.render import ChatRenderer
from cascade_jax.config import OptimizerConfig
from cascade_jax.data.tokenizer import tiny_tokenizer
from cascade_jax.domains import domain_id
from cascade_jax.rl.batch import FINISH_LENGTH, FINISH_STOP
from cascade_jax.rollout.client import ServerClient
from cascade_jax.rollout.engine import JaxEngine
from cascade_jax.rollout.launcher import free_port
from cascade_jax.rollout.scoring import score_logprobs
from cascade_jax.rollout.server import RolloutServer
from tests import runner_support
from cascade_jax.rollout.types import SamplingParams
from models import nemotron_h as nh

CFG = nh.preset("tiny", pattern="ME*")
LIMITS = EpisodeLimits(max_turns=3, max_tokens=128, max_new_tokens=8, end_on_length=False)


class CountingEnv:
    """Answers every turn with a tool observation; ends after the third turn (reward: the
    parity of the turn texts' total length, so rewards differ between episodes)."""

    def __init__(self):
        self.k = 0
        self.closed = False
        self.texts = []

    def reset(self, task):
        return Reset(({"role": "user", "content": task["prompt"]},))

    def step(self, turn):
        self.k += 1
        self.texts.append(turn.text)
        if self.k >= 3:
            return Step(done=True, reward=float(sum(map(len, self.texts)) % 2))
        return Step((f"tick {self.k}",))

    def truncate(self, reason):
        return 0.0

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def setup():
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    eng = JaxEngine(CFG, params, num_slots=4, max_len=128, prompt_buckets=(128,),
                    prefill_sizes=(4,), steps_per_call=4)
    renderer = ChatRenderer(tiny_tokenizer())
    stats = DriverStats()
    eps = run_episodes(eng, TASKS, CountingEnv, renderer, limits=LIMITS, seed=5, tool_workers=2,
                       timeout_s=600, stats=stats)
    yield params, eng, renderer, eps, stats
    eng.stop()


TASKS = [{"prompt": p} for p in ("count with me", "count again", "one two", "three")]


def test_episode_rows_masks_and_logprobs(setup):
    params, eng, renderer, eps, stats = setup
    assert len(eps) == 4 and stats.episodes == 4 and stats.turns == 12
    for e in eps:
        assert e.ended_by == "env" and len(e.turns) == 3 and e.finish_reason == "stop"
        tok, mask = e.tokens, e.loss_mask
        # the row, rebuilt from the conversation: prompt, then per turn the sampled tokens
        # (mask 1), [the stop token closing a cut turn,] the template's continuation (mask 0)
        msgs = [{"role": "user", "content": e.task["prompt"]}]
        expect = list(renderer.prompt_ids(msgs))
        expect_mask = [0.0] * len(expect)
        obs_msgs = [m for m in e.messages if m["role"] == "tool"]
        for k, (turn, (s, t)) in enumerate(zip(e.turns, runner_support.mask_spans(mask))):
            sampled = list(tok[s:t])
            assert renderer.tokenizer.decode(sampled).startswith(turn.text)
            expect += sampled
            expect_mask += [1.0] * len(sampled)
            msgs.append(turn.message)
            if turn.finish_reason != "stop":
                expect.append(renderer.stop_id)
                expect_mask.append(0.0)
            else:
                assert sampled[-1] == renderer.stop_id
            if k < 2:
                obs = [obs_msgs[k]]
                cont = list(renderer.continuation_ids(msgs, obs))
                msgs += obs
                expect += cont
                expect_mask += [0.0] * len(cont)
        assert list(tok) == expect
        np.testing.assert_array_equal(mask, np.asarray(expect_mask, np.float32))
        assert obs_msgs[0]["content"] == "tick 1" and obs_msgs[1]["content"] == "tick 2"
        # sampling log-probs = teacher-forced log-probs of the whole row (temperature 1, fp32)
        ref = score_logprobs(params, CFG, [tok[:1]], [tok[1:]])[0]
        on = mask[1:] == 1
        assert on.sum() == mask.sum() > 0
        np.testing.assert_allclose(e.logprobs[1:][on], ref[on], atol=1e-5, rtol=0)
        assert np.all(e.logprobs[mask == 0] == 0)
    assert 0 < stats.gen_busy_s <= stats.wall_s + 1e-6 and stats.tool_busy_s > 0


def test_episodes_are_seeded_independent_of_timing(setup):
    params, eng, renderer, eps, _ = setup
    again = run_episodes(eng, TASKS, CountingEnv, renderer, limits=LIMITS, seed=5,
                         tool_workers=1, timeout_s=300)
    for a, b in zip(eps, again):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    other = run_episodes(eng, TASKS[:1], CountingEnv, renderer, limits=LIMITS, seed=6,
                         timeout_s=300)
    assert list(other[0].tokens) != list(eps[0].tokens)


class SleepyEnv(CountingEnv):
    """CountingEnv whose tool calls take 0.4 s in the task marked ``sleep``."""

    def reset(self, task):
        self.sleep = task.get("sleep", False)
        return super().reset(task)

    def step(self, turn):
        if self.sleep:
            time.sleep(0.4)
        return super().step(turn)


def test_tools_run_while_other_episodes_decode(setup):
    params, eng, renderer, eps, _ = setup
    stats = DriverStats()
    tasks = [{**TASKS[0], "sleep": True}] + TASKS[1:]
    got = run_episodes(eng, tasks, SleepyEnv, renderer, limits=LIMITS, seed=5, tool_workers=2,
                       timeout_s=300, stats=stats)
    assert stats.tool_busy_s >= 3 * 0.4 and stats.overlap_s > 0, stats
    for a, b in zip(eps, got):  # timing changed, the episodes did not
        np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.slow
def test_episode_rows_feed_the_grpo_step(setup):
    params, eng, renderer, eps, _ = setup
    batch = pack_episodes(eps, group_ids=[0, 0, 1, 1])
    assert batch.tokens.shape[0] == 4 and batch.tokens.shape[1] % 8 == 0
    np.testing.assert_array_equal(np.asarray(batch.loss_mask)[0, :len(eps[0].tokens)], eps[0].loss_mask)
    assert np.asarray(batch.loss_mask)[0, len(eps[0].tokens):].sum() == 0
    state = rl.TrainState.from_config(params, OptimizerConfig(lr=1e-3), nh.param_specs(CFG))
    step = rl.make_train_step("grpo", model_cfg=CFG, settings=rl.GRPOSettings())
    # rewards that differ within each group, so the advantages (and the gradient) are non-zero
    batch = batch.replace(rewards=jnp.asarray([1.0, 0.0, 0.0, 1.0], jnp.float32))
    _, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert float(metrics["num_tokens"]) == sum(float(e.loss_mask.sum()) for e in eps)


@pytest.mark.slow
def test_routed_experts_carry_over_to_episode_rows():
    """With ``return_routed_experts``, an episode's experts are the last turn's: equal (as top-k
    sets) to a full forward's routing of the row, -1 after the last sampled token."""
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    eng = JaxEngine(CFG, params, num_slots=4, max_len=128, prompt_buckets=(128,),
                    prefill_sizes=(4,), steps_per_call=4, return_routed_experts=True)
    try:
        eps = run_episodes(eng, TASKS[:2], CountingEnv, ChatRenderer(tiny_tokenizer()),
                           limits=LIMITS, seed=5, timeout_s=600)
    finally:
        eng.stop()
    fwd = jax.jit(lambda t: nh.forward(params, t, CFG, return_routed_experts=True)[1])
    batch = pack_episodes(eps, num_experts=CFG.n_routed_experts)
    for n, e in enumerate(eps):
        L = len(e.tokens)
        rx = e.routed_experts
        assert rx.shape == (L - 1, CFG.pattern.count("E"), CFG.num_experts_per_tok)
        last = int(np.flatnonzero(e.loss_mask)[-1])  # the last sampled token
        seq = np.zeros((1, 128), np.int32)
        seq[0, :L] = e.tokens
        want = np.sort(np.asarray(fwd(jnp.asarray(seq)))[0, :last], -1)
        np.testing.assert_array_equal(np.sort(rx[:last], -1), want)
        assert (rx[last:] == -1).all()
        np.testing.assert_array_equal(np.asarray(batch.routed_experts)[n, :L - 1], rx)


def test_union_length():
    assert union_length([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert union_length([]) == 0.0


def _episode(n_tokens, turns, reward, ended_by="env", rx=None, domain="swe", version="3"):
    """A synthetic episode: sampled tokens on the ``turns`` column ranges."""
    mask = np.zeros(n_tokens, np.float32)
    for s, t in turns:
        mask[s:t] = 1
    tokens = np.arange(n_tokens, dtype=np.int32) % 50
    logp = -np.linspace(0.1, 1.0, n_tokens).astype(np.float32) * mask
    return Episode({}, tokens, mask, logp, reward, ended_by, [], [], True, {},
                   weight_versions=[version] * len(turns), routed_experts=rx, domain=domain)


def test_pack_episodes_fields():
    rx0 = np.random.default_rng(0).integers(0, 8, (9, 2, 2)).astype(np.int32)
    rx1 = np.random.default_rng(1).integers(0, 8, (4, 2, 2)).astype(np.int32)
    eps = [_episode(10, [(3, 5), (7, 10)], 1.0, rx=rx0), _episode(5, [(2, 5)], 0.0, "turns", rx=rx1)]
    b = pack_episodes(eps, group_ids=[7, 7], num_experts=8)
    assert b.tokens.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(b.loss_mask)[0, :10], eps[0].loss_mask)
    np.testing.assert_array_equal(np.asarray(b.rollout_logp)[1, :5], eps[1].logprobs)
    np.testing.assert_array_equal(np.asarray(b.segment_ids)[1], [1] * 5 + [0] * 11)
    np.testing.assert_array_equal(np.asarray(b.positions)[0, :10], np.arange(10))
    np.testing.assert_array_equal(np.asarray(b.finish_reason), [FINISH_STOP, FINISH_LENGTH])
    np.testing.assert_array_equal(np.asarray(b.domain_ids), [domain_id("swe")] * 2)
    np.testing.assert_array_equal(np.asarray(b.group_ids), [7, 7])
    np.testing.assert_array_equal(np.asarray(b.policy_version), [3, 3])
    np.testing.assert_array_equal(np.asarray(b.rewards), [1.0, 0.0])
    rx = np.asarray(b.routed_experts)
    np.testing.assert_array_equal(rx[0, :9], rx0)
    np.testing.assert_array_equal(rx[1, :4], rx1)
    assert (rx[0, 9:] == -1).all() and (rx[1, 4:] == -1).all()
    with pytest.raises(ValueError, match="seq_len"):
        pack_episodes(eps, seq_len=8)
    with pytest.raises(ValueError, match="group_ids"):
        pack_episodes(eps, group_ids=[0])
    with pytest.raises(ValueError, match="num_experts"):
        pack_episodes(eps)
    with pytest.raises(ValueError, match="first token"):
        pack_episodes([_episode(4, [(0, 2)], 0.0)])


def test_pack_episodes_zero_token_episode():
    """An episode that ended at its start (no tokens) packs as an all-padding row."""
    empty = _episode(0, [], 0.0, "error", rx=np.zeros((0, 2, 2), np.int32))
    rx = np.random.default_rng(0).integers(0, 8, (5, 2, 2)).astype(np.int32)
    b = pack_episodes([_episode(6, [(2, 6)], 1.0, rx=rx), empty], num_experts=8)
    assert b.tokens.shape == (2, 8)
    for f in ("tokens", "positions", "segment_ids", "loss_mask", "rollout_logp"):
        assert not np.asarray(getattr(b, f))[1].any(), f
    assert (np.asarray(b.routed_experts)[1] == -1).all()
    np.testing.assert_array_equal(np.asarray(b.rewards), [1.0, 0.0])
    np.testing.assert_array_equal(np.asarray(b.finish_reason), [FINISH_STOP, FINISH_LENGTH])
    assert pack_episodes([empty], num_experts=8).tokens.shape == (1, 8)


@contextlib.contextmanager
def _served_in_process(eng, **client_kw):
    """The JAX rollout server around ``eng`` in this process (uvicorn on a thread, a free port),
    yielded as ``(port, ServerClient)`` once healthy; the client closed and the server stopped on
    exit."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(RolloutServer(eng, CFG, checkpoint="in-process").app,
                                        host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    client = None
    try:
        client = ServerClient([f"http://127.0.0.1:{port}"], max_concurrency=4, timeout_s=120,
                              backoff_s=0.1, **client_kw)
        deadline = time.monotonic() + 60
        while not client.health():
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        yield port, client
    finally:
        if client is not None:
            client.close()
        srv.should_exit = True
        th.join(30)


def test_served_engine_gives_the_same_episodes(setup):
    """The same episodes through the HTTP protocol: the JAX rollout server (in this process,
    around the same engine) and the ServerClient, via BlockingEngine; one body per turn with
    ``input_ids``, seeded as in process, so the rows are token-identical."""
    params, eng, renderer, eps, _ = setup
    with _served_in_process(eng) as (_, client):
        served = BlockingEngine(client, max_inflight=4)
        got = run_episodes(served, TASKS, CountingEnv, renderer, limits=LIMITS, seed=5,
                           tool_workers=2, timeout_s=300)
        served.close()
    for a, b in zip(eps, got):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)


def test_served_sessions_prefill_only_the_new_tokens():
    """Kept sessions through the HTTP protocol: a JAX rollout server whose engine keeps sessions,
    ``run_episodes(keep_cache=True)`` through ``BlockingEngine(ServerClient)`` (each turn's body
    carries ``session_params.id``): the same rows and log-probs (fp32, 2e-5) as the embedded
    driver with kept sessions, and the server continued later turns from the kept caches
    (prefilling only the appended tokens) instead of re-prefilling them."""
    params = nh.init_params(CFG, jax.random.key(0), dtype=jnp.float32)
    eng = JaxEngine(CFG, params, num_slots=4, max_len=128, prompt_buckets=(32, 128),
                    prefill_sizes=(4,), steps_per_call=4, keep_sessions=True)
    renderer = ChatRenderer(tiny_tokenizer())
    want = run_episodes(eng, TASKS, CountingEnv, renderer, limits=LIMITS, seed=5, tool_workers=2,
                        timeout_s=600, keep_cache=True)
    assert eng._held and eng.flush_cache() and not eng._held  # idle: the kept caches dropped
    continued = []
    orig = eng._extend
    eng._extend = lambda p, rest, fresh: (continued.extend(fresh), orig(p, rest, fresh))[1]
    try:
        with _served_in_process(eng, max_retries=0) as (port, client):
            served = BlockingEngine(client, max_inflight=4)
            got = run_episodes(served, TASKS, CountingEnv, renderer, limits=LIMITS, seed=5,
                               tool_workers=2, timeout_s=300, keep_cache=True)
            served.close()
            # a session field the server does not implement is a 400 naming it
            body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1},
                    "session_params": {"id": "x", "offset": 2}}
            r = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60)
            assert r.status_code == 400 and "session_params.offset" in r.text, r.text
    finally:
        eng.stop()
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    # every episode has 3 turns: turns 2 and 3 continue the kept cache
    assert sum(len(e.turns) - 1 for e in got) >= len(continued) >= len(TASKS), continued


def test_session_params_parsing():
    """``session_params``: ``{"id": str}`` continues a session; SGLang's other fields must be
    unset; batched bodies and ``n > 1`` are refused; each error names the field."""
    from cascade_jax.rollout import sglang_api as api

    def parse(**body):
        return api.parse_generate({"input_ids": [1, 2], **body}, vocab_size=512,
                                  context_length=64, new_rid=lambda: "r")[0]

    assert parse(session_params={"id": "ep3"})[0].session == "ep3"
    assert parse(session_params={"id": "ep3", "rid": None, "replace": False})[0].session == "ep3"
    assert parse()[0].session is None
    for bad, field in (({"id": ""}, r"session_params\.id"), ({"id": 3}, r"session_params\.id"),
                       ({"id": "a", "offset": 1}, r"session_params\.offset"),
                       ({"id": "a", "bogus": 1}, r"session_params\.bogus"), ("a", r"session_params")):
        with pytest.raises(api.RequestError, match=field):
            parse(session_params=bad)
    with pytest.raises(api.RequestError, match=r"session_params.*needs n = 1"):
        parse(session_params={"id": "a"}, sampling_params={"n": 2})
    with pytest.raises(api.RequestError, match=r"session_params.*batched"):
        api.parse_generate({"input_ids": [[1, 2], [3]], "session_params": {"id": "a"}},
                           vocab_size=512, context_length=64, new_rid=lambda: "r")
    body = api.encode_generate([1, 2], SamplingParams(max_new_tokens=2), rid="r", session="ep3")
    assert body["session_params"] == {"id": "ep3"}
    assert "session_params" not in api.encode_generate([1, 2], SamplingParams(max_new_tokens=2), rid="r")
