"""Model throughput benchmark; prints one JSON object.

    python launch/bench_model.py [--preset tiny] [--batch 4] [--seq 256] [--decode 64] [--backward]

Measured in one run, each with its baseline:
* forward tokens/s, and the ratio of its FLOP rate to a dense matmul performing the model's
  weight-matmul FLOPs (2 · active params · tokens) in one product — the achievable ceiling;
* forward + backward tokens/s (``--backward``), same baseline at 3× the FLOPs;
* decode tokens/s with the prefill/decode caches, vs re-running the full forward for each new
  token (no cache), the naive baseline.
For the full-width proxy on a GPU: ``--preset nano-30b-a3b --override pattern=MEM*E`` (any
``ModelConfig`` field; values parse as JSON, else as strings).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cascade_jax.config import parse_value  # noqa: E402
from models import nemotron_h as nh  # noqa: E402


def _time(fn, *args, iters=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=JSON")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args(argv)
    over = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.override)}
    cfg = nh.preset(args.preset, **over)
    dtype = jnp.dtype(args.dtype)
    params = jax.jit(nh.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), dtype)
    B, T = args.batch, args.seq
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    _, active = nh.param_counts(cfg)
    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "preset": args.preset, "overrides": over, "batch": B, "seq": T, "dtype": args.dtype}

    fwd = jax.jit(nh.forward, static_argnums=2)
    t_fwd = _time(fwd, params, toks, cfg)
    flops = 2.0 * active * B * T
    # Baseline: one dense matmul with the same FLOPs ([B*T, H] x [H, active/H]).
    h = cfg.hidden_size
    a = jnp.ones((B * T, h), dtype)
    w = jnp.ones((h, max(1, active // h)), dtype)
    t_mm = _time(jax.jit(lambda x, y: x @ y), a, w)
    out["forward"] = {"tokens_per_s": B * T / t_fwd, "time_s": t_fwd, "tflops": flops / t_fwd / 1e12,
                      "dense_matmul_tflops": flops / t_mm / 1e12, "ratio_to_dense_matmul": t_mm / t_fwd}

    if args.backward:
        def loss(p):
            return jnp.mean(nh.forward(p, toks, cfg)[..., 0])
        t_bwd = _time(jax.jit(jax.value_and_grad(loss)), params)
        out["forward_backward"] = {"tokens_per_s": B * T / t_bwd, "time_s": t_bwd,
                                   "tflops": 3 * flops / t_bwd / 1e12,
                                   "ratio_to_dense_matmul": 3 * t_mm / t_bwd}

    # Decode: prefill T/2 then ``--decode`` cached steps, vs re-running forward per token.
    P, N = T // 2, args.decode
    prefill = jax.jit(nh.prefill, static_argnums=2, static_argnames="max_len")
    step = jax.jit(nh.decode_step, static_argnums=4)

    def decode_all(p, prompt):
        _, cache = prefill(p, prompt, cfg, max_len=P + N)
        tok = prompt[:, -1]
        for i in range(N):
            logits, cache = step(p, cache, tok, jnp.full((B,), P + i, jnp.int32), cfg)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return tok

    t_dec = _time(decode_all, params, toks[:, :P], iters=2)
    n_naive = min(N, 8)

    def naive(p, prompt):
        seq = prompt
        for _ in range(n_naive):  # recompute the whole prefix per new token
            nxt = jnp.argmax(fwd(p, jnp.pad(seq, ((0, 0), (0, P + N - seq.shape[1])))[:, :P + N], cfg)
                             [:, seq.shape[1] - 1], -1).astype(jnp.int32)
            seq = jnp.concatenate([seq, nxt[:, None]], 1)
        return seq

    t_naive = _time(naive, params, toks[:, :P], iters=1) / n_naive * N
    out["decode"] = {"tokens_per_s": B * N / t_dec, "time_s": t_dec, "prefill_len": P, "new_tokens": N,
                     "no_cache_tokens_per_s": B * N / t_naive, "ratio_to_no_cache": t_naive / t_dec}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
