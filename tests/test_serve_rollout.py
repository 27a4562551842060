"""Acceptance: two real ``launch/serve.py`` processes from an exported tiny fp32 checkpoint, the
real ``sglang-router`` in front of them, and this process as the trainer (HTTP client, weight
syncs, reference log-probs).

Tolerance: server log-probs (decode path and teacher-forced scoring) equal the trainer's
recomputation (``weight_sync.reference_logprobs``: the full forward + chunked log-softmax)
within ``TOL = 1e-4`` max |Δ log p| in fp32.

The servers start once per module (the first fills a JAX compilation cache the second and the
restarted one read); tests run in file order and the weight version advances through them:
"0" (export) -> "1" (NCCL over gloo) -> "2", "3", "4" (disk) -> the kill -9 test.
"""

from __future__ import annotations

import threading
import time
import types

import httpx
import numpy as np
import pytest
from safetensors import safe_open

from cascade_jax.rollout import Request, RolloutError, SamplingParams
from cascade_jax.rollout.client import ServedTeachers, ServerClient
from cascade_jax.rollout.launcher import Launcher, free_port, router_command, serve_command, wait_healthy
from cascade_jax.rollout.weight_sync import DiskWeightSync, NcclWeightSync, reference_logprobs, write_version
from models import nemotron_h as nh
from tests.runner_support import Child
from tests.serve_support import serve_env, tiny_fp32

KEY = "test-key"
TOL = 1e-4
SERVER_FLAGS = ["--num-slots", "4", "--max-len", "32", "--prompt-buckets", "16", "--prefill-sizes", "4",
                "--steps-per-call", "4"]
PROMPTS = [(3, 17, 42, 7), (101, 5), (9, 9, 9, 200, 311, 12), (64,)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = nh.preset("tiny")
    params = {0: tiny_fp32(0)}
    ck0 = write_version(params[0], cfg, root / "initial", "0")
    # the shared persistent compilation cache: the first server fills it, the second and the
    # restarted one read it
    launcher = Launcher(serve_command(extra=SERVER_FLAGS), n=2, checkpoint=str(ck0), weight_version="0",
                        api_key=KEY, env=serve_env(), log_dir=str(root / "logs"), health_timeout_s=300)
    router = client = None
    try:
        launcher.start(sequential=True)
        rport = free_port()
        router = Child(router_command(launcher.urls, port=rport, prometheus_port=free_port(), api_key=KEY),
                       None, log=root / "logs" / "router.log")
        router_url = f"http://127.0.0.1:{rport}"
        wait_healthy(router_url, timeout_s=60, api_key=KEY, proc=router.p, log=root / "logs" / "router.log")
        client = ServerClient(launcher.urls, api_key=KEY, max_concurrency=4, timeout_s=120, backoff_s=0.1)
        yield types.SimpleNamespace(cfg=cfg, params=params, launcher=launcher, client=client, root=root,
                                    router_url=router_url, current=["0"])
    finally:
        if client is not None:
            client.close()
        if router is not None:
            router.stop()
        launcher.stop()


def _requests(max_new=8, n=2, temperature=1.0, seed0=100):
    return [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=max_new, n=n, temperature=temperature,
                                                          seed=seed0 + i), rid=f"r{seed0}-{i}")
            for i, p in enumerate(PROMPTS)]


def _check_against_trainer(rollouts, params, cfg, version):
    """Every sample's log-probs (T = 1) equal the trainer's recomputation; versions right."""
    samples = rollouts.samples()
    ref = reference_logprobs(params, cfg, [s.prompt_ids for s in samples], [s.response_ids for s in samples])
    err = max(float(np.max(np.abs(s.logprobs - r))) for s, r in zip(samples, ref))
    assert err <= TOL, f"sampling log-probs differ from the trainer's by {err}"
    assert {s.weight_version for s in samples} == {version}
    return err


def _post(url, path, body=None, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers=headers, timeout=60)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


# ----------------------------------------------------------------------------------------------


