"""Kernel benchmark: ``python -m kernels.benchmark [--smoke] [--only gmm,attention,ssd] [--iters N]``.

Prints one JSON document: the device, the JAX version, and one row per (kernel, case, impl, pass)
with the median wall time (ms, after a warm-up call) and TFLOP/s, or ``status: "skipped"`` /
``"error"`` with the reason. All rows come from the same process, so ratios are comparable.

Rows (Nemotron shapes unless ``--smoke``):

* ``gmm`` — MoE expert matmul, T ∈ {4096, 16384} tokens × top-6 over 128 experts,
  2688→1856 (up) and 1856→2688 (down), balanced groups and skewed groups (Dirichlet α = 2 with 8
  experts forced empty). Impls: ``pallas`` (ours; on GPU also ``pallas_triton`` and the forward of
  ``pallas_mosaic_aligned``, the Mosaic kernel alone on a prebuilt tile-aligned layout), ``xla``
  (reference loop, what ``auto`` runs today), ``ragged_dot`` (stock ``jax.lax.ragged_dot``; skipped
  where its dense expansion cannot fit), ``dense`` (one
  ``[6T, K] × [K, N]`` matmul, the FLOP-equivalent upper bound), ``tokamax`` (``ragged_dot``) when
  importable. FLOPs ``2·6T·K·N`` (fwd), ×3 for fwd+bwd.
* ``attention`` — causal GQA, B = 1, 32 query / 2 KV heads, head_dim 128, S ∈ {4K, 32K, 128K}.
  Impls: ``pallas``, ``xla`` (skipped where its S×S scores cannot fit), ``xla_blockwise``
  (:mod:`kernels.xla_flash_attention`), ``cudnn``
  (``jax.nn.dot_product_attention(implementation="cudnn")``), ``tokamax`` when importable, ``dense``
  (a square matmul with the same FLOPs; also for ``ssd``).
  FLOPs ``2·S²·H·D`` (fwd, causal), ×3.5 for fwd+bwd.
* ``ssd`` — Mamba2 scan, B = 1, 64 heads × 64, 8 groups, state 128, chunk 128, S ∈ {8K, 64K}.
  Impls: ``pallas``, ``xla``, ``dense``. FLOPs per token and head ``2QN + 2QP + 4PN`` (fwd), ×3
  for fwd+bwd (≈ 43 GFLOP forward at 8K).

On CPU only ``--smoke`` makes sense: the Pallas kernels then run in interpret mode (rows are
marked ``"interpret": true`` and their times say nothing about kernel speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from . import (grouped_matmul, pallas_attention, pallas_gmm, pallas_ssd, xla_attention, xla_flash_attention, xla_gmm,
               xla_ssd)
from ._common import on_cpu, platform

FULL = {
    "gmm": dict(tokens=(4096, 16384), top_k=6, experts=128, dims=((2688, 1856), (1856, 2688)), dtype="bfloat16"),
    "attention": dict(seq=(4096, 32768, 131072), heads=32, kv_heads=2, head_dim=128, dtype="bfloat16"),
    "ssd": dict(seq=(8192, 65536), heads=64, head_dim=64, groups=8, state=128, chunk=128, dtype="bfloat16"),
}
SMOKE = {
    "gmm": dict(tokens=(32,), top_k=2, experts=8, dims=((64, 32), (32, 64)), dtype="float32"),
    "attention": dict(seq=(64,), heads=4, kv_heads=2, head_dim=16, dtype="float32"),
    "ssd": dict(seq=(64,), heads=4, head_dim=8, groups=2, state=16, chunk=16, dtype="float32"),
}


def _time(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_memory():
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - not all backends report memory
        return None


class Bench:
    """Collects rows. ``impls``: record only these implementations (None: all); ``deadline``
    (a ``time.perf_counter()`` value): rows reached after it are skipped ("time budget")."""

    def __init__(self, iters, *, impls=None, deadline=None):
        self.iters = iters
        self.rows = []
        self.impls = None if impls is None else set(impls)
        self.deadline = deadline

    def run(self, kernel, case, impl, fn, args, flops_fwd, bwd_factor, *, interpret=False, skip=None):
        """Times the forward and forward+backward (grad of a sum over the outputs) of ``fn``."""
        if self.impls is not None and impl not in self.impls:
            return
        for pass_name, factor in (("fwd", 1.0), ("fwd+bwd", bwd_factor)):
            row = dict(kernel=kernel, case=case, impl=impl, flops_fwd=flops_fwd, **{"pass": pass_name})
            if interpret:
                row["interpret"] = True
            if not skip and self.deadline is not None and time.perf_counter() > self.deadline:
                skip = "time budget spent before this row"
            if skip or (pass_name == "fwd+bwd" and bwd_factor is None):
                row.update(status="skipped", reason=skip or "forward-only row (no VJP)")
                self.rows.append(row)
                continue
            try:
                if pass_name == "fwd":
                    f = jax.jit(fn)
                else:
                    def loss(*a):
                        outs = jax.tree.leaves(fn(*a))
                        return sum(jnp.sum(o.astype(jnp.float32)) for o in outs)
                    diff = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
                    f = jax.jit(jax.grad(loss, argnums=diff))
                sec = _time(f, args, self.iters)
                row.update(status="ok", time_ms=round(sec * 1e3, 4),
                           tflops=float(f"{flops_fwd * factor / sec / 1e12:.4g}"))
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc(file=sys.stderr)
            self.rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)


def _tokamax():
    try:
        import tokamax  # noqa: F401
        return tokamax, None
    except Exception as e:  # noqa: BLE001
        return None, f"tokamax not importable ({type(e).__name__})"


def _group_sizes(rows, experts, skewed, rng):
    if not skewed:
        base = np.full(experts, rows // experts)
        base[: rows - base.sum()] += 1
        return base
    p = rng.dirichlet(np.full(experts, 2.0))
    p[rng.choice(experts, 8 if experts > 8 else 1, replace=False)] = 0.0  # empty experts
    return rng.multinomial(rows, p / p.sum())


def _dense_same_flops(b: Bench, kernel, case, flops, dtype, rng):
    """A square ``[d, d] × [d, d]`` matmul with ``2·d³`` ≈ ``flops`` (d a multiple of 128, or 16)."""
    step = 128 if flops > 2 * 128 ** 3 else 16
    d = max(int(round((flops / 2) ** (1 / 3) / step)) * step, step)
    a = jnp.asarray(rng.normal(size=(d, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), dtype)
    b.run(kernel, case, "dense", lambda a, w: jnp.dot(a, w), (a, w), 2.0 * d ** 3, 3.0)


def bench_gmm(b: Bench, cfg, rng, interpret):
    dtype = jnp.dtype(cfg["dtype"])
    tk, tk_err = _tokamax()
    mem = _device_memory()
    for tokens in cfg["tokens"]:
        m = tokens * cfg["top_k"]
        for k, n in cfg["dims"]:
            lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
            rhs = jnp.asarray(rng.normal(size=(cfg["experts"], k, n)) / np.sqrt(k), dtype)
            w2 = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
            flops = 2.0 * m * k * n
            for skewed in cfg.get("loads", (False, True)):
                gs = jnp.asarray(_group_sizes(m, cfg["experts"], skewed, rng), jnp.int32)
                case = f"T={tokens} M={m} {k}->{n} {'skewed' if skewed else 'balanced'}"
                b.run("gmm", case, "pallas", lambda a, w, g=gs: grouped_matmul(a, w, g, impl="pallas"), (lhs, rhs), flops, 3.0,
                      interpret=interpret)
                if platform() == "gpu":
                    b.run("gmm", case, "pallas_triton", lambda a, w, g=gs: pallas_gmm.gmm(a, w, g, variant="gpu"),
                          (lhs, rhs), flops, 3.0)
                    # kernel alone on a prebuilt tile-aligned layout (what a fused permutation would feed)
                    from . import pallas_gmm_mgpu
                    dest, tg, rows_p = pallas_gmm_mgpu.aligned_tiles(gs, m, 128)
                    lhs_p = jnp.zeros((rows_p, k), dtype).at[dest].set(lhs, mode="drop")
                    b.run("gmm", case, "pallas_mosaic_aligned",
                          lambda a, w, t=tg: pallas_gmm_mgpu.gmm_aligned(a, w, t, block_m=128, block_n=128 if n % 128 == 0 else 64)[0],
                          (lhs_p, rhs), flops, None)
                b.run("gmm", case, "xla", lambda a, w, g=gs: xla_gmm.gmm(a, w, g), (lhs, rhs), flops, 3.0)
                # stock jax.lax.ragged_dot: expanded densely over the experts on GPU/CPU (an
                # E·M·K temporary for the forward, more for the backward)
                expand = 3 * cfg["experts"] * m * k * dtype.itemsize
                b.run("gmm", case, "ragged_dot", lambda a, w, g=gs: jax.lax.ragged_dot(a, w, g), (lhs, rhs), flops, 3.0,
                      skip=(f"dense expansion needs ~{expand / 2**30:.0f} GiB > device memory"
                            if mem is not None and expand > mem else None))
                b.run("gmm", case, "dense", lambda a, w: jnp.dot(a, w), (lhs, w2), flops, 3.0)
                if tk is None:
                    b.run("gmm", case, "tokamax", None, (), flops, 3.0, skip=tk_err)
                else:
                    b.run("gmm", case, "tokamax", lambda a, w, g=gs: tk.ragged_dot(a, w, g), (lhs, rhs), flops, 3.0)


def bench_attention(b: Bench, cfg, rng, interpret):
    from . import cudnn_attention
    dtype = jnp.dtype(cfg["dtype"])
    h, hkv, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    tk, tk_err = _tokamax()
    mem = _device_memory()
    for s in cfg["seq"]:
        q = jnp.asarray(rng.normal(size=(1, s, h, d)), dtype)
        k = jnp.asarray(rng.normal(size=(1, s, hkv, d)), dtype)
        v = jnp.asarray(rng.normal(size=(1, s, hkv, d)), dtype)
        flops = 2.0 * s * s * h * d
        case = f"S={s} H={h}/{hkv} D={d} causal"
        b.run("attention", case, "pallas", lambda q, k, v: pallas_attention.attention(q, k, v), (q, k, v), flops, 3.5,
              interpret=interpret)
        scores_bytes = 3 * 4 * s * s * h  # fp32 scores, probabilities and their gradient
        too_big = mem is not None and scores_bytes > mem
        b.run("attention", case, "xla", lambda q, k, v: xla_attention.attention(q, k, v), (q, k, v), flops, 3.5,
              skip=f"S×S scores need ~{scores_bytes / 2**30:.0f} GiB > device memory" if too_big else None)
        b.run("attention", case, "xla_blockwise", lambda q, k, v: xla_flash_attention.attention(q, k, v), (q, k, v),
              flops, 3.5)
        why = cudnn_attention.why_unsupported(q, k, v)
        b.run("attention", case, "cudnn", lambda q, k, v: cudnn_attention.attention(q, k, v), (q, k, v), flops, 3.5,
              skip=why)
        if tk is None:
            b.run("attention", case, "tokamax", None, (), flops, 3.5, skip=tk_err)
        else:
            b.run("attention", case, "tokamax", lambda q, k, v: tk.dot_product_attention(q, k, v, is_causal=True),
                  (q, k, v), flops, 3.5)
        _dense_same_flops(b, "attention", case, flops, dtype, rng)


def bench_ssd(b: Bench, cfg, rng, interpret):
    dtype = jnp.dtype(cfg["dtype"])
    h, p, g, n, q = cfg["heads"], cfg["head_dim"], cfg["groups"], cfg["state"], cfg["chunk"]
    for s in cfg["seq"]:
        x = jnp.asarray(rng.normal(size=(1, s, h, p)), dtype)
        dt = jnp.asarray(rng.uniform(0.001, 0.1, size=(1, s, h)), jnp.float32)
        A = -jnp.asarray(rng.uniform(1, 16, size=(h,)), jnp.float32)
        bm = jnp.asarray(rng.normal(size=(1, s, g, n)), dtype)
        cm = jnp.asarray(rng.normal(size=(1, s, g, n)), dtype)
        flops = float(s * h * (2 * q * n + 2 * q * p + 4 * p * n))
        case = f"S={s} H={h} P={p} G={g} N={n} Q={q}"
        args = (x, dt, A, bm, cm)
        b.run("ssd", case, "pallas", lambda *a: pallas_ssd.ssd(*a, chunk_size=q), args, flops, 3.0,
              interpret=interpret)
        b.run("ssd", case, "xla", lambda *a: xla_ssd.ssd(*a, chunk_size=q), args, flops, 3.0)
        _dense_same_flops(b, "ssd", case, flops, dtype, rng)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (what CPU can run)")
    ap.add_argument("--only", default="gmm,attention,ssd", help="comma-separated subset of gmm,attention,ssd")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfgs = SMOKE if args.smoke else FULL
    interpret = on_cpu()
    if interpret and not args.smoke:
        raise SystemExit("full Nemotron shapes need an accelerator (Pallas runs interpreted on CPU); use --smoke")
    rng = np.random.default_rng(args.seed)
    b = Bench(args.iters)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for name in only:
        if name not in cfgs:
            raise SystemExit(f"unknown kernel {name!r}; valid: {', '.join(cfgs)}")
        {"gmm": bench_gmm, "attention": bench_attention, "ssd": bench_ssd}[name](b, cfgs[name], rng, interpret)
    dev = jax.devices()[0]
    doc = dict(device=f"{platform()}: {getattr(dev, 'device_kind', str(dev))}", jax=jax.__version__,
               smoke=args.smoke, iters=args.iters, interpret=interpret,
               flop_conventions="matmul 2MNK (fwd+bwd 3x); causal attention 2·S²·H·D (fwd+bwd 3.5x); "
                                "ssd S·H·(2QN+2QP+4PN) (fwd+bwd 3x)",
               rows=b.rows)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
