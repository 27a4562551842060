"""``launch/serve.py`` driven the way the SGLang clients of slime, verl and AReaL drive an SGLang
0.5.23 server: one real server process (tiny fp32 checkpoint with the tiny tokenizer, routed
experts enabled), real ``httpx`` / ``aiohttp`` clients, request bodies and reply fields as those
clients write and read them.

The expected shapes are written here from SGLang 0.5.23's source (``managers/io_struct.py``,
``entrypoints/http_server.py``, ``layers/moe/routed_experts_capturer.py``), never read from the
server's own field lists. Reference numerics: the trainer's forward (``nh.forward`` logits,
``weight_sync.reference_logprobs``), fp32, max |Δ log p| <= ``TOL``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cascade_jax.data.tokenizer import write_tiny_tokenizer
from cascade_jax.rollout.launcher import free_port
from cascade_jax.rollout.weight_sync import TorchPeer, buckets, reference_logprobs, write_version
from models import nemotron_h as nh
from tests.serve_support import served, tiny_fp32

TOL = 1e-4
FLAGS = ["--num-slots", "2", "--max-len", "288", "--prompt-buckets", "32,256", "--prefill-sizes", "2",
         "--steps-per-call", "4", "--enable-return-routed-experts"]
PROMPT = [3, 17, 42, 7, 101, 5]

# SGLang 0.5.23: ServerArgs fields slime's external-engine mode and verl read from /server_info
SGLANG_SERVER_ARGS = ("model_path", "tp_size", "dp_size", "pp_size", "ep_size", "enable_memory_saver",
                      "context_length", "max_running_requests", "skip_tokenizer_init", "random_seed",
                      "enable_return_routed_experts", "weight_version")
# io_struct.GetLoadsReqOutput core fields + v1_loads' num_total_reqs; the reply's top level
LOAD_FIELDS = ("dp_rank", "timestamp", "num_running_reqs", "num_waiting_reqs", "num_used_tokens",
               "max_total_num_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization",
               "max_running_requests", "num_total_reqs")
LOADS_TOP = ("timestamp", "version", "dp_rank_count", "loads", "aggregate")
AGGREGATE = ("total_running_reqs", "total_waiting_reqs", "total_reqs", "total_used_tokens", "total_tokens",
             "avg_token_usage", "avg_throughput", "avg_utilization")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang-clients")
    cfg = nh.preset("tiny")
    params = {0: tiny_fp32(0)}
    ck = write_version(params[0], cfg, root, "0")
    write_tiny_tokenizer(ck)
    with served(ck, FLAGS, log=root / "server.log") as s:
        yield type("S", (), dict(url=s.url, cfg=cfg, params=params, root=root, log=s.log, proc=s.proc, ckpt=ck))


def _padded(seq, n=32):
    """``seq`` right-padded to ``n`` (one compiled forward for every test; causal, so the
    positions of ``seq`` do not see the padding)."""
    assert len(seq) <= n
    return jnp.asarray([list(seq) + [0] * (n - len(seq))])


def _routing_ref(params, cfg, seq):
    """The trainer's experts of ``seq[:-1]``: ``[len - 1, L_moe, K]``."""
    return np.asarray(nh.forward(params, _padded(seq), cfg, return_routed_experts=True)[1][0])[:len(seq) - 1]


def _decode_routed_sglang(meta, seq_len, hf):
    """SGLang's own formula (``extract_routed_experts_from_meta_info`` + the shape its capturer
    allocates): int32 ``[seqlen - 1, num_hidden_layers, num_experts_per_tok]``."""
    flat = np.frombuffer(base64.b64decode(meta["routed_experts"].encode("utf-8")), dtype=np.int32)
    return flat.reshape(seq_len - 1, hf["num_hidden_layers"], hf["num_experts_per_tok"])


# ----------------------------------------------------------------------------------------------