def test_generate_direct_matches_trainer_and_groups(stack):
    r = stack.client.generate(_requests())
    assert [len(g) for g in r.groups] == [2] * len(PROMPTS)
    for req, g in zip(r.requests, r.groups):
        for s in g:
            assert tuple(s.prompt_ids) == req.prompt_ids and len(s.response_ids) == 8
            assert s.finish_reason == "length"
        assert not np.array_equal(g[0].response_ids, g[1].response_ids)  # distinct seeds per sample
    _check_against_trainer(r, stack.params[0], stack.cfg, "0")
    again = stack.client.generate(_requests())  # seeded: reproducible on whichever server
    for a, b in zip(r.samples(), again.samples()):
        np.testing.assert_array_equal(a.response_ids, b.response_ids)


def test_sglang_layout_of_one_body(stack):
    """n-grouping, triples, the leading null of input_token_logprobs, stop finish."""
    url = stack.launcher.urls[0]
    body = {"input_ids": [[5, 6, 7], [8, 9]], "return_logprob": True, "logprob_start_len": 0, "rid": ["a", "b"],
            "sampling_params": {"max_new_tokens": 5, "n": 3, "temperature": 0.0}}
    out = _post(url, "/generate", body).json()
    assert isinstance(out, list) and len(out) == 6
    assert [o["meta_info"]["id"] for o in out] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    for o, prompt in zip(out, [[5, 6, 7]] * 3 + [[8, 9]] * 3):
        m = o["meta_info"]
        assert m["input_token_logprobs"][0][0] is None and [t[1] for t in m["input_token_logprobs"]] == prompt
        assert [t[1] for t in m["output_token_logprobs"]] == o["output_ids"]
        assert m["completion_tokens"] == 5 and m["prompt_tokens"] == len(prompt) and m["weight_version"] == "0"
    assert out[0]["output_ids"] == out[1]["output_ids"]  # greedy
    ref = reference_logprobs(stack.params[0], stack.cfg, [[5]], [[6, 7] + out[0]["output_ids"]])[0]
    got = [t[0] for t in out[0]["meta_info"]["input_token_logprobs"][1:]] + \
          [t[0] for t in out[0]["meta_info"]["output_token_logprobs"]]
    np.testing.assert_allclose(got, ref, atol=TOL)
    stop = out[0]["output_ids"][2]
    o = _post(url, "/generate", {"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 5, "temperature": 0.0, "stop_token_ids": [stop]}}).json()
    assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert o["output_ids"][-1] == stop and len(o["output_ids"]) <= 3


def test_score_matches_trainer(stack):
    prompts, responses = [(1, 2, 3), (7,), (300, 301, 302, 303)], [(4, 5, 6, 7), (8, 9), (10,)]
    got = stack.client.score(prompts, responses)
    ref = reference_logprobs(stack.params[0], stack.cfg, prompts, responses)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=TOL)


def test_served_teachers_route_by_domain(stack):
    """MOPD teachers behind servers: each sample scored by its domain's server, teacher-forced."""
    a, b = stack.launcher.urls
    teachers = ServedTeachers({"math": a, "code": b, "mcq": a}, api_key=KEY, timeout_s=120)
    try:
        reqs = [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=4, n=2, seed=i), domain=d)
                for i, (p, d) in enumerate(zip(PROMPTS, ["math", "code", "mcq", "code"]))]
        rollouts = stack.client.generate(reqs)
        got = teachers.score(rollouts)
        samples = rollouts.samples()
        ref = reference_logprobs(stack.params[0], stack.cfg, [s.prompt_ids for s in samples],
                                 [s.response_ids for s in samples])
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, atol=TOL)
        with pytest.raises(ValueError, match="swe"):
            teachers.score(stack.client.generate([Request(prompt_ids=(1,), sampling=SamplingParams(max_new_tokens=1),
                                                          domain="swe")]))
        # top-K (MOPD's forward-KL term) through SGLang's input_top_logprobs: the same log-probs,
        # and each response position's 4 most likely tokens of the trainer's full distribution
        top = teachers.score(rollouts, topk=4)
        for t, g, smp in zip(top, got, samples):
            np.testing.assert_allclose(t.logp, g, atol=TOL)
            want_ids, want_lp = _reference_topk(stack.params[0], stack.cfg, smp, 4)
            np.testing.assert_array_equal(t.topk_ids, want_ids)
            np.testing.assert_allclose(t.topk_logp, want_lp, atol=TOL)
    finally:
        teachers.close()


