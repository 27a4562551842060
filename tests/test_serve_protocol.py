"""The pieces of the served rollout path that need no server: SGLang 0.5.23 bodies and replies,
bucketing and the torch.distributed peer (real processes over gloo), atomic versioned exports,
Hub tensors <-> params, and the config -> client + syncer constructor."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.rollout import RolloutError, SamplingParams, ServerClient
from cascade_jax.rollout import sglang_api as api
from cascade_jax.rollout.factory import make_engine
from cascade_jax.rollout.launcher import free_port
from cascade_jax.rollout.weight_sync import (DTYPE_NAMES, DiskWeightSync, NcclWeightSync, TorchPeer, buckets,
                                             write_version)
from models import nemotron_h as nh


@pytest.fixture(scope="module")
def tiny():
    cfg = nh.preset("tiny")
    return cfg, nh.init_params(cfg, jax.random.key(0))  # bf16 leaves + fp32 A_log / D / bias


def test_client_bodies_use_only_sglang_fields():
    sp = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(2,), n=4, seed=11)
    bodies = [api.encode_generate((1, 2, 3), sp, rid=f"r-{k}", k=k) for k in range(4)]
    bodies.append(api.encode_score((1, 2), (3, 4), rid="s"))
    for b in bodies:
        assert set(b) <= api.GENERATE_FIELDS
        assert set(b["sampling_params"]) <= api.SAMPLING_FIELDS
    assert {b["sampling_params"]["n"] for b in bodies[:4]} == {1}
    seeds = [b["sampling_params"]["sampling_seed"] for b in bodies[:4]]
    assert len(set(seeds)) == 4 and seeds == [api.derive_seed(11, k) for k in range(4)]  # distinct, stable
    assert bodies[-1]["sampling_params"]["max_new_tokens"] == 0 and bodies[-1]["logprob_start_len"] == 0


def test_parse_generate_layout_and_errors():
    new = iter(range(100))
    items, batched = api.parse_generate(
        {"input_ids": [[1, 2], [3]], "rid": ["a", "b"], "return_logprob": [True, False],
         "sampling_params": {"max_new_tokens": 3, "n": 2, "sampling_seed": 5}, "model": "ignored"},
        vocab_size=10, context_length=8, new_rid=lambda: str(next(new)))
    assert batched and [i.rid for i in items] == ["a", "b"] and [i.return_logprob for i in items] == [True, False]
    assert items[0].sampling == SamplingParams(max_new_tokens=3, n=2, seed=5)
    bad = [({"input_ids": [1], "sampling_params": [{}, {}]}, "sampling_params"),
           ({"input_ids": [[1], [2]], "sampling_params": [{"n": 1}, {"n": 2}]}, "n"),
           ({"input_ids": [1], "sampling_params": {"top_k": 0}}, "top_k"),
           ({"input_ids": [1], "sampling_params": {"stop": ["x"]}}, "stop"),
           ({"input_ids": [1], "stream": "yes"}, "stream"),
           ({"input_ids": [1], "image_data": ["data:image/png;base64,AAAA"]}, "image_data"),
           ({"input_ids": [1], "sampling_params": {"custom_params": 3}}, "custom_params"),
           ({"input_ids": [1], "return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
           ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
           ({"input_ids": [1], "text": "a"}, "input_ids"),
           ({"input_ids": []}, "input_ids")]
    for body, field in bad:
        with pytest.raises(api.RequestError, match=field):
            api.parse_generate(body, vocab_size=10, context_length=8, new_rid=lambda: "x")


def test_decode_reply_checks_fields():
    good = {"output_ids": [4, 5], "meta_info": {"finish_reason": {"type": "stop", "matched": 5},
                                                "weight_version": "3",
                                                "output_token_logprobs": [[-0.5, 4, None], [-1.5, 5, None]]}}
    s = api.decode_sample(good, (1, 2))
    assert list(s.response_ids) == [4, 5] and s.finish_reason == "stop" and s.weight_version == "3"
    np.testing.assert_array_equal(s.logprobs, np.float32([-0.5, -1.5]))
    for mutate, field in [(lambda m: m.pop("weight_version"), "weight_version"),
                          (lambda m: m.update(finish_reason={"type": "eos"}), "finish_reason"),
                          (lambda m: m.update(output_token_logprobs=[[None, 4, None]]), "output_token_logprobs")]:
        bad = {"meta_info": dict(good["meta_info"])}
        mutate(bad["meta_info"])
        with pytest.raises(RolloutError, match=field):
            api.decode_sample(bad, (1, 2))
    lp, v = api.decode_score({"meta_info": {"weight_version": "1", "input_token_logprobs": [
        [None, 1, None], [-1.0, 2, None], [-2.0, 3, None]]}}, 1, 2)
    np.testing.assert_array_equal(lp, np.float32([-1.0, -2.0]))
    with pytest.raises(RolloutError, match="input_token_logprobs"):
        api.decode_score({"meta_info": {"input_token_logprobs": [[None, 1, None]]}}, 1, 2)
    # top-K scoring: SGLang's input_top_logprobs (entry i predicts input token i; null at 0)
    body = api.encode_score((1,), (2, 3), rid="s", top_logprobs_num=2)
    assert body["top_logprobs_num"] == 2 and "top_logprobs_num" not in api.encode_score((1,), (2,), rid="s")
    reply = {"meta_info": {"weight_version": "7", "input_token_logprobs": [
        [None, 1, None], [-1.0, 2, None], [-2.0, 3, None]], "input_top_logprobs": [
        None, [[-0.5, 9, "a"], [-1.0, 2, "b"]], [[-0.1, 4, None], [-2.0, 3, None]]]}}
    lp, ids, top, v = api.decode_score(reply, 1, 2, topk=2)
    np.testing.assert_array_equal(lp, np.float32([-1.0, -2.0]))
    np.testing.assert_array_equal(ids, [[9, 2], [4, 3]])
    np.testing.assert_array_equal(top, np.float32([[-0.5, -1.0], [-0.1, -2.0]]))
    assert v == "7" and ids.dtype == np.int32
    for mutate, field in [(lambda m: m.pop("input_top_logprobs"), r"input_top_logprobs:"),
                          (lambda m: m["input_top_logprobs"].__setitem__(2, [[-0.1, 4, None]]),
                           r"input_top_logprobs\[2\]"),
                          (lambda m: m["input_top_logprobs"].__setitem__(1, [[-0.5, 9.0], [-1, 2]]),
                           r"input_top_logprobs\[1\]\[0\]")]:
        bad = {"meta_info": {k: (list(v_) if isinstance(v_, list) else v_)
                             for k, v_ in reply["meta_info"].items()}}
        mutate(bad["meta_info"])
        with pytest.raises(RolloutError, match=field):
            api.decode_score(bad, 1, 2, topk=2)


def test_hub_tensors_roundtrip_and_single_dtype_buckets(tiny):
    cfg, params = tiny
    tensors = {n: f() for n, _, f in nh.hub_tensors(params, cfg)}
    back = nh.params_from_hub_tensors(tensors, cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    limit = 64 << 10
    seen = []
    for dt, items in buckets(params, cfg, limit):
        assert {DTYPE_NAMES[a.dtype] for _, _, a in items} == {dt}
        assert len(items) == 1 or sum(a.nbytes for _, _, a in items) <= limit
        seen += [n for n, _, _ in items]
    assert sorted(seen) == sorted(tensors) and {"float32", "bfloat16"} <= {
        DTYPE_NAMES[a.dtype] for a in tensors.values()}
    del tensors["lm_head.weight"]
    with pytest.raises(nh.CheckpointError, match="lm_head.weight"):
        nh.params_from_hub_tensors(tensors, cfg)


def test_write_version_is_atomic_and_loadable(tiny, tmp_path):
    cfg, params = tiny
    path = write_version(params, cfg, tmp_path, "000012")
    assert path.name == "v000012" and [p.name for p in tmp_path.iterdir()] == ["v000012"]  # no temp left
    cfg2, back = nh.load_checkpoint(path)
    assert cfg2.to_hf_dict() == cfg.to_hf_dict()
    np.testing.assert_array_equal(np.asarray(back["lm_head"], np.float32), np.asarray(params["lm_head"], np.float32))
    with pytest.raises(RolloutError, match="weight version"):
        write_version(params, cfg, tmp_path, "../escape")


def test_disk_sync_layout_follows_the_servers(tiny, tmp_path):
    """``layout="auto"``: the params layout only when every server is ours (``/server_info``
    ``backend``), else the Hub layout SGLang reads; asked once. Both load bit-exact."""
    cfg, params = tiny

    class Client:
        def __init__(self, infos):
            self.infos, self.asked = infos, 0

        def call_all(self, method, path, body=None, *, timeout_s=None):
            assert (method, path) == ("GET", "/server_info")
            self.asked += 1
            return self.infos

    ours, sglang = {"backend": api.BACKEND, "tp_size": 1}, {"tp_size": 1, "version": "0.5.23"}
    for infos, want in (({"a": ours, "b": ours}, "params"), ({"a": ours, "b": sglang}, "hub"), ({"a": sglang}, "hub")):
        client = Client(infos)
        sync = DiskWeightSync(client, cfg, tmp_path)
        assert sync._layout() == want and sync._layout() == want and client.asked == 1
    with pytest.raises(ValueError, match="layout"):
        DiskWeightSync(Client({}), cfg, tmp_path, layout="torch")
    for layout in ("hub", "params"):
        path = write_version(params, cfg, tmp_path / layout, "3", layout=layout)
        _, back = nh.load_checkpoint(path)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
            assert x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_torch_peer_broadcasts_over_gloo_and_times_out():
    init = f"tcp://127.0.0.1:{free_port()}"
    peers = [TorchPeer(init_method=init, rank=r, world_size=3, backend="gloo", timeout_s=60) for r in range(3)]
    try:
        for p in peers:
            p.wait_ready()
        for dt, npdt in (("bfloat16", ml_dtypes.bfloat16), ("float32", np.float32)):
            x = np.random.default_rng(0).standard_normal(5000).astype(npdt)
            got = {}
            threads = [threading.Thread(target=lambda p=p: got.setdefault(p.rank, p.broadcast(dt, x.size)))
                       for p in peers[1:]]
            for t in threads:
                t.start()
            peers[0].broadcast(dt, x.size, x)
            for t in threads:
                t.join(60)
            for r in (1, 2):
                np.testing.assert_array_equal(got[r].view(np.uint8), x.view(np.uint8))
    finally:
        for p in peers:
            p.close()
    lonely = TorchPeer(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=2, backend="gloo",
                       timeout_s=60)
    with pytest.raises(RolloutError, match="timed out"):  # nobody joins: an error, never a hang
        lonely.wait_ready(timeout_s=3)
    lonely.close(kill=True)


def test_config_builds_client_and_syncer(tiny, tmp_path):
    cfg, _ = tiny
    rc = C.from_dict(C.RolloutConfig, {"engine": "jax_server", "sync": {"keep_versions": 3},
                                       "servers": {"urls": ["http://127.0.0.1:1", "http://127.0.0.1:2"],
                                                   "router_url": "http://127.0.0.1:3", "api_key": "k",
                                                   "max_concurrency": 5}})
    eng = make_engine(rc, model_cfg=cfg, sync_dir=str(tmp_path))
    try:
        assert isinstance(eng, ServerClient) and eng.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        assert eng.router_url == "http://127.0.0.1:3" and eng.max_concurrency == 5
        assert isinstance(eng.syncer, DiskWeightSync) and eng.syncer.keep == 3
    finally:
        eng.close()
    rc2 = C.from_dict(C.RolloutConfig, {"engine": "sglang", "servers": {"url": "http://127.0.0.1:1"},
                                        "sync": {"method": "nccl", "nccl_backend": "gloo", "nccl_bucket_mb": 8}})
    eng = make_engine(rc2, model_cfg=cfg)
    try:
        assert isinstance(eng.syncer, NcclWeightSync) and eng.syncer.bucket_bytes == 8 << 20
    finally:
        eng.close()
    for over, field in [({"engine": "sglang"}, "rollout.servers.url: required"),
                        ({"servers": {"urls": ["localhost:1"]}}, r"rollout.servers.urls\[0\]: expected"),
                        ({"servers": {"router_url": "ftp://x"}}, "rollout.servers.router_url: expected"),
                        ({"sync": {"keep_versions": 0}}, "rollout.sync.keep_versions: must be"),
                        ({"sync": {"timeout_s": 0}}, "rollout.sync.timeout_s: must be"),
                        ({"sync": {"method": "rsync"}}, "rollout.sync.method: must be one of")]:
        with pytest.raises(C.ConfigError, match=f"^{field}"):
            C.from_dict(C.Config, {"rollout": over})


def test_client_fails_cleanly_when_no_server_answers():
    """A dead server is probed until ``timeout_s`` without progress (it may be restarting), then
    the call fails naming it."""
    url = f"http://127.0.0.1:{free_port()}"
    c = ServerClient([url], max_retries=2, backoff_s=0.01, connect_timeout_s=1, timeout_s=3)
    try:
        with pytest.raises(RolloutError, match=f"no request finished for 3 s.*{url}"):
            c.score([(1, 2)], [(3,)])
        assert c.health() is False
    finally:
        c.close()


@pytest.mark.integration
def test_return_routed_experts_in_sglang_layout():
    """``/generate`` with ``return_routed_experts``: ``meta_info.routed_experts`` decodes with
    SGLang 0.5.23's own formula (``np.frombuffer(base64.b64decode(s), np.int32)``, reshaped to
    ``[seqlen - 1, num_hidden_layers, num_experts_per_tok]`` of the checkpoint's config): each MoE
    layer's row (its global index in the hybrid pattern) holds the engine's experts, equal as
    top-k sets to the full forward's routing (fp32); every other layer's row is 0 (SGLang's
    zero-initialised capture buffer). A server started without the flag refuses it naming the
    field; a non-bool value is a 400 naming it. The app runs in process over a real engine."""
    import base64

    from fastapi.testclient import TestClient

    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.server import RolloutServer

    items, _ = api.parse_generate({"input_ids": [1, 2], "return_routed_experts": True}, vocab_size=10,
                                  context_length=8, new_rid=lambda: "x")
    assert items[0].return_routed_experts
    with pytest.raises(api.RequestError, match="return_routed_experts"):
        api.parse_generate({"input_ids": [1], "return_routed_experts": "yes"}, vocab_size=10,
                           context_length=8, new_rid=lambda: "x")
    cfg = nh.preset("tiny", vocab_size=64)
    params = nh.init_params(cfg, jax.random.key(2), dtype=jnp.float32)
    hf = cfg.to_hf_dict()  # what an SGLang client reads from config.json
    L, K = hf["num_hidden_layers"], hf["num_experts_per_tok"]
    moe = [i for i, c in enumerate(hf["hybrid_override_pattern"]) if c == "E"]
    body = {"input_ids": [5, 9, 3, 7], "return_routed_experts": True,
            "sampling_params": {"max_new_tokens": 5, "sampling_seed": 3}}
    for enabled in (True, False):
        eng = JaxEngine(cfg, params, num_slots=2, max_len=16, prompt_buckets=(8,), prefill_sizes=(2,),
                        steps_per_call=5, return_routed_experts=enabled)
        eng.start()  # the server drives a running engine (as launch/serve.py starts it)
        try:
            with TestClient(RolloutServer(eng, cfg, checkpoint="tiny").app) as client:
                r = client.post("/generate", json=body)
                plain = client.post("/generate", json={**body, "return_routed_experts": False}).json()
        finally:
            eng.stop()
        if not enabled:
            assert r.status_code == 400 and "return_routed_experts" in r.text
            continue
        assert r.status_code == 200, r.text
        out = r.json()
        rx = np.frombuffer(base64.b64decode(out["meta_info"]["routed_experts"]), np.int32)
        seq = body["input_ids"] + out["output_ids"]
        rx = rx.reshape(len(seq) - 1, L, K)
        want = nh.forward(params, jnp.asarray([seq[:-1]]), cfg, return_routed_experts=True)[1][0]
        np.testing.assert_array_equal(np.sort(rx[:, moe], -1), np.sort(np.asarray(want), -1))
        others = [i for i in range(L) if i not in moe]
        assert others and not rx[:, others].any()
        assert "routed_experts" not in plain["meta_info"]


@pytest.mark.integration
def test_zero_mismatch_server_logprobs_equal_the_trainer_bit_for_bit():
    """``--zero-mismatch``: ``/generate`` samples from the trainer's batch-invariant log-probs,
    so ``rl.token_logprobs(..., row_len=max_len)`` recomputes the returned ones exactly (fp32);
    top-p < 1 is a 400 naming the field."""
    from fastapi.testclient import TestClient

    import cascade_jax.rl as rl
    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.server import RolloutServer

    cfg = nh.preset("tiny", vocab_size=64)
    params = nh.init_params(cfg, jax.random.key(3), dtype=jnp.float32)
    T = 16
    eng = JaxEngine(cfg, params, num_slots=2, max_len=T, prompt_buckets=(8,), prefill_sizes=(2,))
    body = {"input_ids": [[5, 9, 3, 7], [4, 2]], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 5, "sampling_seed": 3, "n": 2}}
    with TestClient(RolloutServer(eng, cfg, checkpoint="tiny", zero_mismatch=True).app) as client:
        r = client.post("/generate", json=body)
        bad = client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"top_p": 0.5}})
    assert bad.status_code == 400 and "top_p" in bad.text
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 4
    tok = np.zeros((4, T), np.int32)
    seg = np.zeros((4, T), np.int32)
    mask = np.zeros((4, T), np.float32)
    served = np.zeros((4, T), np.float32)
    for i, o in enumerate(out):
        p = body["input_ids"][i // 2]
        seq = p + o["output_ids"]
        tok[i, :len(seq)], seg[i, :len(seq)] = seq, 1
        mask[i, len(p):len(seq)] = 1
        served[i, len(p):len(seq)] = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
    view = rl.SFTBatch(tokens=jnp.asarray(tok), positions=jnp.broadcast_to(jnp.arange(T), (4, T)),
                       segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask))
    lp = np.asarray(rl.token_logprobs(params, view, cfg, row_len=T)[0])
    assert np.all(served[mask > 0] < 0)  # real sampling log-probs came back
    np.testing.assert_array_equal(lp * mask, served)  # bit for bit