def test_ready_line_and_server_info(server):
    text = server.log.read_text()
    assert f"ready: serving {server.url}" in text and "compiling before serving" in text
    info = httpx.get(server.url + "/server_info").json()
    for k in SGLANG_SERVER_ARGS:
        assert k in info, k
    assert (info["tp_size"], info["dp_size"], info["pp_size"], info["ep_size"]) == (1, 1, 1, 1)
    assert info["enable_memory_saver"] is True and info["enable_return_routed_experts"] is True
    assert info["context_length"] == 288 and info["max_running_requests"] == 2
    assert "api_key" not in info or info["api_key"] is None
    assert httpx.get(server.url + "/get_server_info").json()["tp_size"] == 1
    from cascade_jax.rollout import RolloutError, ServerClient
    with ServerClient([server.url]) as c:  # what a zero-mismatch stage checks at start
        c.check_server_args(zero_mismatch=False, context_length=288)
        with pytest.raises(RolloutError, match="zero_mismatch is False, expected True"):
            c.check_server_args(zero_mismatch=True, context_length=288)


def test_slime_style_generate_with_routed_experts_and_custom_params(server):
    """slime's ``generate``: token ids, its sampling params (``custom_params`` since top_p != 1,
    ``no_stop_trim``, special-token flags), ``return_logprob`` and ``return_routed_experts``;
    tokens and log-probs read from ``output_token_logprobs``; experts decoded with SGLang's
    formula and reshaped the way slime does."""
    hf = server.cfg.to_hf_dict()
    payload = {"input_ids": PROMPT, "return_logprob": True, "return_routed_experts": True,
               "sampling_params": {"temperature": 1.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 10,
                                   "stop": None, "stop_token_ids": None, "skip_special_tokens": False,
                                   "no_stop_trim": True, "spaces_between_special_tokens": False,
                                   "custom_params": {"return_top_p_token_ids": True}, "sampling_seed": 7}}

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            r = await c.post(server.url + "/generate", json=payload)
            return r.status_code, r.json()
    status, out = asyncio.run(run())
    assert status == 200, out
    meta = out["meta_info"]
    tokens = [t[1] for t in meta["output_token_logprobs"]]
    lps = [t[0] for t in meta["output_token_logprobs"]]
    assert tokens == out["output_ids"] and len(tokens) == 10 == meta["completion_tokens"]
    assert meta["finish_reason"] == {"type": "length", "length": 10} and meta["weight_version"] == "0"
    assert isinstance(out["text"], str) and out["text"]  # the checkpoint has a tokenizer
    seq = PROMPT + tokens
    rx = _decode_routed_sglang(meta, len(seq), hf)
    assert rx.size == (len(seq) - 1) * hf["num_hidden_layers"] * hf["num_experts_per_tok"]
    moe = [i for i, c in enumerate(hf["hybrid_override_pattern"]) if c == "E"]
    want = _routing_ref(server.params[0], server.cfg, seq)
    np.testing.assert_array_equal(np.sort(rx[:, moe], -1), np.sort(want, -1))
    assert not rx[:, [i for i in range(hf["num_hidden_layers"]) if i not in moe]].any()
    # sampling log-probs at T = 1 (top-p is not renormalised): the trainer's within TOL
    ref = reference_logprobs(server.params[0], server.cfg, [PROMPT], [tokens])[0]
    np.testing.assert_allclose(lps, ref, atol=TOL)


