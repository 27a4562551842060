"""The kernel tuning table: a matching entry changes the block sizes a kernel is launched with
(and the result still equals the XLA reference); with no matching entry (other device, other
shape, empty table) every kernel keeps today's defaults; the lookup rules (bucketing, most
specific wins, bad entries refused); the tuning sweep's CPU smoke writes a table the lookup reads."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import pallas_attention, pallas_gmm, pallas_gmm_mgpu, pallas_ssd, tuning, xla_gmm
from tests.numerics import rel_err

CPU = "cpu"


def _entry(kernel, params, device=CPU, **shape):
    return {"kernel": kernel, "device": device, "shape": shape, "params": params}


def test_shipped_table_loads_and_is_valid():
    entries = tuning.load_table(tuning.TABLE_PATH)
    assert isinstance(entries, list)  # the device table is still to come: may be empty
    for e in entries:
        assert e["kernel"] in tuning.KERNELS


def test_lookup_rules():
    table = [_entry("gmm_triton", {"block_m": 64}, m=65536, k=2688, n=1856),
             _entry("gmm_triton", {"block_m": 32}, k=2688),
             _entry("gmm_triton", {"block_n": 16}, device="H100", m=65536, k=2688, n=1856)]
    with tuning.use_table(table):
        # M = 6·8192 = 49152 falls in the 65536 bucket; the 3-key entry beats the 1-key one
        assert tuning.lookup("gmm_triton", m=49152, k=2688, n=1856) == {"block_m": 64}
        assert tuning.lookup("gmm_triton", m=70000, k=2688, n=1856) == {"block_m": 32}  # other bucket
        assert tuning.lookup("gmm_triton", m=49152, k=1856, n=2688) == {}               # other widths
        assert tuning.lookup("gmm_triton", m=49152, k=2688, n=1856, device="NVIDIA H100 80GB HBM3") == {"block_n": 16}
        assert tuning.lookup("gmm_tpu", m=49152, k=2688, n=1856) == {}                  # other kernel
    assert tuning.bucket("m", 49152) == 65536 and tuning.bucket("k", 2688) == 2688 and tuning.bucket("t", 4096) == 4096


@pytest.mark.parametrize("entry, message", [
    (_entry("gmm_triton", {"block_q": 64}), "params: unknown keys"),
    (_entry("gmm", {"block_m": 64}), "kernel"),
    (_entry("attention", {"block_q": 0}), "positive ints"),
    (_entry("ssd", {"num_warps_fwd": 2}, q=3), "shape: unknown keys"),
])
def test_bad_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        with tuning.use_table([entry]):
            pass


def test_table_file_roundtrip_and_env(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    e = _entry("attention", {"block_q": 16, "block_k": 32}, t=64, s=64, d=16)
    tuning.write_table([e], path)
    monkeypatch.setenv(tuning.ENV, str(path))
    assert tuning.table_path() == path
    assert tuning.lookup("attention", t=64, s=64, d=16) == {"block_q": 16, "block_k": 32}
    merged = tuning.merge_entries([e], [_entry("attention", {"block_q": 8}, t=64, s=64, d=16)])
    assert len(merged) == 1 and merged[0]["params"] == {"block_q": 8}
    path.write_text(json.dumps({"version": 1, "entries": [_entry("attention", {"bogus": 1})]}))
    with pytest.raises(ValueError, match="entries\\[0\\].params"):
        tuning.load_table(path)


def _spy(monkeypatch, module, name):
    calls = []
    orig = getattr(module, name)

    def spy(*a, **kw):
        calls.append(kw)
        return orig(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


def _gmm_data():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 32, 48)), jnp.float32)
    return lhs, rhs, jnp.asarray([20, 0, 40], jnp.int32)


def test_gmm_table_entry_changes_blocks_and_keeps_results(monkeypatch):
    lhs, rhs, gs = _gmm_data()
    calls = _spy(monkeypatch, pallas_gmm, "_gpu_gmm")
    with tuning.use_table([]):
        out0 = pallas_gmm.gmm(lhs, rhs, gs, variant="gpu")
    # the default 128 blocks, as pick_block fits them to (64, 32, 48)
    assert (calls[-1]["tm"], calls[-1]["tk"], calls[-1]["tn"]) == (64, 32, 16)
    with tuning.use_table([_entry("gmm_triton", {"block_m": 16, "block_k": 8, "block_n": 8}, m=64, k=32, n=48)]):
        assert pallas_gmm.tuned_blocks("gpu", 64, 32, 48) == (16, 8, 8)
        out1 = pallas_gmm.gmm(lhs, rhs, gs, variant="gpu")
        # an explicit argument wins over the table
        pallas_gmm.gmm(lhs, rhs, gs, variant="gpu", block_m=32)
    assert (calls[-2]["tm"], calls[-2]["tk"], calls[-2]["tn"]) == (16, 8, 8)
    assert (calls[-1]["tm"], calls[-1]["tk"], calls[-1]["tn"]) == (32, 8, 8)
    ref = xla_gmm.gmm(lhs, rhs, gs)
    assert rel_err(out1, ref) < 1e-5 and rel_err(out0, ref) < 1e-5


def test_defaults_unchanged_without_a_match():
    other_device = [_entry(k, {p: 8 for p in tuning.KERNELS[k]}, device="TPU v9") for k in tuning.KERNELS]
    other_shape = [_entry("gmm_triton", {"block_m": 8}, k=999), _entry("gmm_mosaic", {"block_m": 8}, n=999),
                   _entry("attention", {"block_q": 8}, d=999), _entry("ssd", {"num_warps_fwd": 1}, n=999)]
    for table in ([], other_device, other_shape):
        with tuning.use_table(table):
            assert pallas_gmm.tuned_blocks("gpu", 24576, 2688, 1856) == (128, 128, 128)
            assert pallas_gmm.tuned_blocks("tpu", 24576, 2688, 1856) == (128, 128, 128)
            assert pallas_gmm_mgpu.tuned_blocks(24576, 2688, 1856) == (64, 64)
            assert pallas_gmm_mgpu.tuned_blocks(196608, 2688, 1856) == (128, 64)
            assert tuning.lookup("attention", t=4096, s=4096, d=128) == {}
            assert tuning.lookup("ssd", t=4096, p=64, n=128) == {}


def test_attention_and_ssd_read_the_table(monkeypatch):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 32, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 32, 2, 16)), jnp.float32)
    blocks = []
    orig_ranges = pallas_attention.block_ranges
    # block_ranges(q_pos, kv_pos, q_seg, kv_seg, q_valid, kv_valid, bq, bk): the launch's blocks
    monkeypatch.setattr(pallas_attention, "block_ranges", lambda *a: blocks.append(a[-2:]) or orig_ranges(*a))
    with tuning.use_table([]):
        o0 = pallas_attention.attention(q, k, k)
    with tuning.use_table([_entry("attention", {"block_q": 8, "block_k": 16}, t=32, s=32, d=16)]):
        o1 = pallas_attention.attention(q, k, k)
    assert blocks == [(32, 32), (8, 16)]  # default 128 capped at the sequence; then the entry
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), rtol=1e-5, atol=1e-5)

    seen = []
    orig = pallas_ssd._ssd_core
    monkeypatch.setattr(pallas_ssd, "_ssd_core", lambda *a: seen.append(a[-1]) or orig(*a))
    x = jnp.asarray(rng.normal(size=(1, 32, 4, 8)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.01, 0.1, size=(1, 32, 4)), jnp.float32)
    A = -jnp.ones((4,), jnp.float32)
    bm = jnp.asarray(rng.normal(size=(1, 32, 2, 16)), jnp.float32)
    with tuning.use_table([]):
        y0 = pallas_ssd.ssd(x, dt, A, bm, bm, chunk_size=16)[0]
    with tuning.use_table([_entry("ssd", {"num_warps_fwd": 2, "num_warps_bwd": 4}, t=32, p=8, n=16)]):
        y1 = pallas_ssd.ssd(x, dt, A, bm, bm, chunk_size=16)[0]
    assert seen[0][2:] == (4, 8) and seen[1][2:] == (2, 4)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))  # warps do not change interpret-mode numerics


def test_tune_kernels_smoke_writes_a_table_the_kernels_read(tmp_path):
    from launch import tune_kernels

    out = tmp_path / "tuning.json"
    doc = tune_kernels.main(["--smoke", "--out", str(out), "--only", "gmm_triton"])
    entries = tuning.load_table(out)
    assert {e["kernel"] for e in entries} == {"gmm_triton"}
    assert all(r["status"] == "ok" for r in doc["candidates"]), doc["candidates"]
    for e in entries:
        assert e["device"] == jax.devices()[0].device_kind and e["measured"]["speedup"] >= 1.0
        assert e["params"] in [c for c in tune_kernels.SMOKE_CANDIDATES[e["kernel"]]]
        with tuning.use_table(entries):
            assert tuning.lookup(e["kernel"], **e["shape"]) == e["params"]
