"""Context parallelism on 8 simulated CPU devices (run in a subprocess so the device count does
not leak into other tests): attention with K/V all-gathered over the sequence axis (contiguous
packed shards and a zig-zag token order) and the SSD scan with cross-device state passing
(segments crossing and starting on shard boundaries, an initial state; Pallas and XLA local
scans) against the unsharded XLA references — outputs, final state and all gradients.
Tolerance: 1e-5 relative to each quantity's largest magnitude (fp32).

Interpret-mode Pallas inside ``shard_map`` needs ``check_vma=False`` (JAX's HLO interpreter is
not varying-axes clean); compiled kernels declare their outputs' varying axes themselves.
"""

import json
import sys

import numpy as np
import pytest

from tests.multidevice import run_on_cpu_devices

TOL = 1e-5


def _run(full: bool):
    return run_on_cpu_devices(__file__, *(["--full"] if full else []), timeout=600)


@pytest.mark.integration
def test_context_parallel_matches_unsharded():
    res = _run(full=False)
    assert set(res) == {"attention_packed_contiguous", "attention_zigzag", "ssd_pallas_segments", "ssd_xla_plain"}
    for name, errs in res.items():
        assert max(errs) < TOL, (name, errs)


@pytest.mark.slow
def test_context_parallel_all_variants():
    res = _run(full=True)
    assert len(res) == 6
    for name, errs in res.items():
        assert max(errs) < TOL, (name, errs)


def main(full: bool):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    from kernels import pallas_attention, pallas_ssd, xla_attention, xla_ssd

    n_dev = len(jax.devices()); assert n_dev == 8, n_dev
    mesh = Mesh(np.array(jax.devices()), ("cp",))
    rng = np.random.default_rng(0)
    res = {}
    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
    # attention
    B, T, HQ, HKV, D = 1, 64, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(B, T, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, HKV, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, HKV, D)), jnp.float32)
    seg = np.zeros((B, T), np.int32); seg[0, 13:] = 1; seg[0, 40:] = 2
    pos = np.zeros((B, T), np.int32)
    for t in range(1, T): pos[0, t] = 0 if seg[0, t] != seg[0, t-1] else pos[0, t-1] + 1
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    seq = P(None, "cp")
    def cp_attn(q, k, v, pos, seg):
        return jax.shard_map(lambda q, k, v, p, s: pallas_attention.attention_context_parallel(
            q, k, v, axis_name="cp", q_positions=p, kv_positions=p, q_segment_ids=s, kv_segment_ids=s,
            block_q=8, block_k=8), mesh=mesh, in_specs=(seq,) * 5, out_specs=seq, check_vma=False)(q, k, v, pos, seg)
    def ref_attn(q, k, v, pos, seg):
        return xla_attention.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    loss = lambda f: (lambda q, k, v, p, s: jnp.sum(jnp.sin(f(q, k, v, p, s))))
    for name, perm in [("packed_contiguous", np.arange(T)), ("zigzag", np.asarray(pallas_attention.zigzag_permutation(T, 8)))]:
        args = (q[:, perm], k[:, perm], v[:, perm], pos[:, perm], seg[:, perm])
        o, g = jax.jit(lambda *a: (cp_attn(*a), jax.grad(loss(cp_attn), (0, 1, 2))(*a)))(*args)
        o_r, g_r = jax.jit(lambda *a: (ref_attn(*a), jax.grad(loss(ref_attn), (0, 1, 2))(*a)))(*args)
        res["attention_" + name] = [rel(o, o_r)] + [rel(a, b) for a, b in zip(g, g_r)]
    # ssd
    B, T, H, PP, G, N, Q = 1, 64, 4, 4, 2, 8, 4
    x = jnp.asarray(rng.normal(size=(B, T, H, PP)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.01, 0.3, size=(B, T, H)), jnp.float32)
    A = -jnp.asarray(rng.uniform(0.5, 2.0, size=(H,)), jnp.float32)
    Bm = jnp.asarray(rng.normal(size=(B, T, G, N)), jnp.float32)
    Cm = jnp.asarray(rng.normal(size=(B, T, G, N)), jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(B, H, PP, N)), jnp.float32)
    sg = np.zeros((B, T), np.int32); sg[0, 10:] = 1; sg[0, 24:] = 2; sg[0, 45:] = 3  # 24: on a shard boundary; 10..23 spans shards
    sg = jnp.asarray(sg)
    for fn_name, fn in [("pallas", pallas_ssd.ssd), ("xla", xla_ssd.ssd)]:
        for use_seg in (True, False):
            if not full and (fn_name, use_seg) not in (("pallas", True), ("xla", False)):
                continue
            segs = sg if use_seg else jnp.zeros_like(sg)
            def cp_ssd(x, dt, A, Bm, Cm, s0):
                return jax.shard_map(lambda x, dt, Bm, Cm, sgl, A, s0: pallas_ssd.ssd_context_parallel(
                    x, dt, A, Bm, Cm, axis_name="cp", chunk_size=Q, segment_ids=sgl, initial_state=s0, ssd_fn=fn),
                    mesh=mesh, in_specs=(seq, seq, seq, seq, seq, P(), P()), out_specs=(seq, P()), check_vma=False)(x, dt, Bm, Cm, segs, A, s0)
            def ref_ssd(x, dt, A, Bm, Cm, s0):
                return xla_ssd.ssd(x, dt, A, Bm, Cm, chunk_size=Q, segment_ids=segs, initial_state=s0)
            def l(f):
                def inner(*a):
                    y, fin = f(*a)
                    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(fin))
                return inner
            args = (x, dt, A, Bm, Cm, s0)
            (y, fin), g = jax.jit(lambda *a: (cp_ssd(*a), jax.grad(l(cp_ssd), range(6))(*a)))(*args)
            (y_r, fin_r), g_r = jax.jit(lambda *a: (ref_ssd(*a), jax.grad(l(ref_ssd), range(6))(*a)))(*args)
            res[f"ssd_{fn_name}_{'segments' if use_seg else 'plain'}"] = [rel(y, y_r), rel(fin, fin_r)] + [rel(a, b) for a, b in zip(g, g_r)]
    print(json.dumps(res))


if __name__ == "__main__":
    main(full="--full" in sys.argv)