def test_slime_style_streaming_is_cumulative_and_matches_one_shot(server):
    """slime's streaming rollout: ``stream: true``, ``data:`` lines parsed as they come, each
    chunk cumulative (``output_token_logprobs`` so far), ``finish_reason`` only at the end,
    ``[DONE]`` last; the final chunk equals the one-shot reply with the same seed."""
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 200, "temperature": 1.0, "sampling_seed": 11}}
    chunks, done = [], False
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                continue
            assert not done
            chunks.append(json.loads(data))
    assert done and len(chunks) >= 2, len(chunks)
    final = chunks[-1]
    assert final["meta_info"]["finish_reason"] == {"type": "length", "length": 200}
    toks = [t[1] for t in final["meta_info"]["output_token_logprobs"]]
    for c in chunks[:-1]:
        assert c["meta_info"]["finish_reason"] is None
        part = [t[1] for t in c["meta_info"]["output_token_logprobs"]]
        assert part == toks[:len(part)] and c["output_ids"] == part  # cumulative prefixes
    one = httpx.post(server.url + "/generate", json=body, timeout=300).json()
    assert one["output_ids"] == toks
    np.testing.assert_allclose([t[0] for t in one["meta_info"]["output_token_logprobs"]],
                               [t[0] for t in final["meta_info"]["output_token_logprobs"]], atol=1e-6)
    # n = 2: every chunk carries its sample's ``index``; the last chunk of each equals the list reply
    group = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 8, "n": 2, "sampling_seed": 5}}
    last = {}
    with httpx.stream("POST", server.url + "/generate", json={**group, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                c = json.loads(line[5:])
                last[c["index"]] = c
    listed = httpx.post(server.url + "/generate", json=group, timeout=300).json()
    assert sorted(last) == [0, 1] and [last[i]["output_ids"] for i in (0, 1)] == [o["output_ids"] for o in listed]


def test_project_client_asks_for_and_decodes_routed_experts(server):
    """``ServerClient(routed_experts=model_cfg)`` (what ``rollout.fidelity.routing_replay`` builds for a
    served engine): each sample carries ``routed_experts [P + R - 1, L_moe, K]``, the trainer's
    routing of its tokens (as top-k sets)."""
    from cascade_jax.rollout import Request, SamplingParams, ServerClient
    with ServerClient([server.url], routed_experts=server.cfg, timeout_s=300) as c:
        r = c.generate([Request(prompt_ids=tuple(PROMPT), sampling=SamplingParams(max_new_tokens=5, n=2, seed=1))])
    for s in r.samples():
        seq = PROMPT + [int(t) for t in s.response_ids]
        assert s.routed_experts.shape == (len(seq) - 1, server.cfg.pattern.count("E"), server.cfg.num_experts_per_tok)
        np.testing.assert_array_equal(np.sort(s.routed_experts, -1),
                                      np.sort(_routing_ref(server.params[0], server.cfg, seq), -1))


def test_verl_style_top_logprobs_and_loads(server):
    """verl's adapter: a body with None-valued fields filtered out, ``top_logprobs_num``,
    ``logprob_start_len`` 0. SGLang's layout: ``output_top_logprobs`` one list per output token
    of ``[logprob, token_id, text]`` (best first), ``input_top_logprobs`` one per prompt
    position with None first. Values: the trainer's log_softmax (T = 1) within TOL."""
    k = 4
    payload = {"sampling_params": {"max_new_tokens": 6, "temperature": 0.0}, "input_ids": PROMPT,
               "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": k}

    async def run():
        import aiohttp
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/generate", json=payload) as r:
                return r.status, await r.json()
    status, out = asyncio.run(run())
    assert status == 200, out
    meta = out["meta_info"]
    seq = PROMPT + out["output_ids"]
    logits = np.asarray(nh.forward(server.params[0], _padded(seq), server.cfg)[0], np.float64)[:len(seq)]
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    assert len(meta["output_top_logprobs"]) == len(out["output_ids"])
    for j, (entry, chosen) in enumerate(zip(meta["output_top_logprobs"], meta["output_token_logprobs"])):
        pos = len(PROMPT) - 1 + j
        assert len(entry) == k and all(len(e) == 3 for e in entry)
        ids = [e[1] for e in entry]
        assert ids[0] == chosen[1]  # greedy: the chosen token is the best
        np.testing.assert_allclose([e[0] for e in entry], ref[pos, ids], atol=TOL)
        assert sorted(ids, key=lambda t: -ref[pos, t]) == ids or np.ptp(ref[pos, ids]) < TOL
        np.testing.assert_allclose(entry[0][0], chosen[0], atol=TOL)
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(PROMPT)
    for p, entry in enumerate(meta["input_top_logprobs"][1:], start=1):
        np.testing.assert_allclose([e[0] for e in entry], ref[p - 1, [e[1] for e in entry]], atol=TOL)
    loads = httpx.get(server.url + "/v1/loads").json()
    assert set(LOADS_TOP) <= set(loads) and loads["dp_rank_count"] == 1
    assert set(LOAD_FIELDS) <= set(loads["loads"][0]) and set(AGGREGATE) <= set(loads["aggregate"])
    assert loads["loads"][0]["max_running_requests"] == 2
    r = httpx.get(server.url + "/v1/loads", params={"include": "core,bogus"})
    assert r.status_code == 400 and "include" in r.text


def test_verl_style_release_and_resume_memory(server):
    """verl / slime colocated flow: release (``{}``: everything) -> generation refused -> resume
    weights, then the cache (two steps, as slime) -> the same greedy output as before."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0.0}}
    before = httpx.post(server.url + "/generate", json=body, timeout=300).json()["output_ids"]
    r = httpx.post(server.url + "/release_memory_occupation", json={}, timeout=300)
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    freed = r.json()["bytes"]
    wbytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(server.params[0]))
    assert freed["weights"] == wbytes and freed["kv_cache"] > 0 and "MiB" in r.json()["message"]
    g = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert g.status_code == 503 and "resume_memory_occupation" in g.text
    mem = httpx.get(server.url + "/v1/loads", params={"include": "memory"}).json()["loads"][0]["memory"]
    assert mem["weight_gb"] == 0 and mem["kv_cache_gb"] == 0
    r = httpx.post(server.url + "/resume_memory_occupation", json={"tags": ["weights"]}, timeout=300)
    assert r.status_code == 200 and r.json()["bytes"] == {"weights": wbytes} and r.json()["released"] == ["kv_cache"]
    r = httpx.post(server.url + "/resume_memory_occupation", json={"tags": ["kv_cache"]}, timeout=300)
    assert r.status_code == 200 and r.json()["released"] == []
    assert httpx.post(server.url + "/generate", json=body, timeout=300).json()["output_ids"] == before
    r = httpx.post(server.url + "/release_memory_occupation", json={"tags": ["gpu"]})
    assert r.status_code == 400 and "tags[0]" in r.text


def test_update_weights_from_tensor_is_refused_naming_the_supported_formats(server):
    """verl's colocated push: ``serialized_named_tensors`` (one per TP rank), ``load_format``,
    ``flush_cache``. The JAX server cannot open torch IPC handles: 400, the message names the
    endpoints it loads from, and it keeps serving."""
    r = httpx.post(server.url + "/update_weights_from_tensor",
                   json={"serialized_named_tensors": ["gASV"], "load_format": "flattened_bucket",
                         "flush_cache": True})
    assert r.status_code == 400 and r.json()["success"] is False
    assert "update_weights_from_disk" in r.json()["message"] and "serialized_named_tensors" in r.json()["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_areal_style_request_and_versionless_disk_update(server):
    """AReaL's request: ``image_data: []`` with token ids and ``stream: false`` (accepted;
    non-empty images refused naming the field). A disk update without ``weight_version`` (SGLang
    keeps the label) serves the new weights; then one with a version relabels."""
    body = {"input_ids": PROMPT, "image_data": [], "stream": False, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                "stop_token_ids": [0], "ignore_eos": False, "sampling_seed": 3}}
    r = httpx.post(server.url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    bad = httpx.post(server.url + "/generate", json={**body, "image_data": ["https://x/cat.png"]})
    assert bad.status_code == 400 and "image_data" in bad.json()["error"]["message"]
    server.params[1] = tiny_fp32(1)
    path = write_version(server.params[1], server.cfg, server.root / "versions", "1")
    before = httpx.get(server.url + "/get_weight_version").json()["weight_version"]  # earlier tests' label
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(path),
                                                                  "abort_all_requests": True}, timeout=300)
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == before  # kept
    out = httpx.post(server.url + "/generate", json=body, timeout=300).json()
    toks = [t[1] for t in out["meta_info"]["output_token_logprobs"]]
    ref = reference_logprobs(server.params[1], server.cfg, [PROMPT], [toks])[0]
    np.testing.assert_allclose([t[0] for t in out["meta_info"]["output_token_logprobs"]], ref, atol=TOL)
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(path), "weight_version": "1"},
                   timeout=300)
    assert r.status_code == 200 and httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "1"


def test_multi_bucket_distributed_update_loads_each_bucket_as_it_arrives(server):
    """slime's NCCL path over gloo: ``master_port`` as a string, then several single-dtype
    flattened buckets, each with the same ``weight_version``. After the first bucket the server
    already serves the new label and partly new weights; after the last one exactly the new
    weights (the trainer's log-probs within TOL)."""
    cfg = server.cfg
    server.params[2] = new = tiny_fp32(2)
    parts = list(buckets(new, cfg, 64 << 10))
    assert len(parts) >= 3
    port = free_port()
    peer = TorchPeer(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2, backend="gloo", timeout_s=120)
    probe_p, probe_r = [PROMPT], [[9, 8, 7, 6]]
    score = {"input_ids": PROMPT + probe_r[0], "return_logprob": True, "logprob_start_len": 0,
             "sampling_params": {"max_new_tokens": 0}}

    def served():
        out = httpx.post(server.url + "/generate", json=score, timeout=300).json()
        return np.asarray([t[0] for t in out["meta_info"]["input_token_logprobs"][len(PROMPT):]])
    before = served()
    try:
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("r", httpx.post(
            server.url + "/init_weights_update_group",
            json={"master_address": "127.0.0.1", "master_port": str(port), "rank_offset": 1, "world_size": 2,
                  "group_name": "weight_update_group", "backend": "gloo"}, timeout=120)))
        t.start()
        peer.wait_ready()
        t.join(120)
        assert res["r"].status_code == 200 and res["r"].json()["success"] is True, res["r"].text
        for i, (dt, items) in enumerate(parts):
            body = {"names": [n for n, _, _ in items], "dtypes": [dt] * len(items),
                    "shapes": [list(s) for _, s, _ in items], "group_name": "weight_update_group",
                    "load_format": "flattened_bucket", "flush_cache": i == len(parts) - 1, "weight_version": "2"}
            t = threading.Thread(target=lambda b=body: res.__setitem__("u", httpx.post(
                server.url + "/update_weights_from_distributed", json=b, timeout=300)))
            t.start()
            peer.broadcast(dt, sum(int(np.prod(s)) for _, s, _ in items),
                           np.concatenate([np.ascontiguousarray(a).reshape(-1) for _, _, a in items]))
            t.join(300)
            assert res["u"].status_code == 200 and res["u"].json()["success"] is True, res["u"].text
            if i == 0:
                assert httpx.get(server.url + "/get_weight_version").json()["weight_version"] == "2"
                assert np.max(np.abs(served() - before)) > 1e-3  # the first bucket is already in use
        np.testing.assert_allclose(served(), reference_logprobs(new, cfg, probe_p, probe_r)[0], atol=TOL)
    finally:
        httpx.post(server.url + "/destroy_weights_update_group", json={"group_name": "weight_update_group"},
                   timeout=60)
        peer.close()


def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server):
    cases = [({"input_ids": PROMPT, "stream": "yes"}, "stream"),
             ({"input_ids": PROMPT, "sampling_params": {"custom_params": [1]}}, "custom_params"),
             ({"input_ids": PROMPT, "return_logprob": True, "top_logprobs_num": 10 ** 6}, "top_logprobs_num"),
             ({"input_ids": PROMPT, "video_data": ["v.mp4"]}, "video_data")]
    for body, field in cases:
        r = httpx.post(server.url + "/generate", json=body)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    r = httpx.post(server.url + "/init_weights_update_group",
                   json={"master_address": "127.0.0.1", "master_port": "http", "rank_offset": 1, "world_size": 2})
    assert r.status_code == 400 and "master_port" in r.text
    r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": "/nowhere", "weight_version": 3})
    assert r.status_code == 400 and "weight_version" in r.text
    current = httpx.get(server.url + "/get_weight_version").json()["weight_version"]
    assert current.isdigit()
    r = httpx.post(server.url + "/update_weights_from_disk",  # integer labels never go backwards
                   json={"model_path": str(server.ckpt), "weight_version": str(int(current) - 1)}, timeout=300)
    assert r.status_code == 400 and "weight_version" in r.text
    ok = httpx.post(server.url + "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}},
                    timeout=300)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 2


def test_bad_checkpoint_is_one_error_line_with_exit_code_5(tmp_path):
    """README: bad input ends in one ``error: ...`` line with exit code 5 for a checkpoint."""
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "launch/serve.py", "--checkpoint", str(bad), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 5, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --checkpoint") and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "launch/serve.py", "--checkpoint", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 3 and p.stderr.startswith("error: --checkpoint"), p.stderr
    assert time.monotonic() - t0 < 120
