"""Sweep the Pallas kernels' block sizes on this device and write the tuning table.

    python launch/tune_kernels.py [--only gmm_triton,gmm_mosaic,attention,ssd] [--budget 420]
                                  [--out kernels/tuning.json]          # on a GPU / TPU
    python launch/tune_kernels.py --smoke --out /tmp/tuning.json       # CPU, tiny shapes

For every kernel of :data:`kernels.tuning.KERNELS` that runs on this platform and every shape of
:data:`FULL` (the production shapes at 4K, 8K and 32K tokens), each candidate of
:data:`CANDIDATES` is timed forward + backward (median of ``--iters`` after a warm-up, the
gradient of a sum over the outputs, parameters passed explicitly so the table is not consulted)
and its output checked against the XLA reference (``max|x − ref| / max|ref| <= 2e-2``; a
candidate that fails or errors is dropped). The fastest candidate becomes the entry
``{kernel, device: this device_kind, shape: the bucketed shape, params, measured: {tflops,
default_tflops, speedup, ...}}``, merged into ``--out`` (an entry with the same kernel, device
and shape is replaced). Today's defaults are always among the candidates, so ``speedup >= 1``.
The sweep stops starting new candidates after ``--budget`` seconds and writes what it has.
Prints the JSON of the new entries.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels import benchmark, pallas_attention, pallas_gmm, pallas_ssd, tuning, xla_attention, xla_gmm, xla_ssd  # noqa: E402
from kernels._common import on_cpu, platform  # noqa: E402

TOL = 2e-2

#: candidates per kernel; the first is today's default
CANDIDATES = {
    "gmm_triton": [dict(block_m=128, block_k=128, block_n=128), dict(block_m=64, block_k=128, block_n=128),
                   dict(block_m=128, block_k=64, block_n=128), dict(block_m=128, block_k=128, block_n=64),
                   dict(block_m=256, block_k=128, block_n=128), dict(block_m=128, block_k=64, block_n=64),
                   dict(block_m=64, block_k=64, block_n=128)],
    "gmm_tpu": [dict(block_m=128, block_k=128, block_n=128), dict(block_m=256, block_k=128, block_n=128),
                dict(block_m=512, block_k=128, block_n=128), dict(block_m=128, block_k=256, block_n=128),
                dict(block_m=256, block_k=256, block_n=256)],
    "gmm_mosaic": [None, dict(block_m=64, block_k=64), dict(block_m=128, block_k=64), dict(block_m=128, block_k=128),
                   dict(block_m=64, block_k=128)],
    "attention": [dict(block_q=128, block_k=128), dict(block_q=64, block_k=64), dict(block_q=64, block_k=128),
                  dict(block_q=128, block_k=64), dict(block_q=128, block_k=256)],
    "ssd": [dict(num_warps_fwd=4, num_warps_bwd=8), dict(num_warps_fwd=4, num_warps_bwd=4),
            dict(num_warps_fwd=8, num_warps_bwd=8), dict(num_warps_fwd=2, num_warps_bwd=4)],
}
SMOKE_CANDIDATES = {
    "gmm_triton": [dict(block_m=128, block_k=128, block_n=128), dict(block_m=8, block_k=16, block_n=8)],
    "attention": [dict(block_q=128, block_k=128), dict(block_q=8, block_k=8)],
    "ssd": [dict(num_warps_fwd=4, num_warps_bwd=8), dict(num_warps_fwd=2, num_warps_bwd=4)],
}

FULL = {
    "gmm": [dict(m=6 * t, k=k, n=n, e=128) for t in (4096, 8192, 32768) for k, n in ((2688, 1856), (1856, 2688))],
    "attention": [dict(t=t, h=32, hkv=2, d=128) for t in (4096, 8192, 32768)],
    "ssd": [dict(t=t, h=64, p=64, g=8, n=128, q=128) for t in (4096, 8192, 32768)],
}
SMOKE = {
    "gmm": [dict(m=48, k=32, n=32, e=4)],
    "attention": [dict(t=32, h=4, hkv=2, d=16)],
    "ssd": [dict(t=32, h=4, p=8, g=2, n=16, q=16)],
}


def kernels_for_platform(plat: str, smoke: bool):
    if smoke:
        return ["gmm_triton", "attention", "ssd"]
    return {"gpu": ["gmm_triton", "gmm_mosaic", "attention", "ssd"], "tpu": ["gmm_tpu"]}.get(plat, [])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-6))


def problem(kernel: str, s: dict, dtype, rng):
    """``(make_fn(params) -> fn(*args), args, reference output, fwd FLOPs, bwd factor, table shape)``."""
    if kernel.startswith("gmm"):
        m, k, n, e = s["m"], s["k"], s["n"], s["e"]
        lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
        rhs = jnp.asarray(rng.normal(size=(e, k, n)) / np.sqrt(k), dtype)
        gs = jnp.asarray(benchmark._group_sizes(m, e, True, rng), jnp.int32)
        if kernel == "gmm_mosaic":
            from kernels import pallas_gmm_mgpu
            make = lambda p: (lambda a, w: pallas_gmm_mgpu.gmm(a, w, gs, **(p or {})))
        else:
            var = "gpu" if kernel == "gmm_triton" else "tpu"
            make = lambda p: (lambda a, w: pallas_gmm.gmm(a, w, gs, variant=var, **p))
        ref = xla_gmm.gmm(lhs, rhs, gs)
        return make, (lhs, rhs), ref, 2.0 * m * k * n, 3.0, dict(m=tuning.bucket("m", m), k=k, n=n)
    if kernel == "attention":
        t, h, hkv, d = s["t"], s["h"], s["hkv"], s["d"]
        q = jnp.asarray(rng.normal(size=(1, t, h, d)), dtype)
        k = jnp.asarray(rng.normal(size=(1, t, hkv, d)), dtype)
        v = jnp.asarray(rng.normal(size=(1, t, hkv, d)), dtype)
        ref = xla_attention.attention(q, k, v) if t <= 8192 else None
        make = lambda p: (lambda q, k, v: pallas_attention.attention(q, k, v, **p))
        return make, (q, k, v), ref, 2.0 * t * t * h * d, 3.5, dict(t=tuning.bucket("t", t), s=tuning.bucket("s", t), d=d)
    t, h, p_, g, n, q = s["t"], s["h"], s["p"], s["g"], s["n"], s["q"]
    x = jnp.asarray(rng.normal(size=(1, t, h, p_)), dtype)
    dt = jnp.asarray(rng.uniform(0.001, 0.1, size=(1, t, h)), jnp.float32)
    A = -jnp.asarray(rng.uniform(1, 16, size=(h,)), jnp.float32)
    bm = jnp.asarray(rng.normal(size=(1, t, g, n)), dtype)
    cm = jnp.asarray(rng.normal(size=(1, t, g, n)), dtype)
    ref = xla_ssd.ssd(x, dt, A, bm, cm, chunk_size=q)[0]
    make = lambda p: (lambda *a: pallas_ssd.ssd(*a, chunk_size=q, **p)[0])
    return make, (x, dt, A, bm, cm), ref, float(t * h * (2 * q * n + 2 * q * p_ + 4 * p_ * n)), 3.0, \
        dict(t=tuning.bucket("t", t), p=p_, n=n)


def time_fwd_bwd(fn, args, iters: int) -> float:
    """Median seconds of the jitted gradient of ``sum(fn(*args))`` w.r.t. the float arguments."""
    diff = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
    g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=diff))
    return benchmark._time(g, args, iters)


def sweep(kernel: str, shapes, candidates, *, dtype, iters: int, deadline: float, device: str, rng):
    entries, log = [], []
    for s in shapes:
        make, args, ref, flops, factor, key = problem(kernel, s, dtype, rng)
        results = []
        for p in candidates:
            row = {"kernel": kernel, "shape": key, "params": p}
            if time.perf_counter() > deadline:
                row.update(status="skipped", reason="time budget")
                log.append(row)
                continue
            try:
                fn = make(p)
                if ref is not None:
                    err = _rel(jax.jit(fn)(*args), ref)
                    row["err"] = err
                    if not err <= TOL:
                        raise ValueError(f"output differs from the XLA reference: {err:.3g} > {TOL}")
                sec = time_fwd_bwd(fn, args, iters)
                row.update(status="ok", time_ms=sec * 1e3, tflops=flops * factor / sec / 1e12)
                results.append(row)
            except Exception as e:  # noqa: BLE001 - a failing candidate is dropped
                row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                traceback.print_exc(file=sys.stderr)
            log.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        default = next((r for r in results if r["params"] == candidates[0]), None)
        best = max(results, key=lambda r: r["tflops"], default=None)
        if best is None or default is None:
            continue  # no measured default to compare against: leave the defaults in force
        params = best["params"]
        if params is None:  # the Mosaic default (block_m by rows): record what it resolves to
            from kernels import pallas_gmm_mgpu
            bm, bk = pallas_gmm_mgpu.tuned_blocks(s["m"], s["k"], s["n"])
            params = dict(block_m=bm, block_k=bk)
        entries.append({"kernel": kernel, "device": device, "shape": key, "params": params,
                        "measured": {"tflops": best["tflops"], "default_tflops": default["tflops"],
                                     "speedup": best["tflops"] / default["tflops"], "pass": "fwd+bwd",
                                     "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}})
    return entries, log


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpret mode)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(tuning.KERNELS)}")
    ap.add_argument("--out", default=None, help="table to merge into (default kernels/tuning.json)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no new candidate starts")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if on_cpu() and not args.smoke:
        raise SystemExit("error: tuning needs a GPU or TPU (Pallas runs interpreted on CPU); use --smoke")
    plat = platform()
    names = kernels_for_platform(plat, args.smoke)
    if args.only:
        want = [k.strip() for k in args.only.split(",") if k.strip()]
        bad = [k for k in want if k not in tuning.KERNELS]
        if bad:
            raise SystemExit(f"error: --only: unknown kernel(s) {bad}; valid: {', '.join(tuning.KERNELS)}")
        names = [k for k in names if k in want]
    shapes = SMOKE if args.smoke else FULL
    cands = SMOKE_CANDIDATES if args.smoke else CANDIDATES
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    device = tuning.device_kind()
    deadline = time.perf_counter() + args.budget
    rng = np.random.default_rng(args.seed)
    new, log = [], []
    for name in names:
        group = "gmm" if name.startswith("gmm") else name
        e, lg = sweep(name, shapes[group], cands[name], dtype=dtype, iters=1 if args.smoke else args.iters,
                      deadline=deadline, device=device, rng=rng)
        new += e
        log += lg
    out = pathlib.Path(args.out) if args.out else tuning.table_path()
    entries = tuning.load_table(out) if out.exists() else []
    path = tuning.write_table(tuning.merge_entries(entries, new), out)
    doc = {"device": device, "platform": plat, "table": str(path), "entries": new, "candidates": log}
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