def _reference_topk(params, cfg, sample, k):
    """The top ``k`` of ``log_softmax`` of the model's logits (fp64 softmax, numpy) at each
    response token's prefix."""
    seq = np.concatenate([sample.prompt_ids, sample.response_ids]).astype(np.int32)
    z = np.asarray(nh.hidden_states(params, seq[None], cfg)[0] @ params["lm_head"], np.float64)
    ls = z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1))[:, None]
    P, R = len(sample.prompt_ids), len(sample.response_ids)
    ls = ls[P - 1:P + R - 1]
    ids = np.argsort(-ls, -1)[:, :k]
    return ids, np.take_along_axis(ls, ids, -1)


def test_router_forwards_generate_broadcasts_flush_and_404s_updates(stack):
    via = ServerClient(stack.launcher.urls, router_url=stack.router_url, api_key=KEY, max_concurrency=2,
                       timeout_s=120)
    try:
        direct = stack.client.generate(_requests(seed0=500))
        routed = via.generate(_requests(seed0=500))
        for a, b in zip(direct.samples(), routed.samples()):
            np.testing.assert_array_equal(a.response_ids, b.response_ids)
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL)
        np.testing.assert_allclose(via.score([(1, 2)], [(3, 4)])[0], stack.client.score([(1, 2)], [(3, 4)])[0],
                                   atol=TOL)
    finally:
        via.close()
    assert _post(stack.router_url, "/flush_cache").status_code == 200
    r = _post(stack.router_url, "/update_weights_from_disk", {"model_path": "/nowhere", "weight_version": "9"})
    assert r.status_code == 404
    assert stack.client.versions() == {u: "0" for u in stack.launcher.urls}


def test_bad_requests_are_4xx_naming_the_field_and_the_server_survives(stack):
    url = stack.launcher.urls[1]
    assert _post(url, "/generate", {"input_ids": [1]}, key=None).status_code == 401
    assert _post(url, "/generate", {"input_ids": [1]}, key="wrong").status_code == 401
    assert httpx.get(url + "/get_weight_version").status_code == 401
    assert httpx.post(url + "/update_weights_from_disk", json={"model_path": "x"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # probes stay open, as in SGLang
    cases = [
        (None, b'{"input_ids": [1, 2', "body"),
        ({"input_ids": "abc"}, None, "input_ids"),
        ({"input_ids": [1, -3]}, None, "input_ids[1]"),
        ({"input_ids": [1, 99999]}, None, "input_ids[1]"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, None, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10 ** 12}}, None, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": "8"}}, None, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, None, "temperature"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, None, "top_p"),
        ({"input_ids": [1], "sampling_params": {"n": 10 ** 9}}, None, "n"),
        ({"input_ids": [1], "sampling_params": {"bogus": 1}}, None, "bogus"),
        ({"input_ids": list(range(40))}, None, "input_ids"),
        ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, None, "logprob_start_len"),
        ({"text": "hello"}, None, "text"),
        ([1, 2, 3], None, "body"),
    ]
    for body, raw, field in cases:
        r = _post(url, "/generate", body, raw=raw)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert field in r.json()["error"]["message"], (field, r.text)
    r = _post(url, "/update_weights_from_disk", {"model_path": 5, "weight_version": "9"})
    assert r.status_code == 400 and "model_path" in r.text
    r = _post(url, "/pause_generation", {"mode": "sideways"})
    assert r.status_code == 400 and "mode" in r.text
    assert httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url + "/health_generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).status_code == 200
    assert stack.client.generate(_requests(max_new=2, n=1))  # still serving


def test_nccl_sync_over_gloo(stack):
    before = stack.client.generate(_requests(temperature=0.0, n=1))
    stack.params[1] = tiny_fp32(1)
    sync = NcclWeightSync(stack.client, stack.cfg, backend="gloo", tol=TOL, timeout_s=180,
                          bucket_bytes=256 << 10)
    try:
        sync.update(stack.params[1], "1")
        assert stack.client.versions() == {u: "1" for u in stack.launcher.urls}
        assert sync.last_error <= TOL
    finally:
        sync.close()
    stack.current[0] = "1"
    after = stack.client.generate(_requests(temperature=0.0, n=1))
    _check_against_trainer(after, stack.params[1], stack.cfg, "1")
    assert any(not np.array_equal(a.response_ids, b.response_ids) for a, b in zip(before.samples(), after.samples()))


def test_disk_sync_versions_keep_k_and_no_stale_state(stack):
    sync = DiskWeightSync(stack.client, stack.cfg, stack.root / "versions", keep=2, tol=TOL, timeout_s=120,
                          launcher=stack.launcher)
    seeded = _requests(seed0=900)
    old = stack.client.generate(seeded)
    for k in (2, 3, 4):
        stack.params[k] = tiny_fp32(k)
        sync.update(stack.params[k], str(k))
        assert stack.client.versions() == {u: str(k) for u in stack.launcher.urls}
        new = stack.client.generate(seeded)  # same prompts and seeds as before the update
        _check_against_trainer(new, stack.params[k], stack.cfg, str(k))
        assert any(not np.array_equal(a.response_ids, b.response_ids) for a, b in zip(old.samples(), new.samples()))
        old = new
    stack.current[0] = "4"
    assert sorted(p.name for p in (stack.root / "versions").iterdir()) == ["v3", "v4"]  # keep = 2
    assert sync.layout == "params"  # our servers: no transposes on either side
    with safe_open(stack.root / "versions" / "v4" / "model.safetensors", "numpy") as f:
        assert f.metadata()["layout"] == nh.PARAMS_LAYOUT
    with pytest.raises(RolloutError, match="'4'"):
        sync.update(stack.params[4], "4")  # unchanged version
    with pytest.raises(RolloutError, match="'3'"):
        sync.update(stack.params[3], "3")  # backwards


def test_corrupt_or_missing_update_is_refused_and_old_weights_keep_serving(stack):
    url = stack.launcher.urls[0]
    bad = stack.root / "bad"
    write_version(tiny_fp32(7), stack.cfg, bad, "7")
    f = bad / "v7" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    for path in (bad / "v7", stack.root / "missing"):
        r = _post(url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": "7"})
        assert r.status_code == 400 and r.json()["success"] is False and str(path) in r.json()["message"]
    assert stack.client.versions() == {u: stack.current[0] for u in stack.launcher.urls}
    probe = [(11, 12, 13)], [(14, 15, 16)]
    got = stack.client.score_with_version(*probe, urls=[url])
    ref = reference_logprobs(stack.params[int(stack.current[0])], stack.cfg, *probe)
    np.testing.assert_allclose(got[0][0], ref[0], atol=TOL)
    assert got[1] == [stack.current[0]]


def test_kill9_mid_generation_fails_over_then_restarts(stack):
    reqs = _requests(max_new=24, n=2, seed0=4000) * 3
    reqs = [Request(prompt_ids=r.prompt_ids, sampling=r.sampling, rid=f"k{i}") for i, r in enumerate(reqs)]
    expected = stack.client.generate(reqs)  # undisturbed, for comparison (also compiles the servers)
    retries0 = stack.client.stats["retries"]
    result = {}
    # server 0 holds the requests it gets (paused in place), so the kill surely lands on requests in
    # flight: its own /v1/loads says when it has some, instead of a guessed delay
    assert _post(stack.launcher.urls[0], "/pause_generation", {"mode": "in_place"}).status_code == 200
    t = threading.Thread(target=lambda: result.setdefault("r", stack.client.generate(reqs)))
    t.start()
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        load = httpx.get(stack.launcher.urls[0] + "/v1/loads", headers=headers, timeout=10).json()["loads"][0]
        if load["num_running_reqs"] + load["num_waiting_reqs"] > 0:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("server 0 never reported requests in flight")
    stack.launcher.kill(0)
    t.join(240)
    assert not t.is_alive()
    got = result["r"]
    assert stack.client.stats["retries"] > retries0  # the kill hit requests in flight
    assert [len(g) for g in got.groups] == [2] * len(reqs)  # none lost, none twice
    for a, b in zip(expected.samples(), got.samples()):  # same seeds -> the same samples
        np.testing.assert_array_equal(a.response_ids, b.response_ids)
    deadline = time.monotonic() + 240
    while stack.launcher.restarts < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    wait_healthy(stack.launcher.urls[0], timeout_s=max(1.0, deadline - time.monotonic()), api_key=KEY)
    assert not stack.launcher.errors
    # the restarted server loads the last pushed version, with its label
    assert stack.client.versions() == {u: stack.current[0] for u in stack.launcher.urls}
    again = stack.client.generate(reqs[:4])
    _check_against_trainer(again, stack.params[int(stack.current[0])], stack.cfg, stack.current[0])
