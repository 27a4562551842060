"""Rollout engine benchmark: prints one JSON object with ratios to baselines measured in the same
run. The engine is the only decode loop; both baselines are its own decode program alone
(:meth:`~cascade_jax.rollout.engine.JaxEngine.bare_decode`: sampling + ``decode_step`` over
``num_slots`` rows with no host work, no prefill and no refill; one timed region serves both).

* ``steady``: every slot always busy (``4 · num_slots`` equal requests, prompt 16, response
  ``--steady-len`` tokens). Engine tokens/s against the bare decode at the same batch size
  (the limit). Goal: ratio >= 0.8.
* ``mixed``: ``8 · num_slots`` requests whose response lengths are spread 10:1, log-uniform
  between ``L/10`` and ``L`` (many short, few long, as RL response lengths are), against a
  fixed batch: batches of ``num_slots`` prompts, each decoding to the longest length ``L`` of
  the workload (a fixed batch cannot retire rows early), timed at the bare decode's speed
  (``batches · L`` decode steps at the bare decode's time per step, whose cost does not depend
  on the position; no prefill, no host work, so the fixed batch gets its best case). Useful
  tokens (the requested lengths) per second. Goal: ratio >= 2. ``ideal_ratio`` = fixed-batch
  decode steps / (useful tokens / slots), the ratio a refill with zero overhead would reach on
  this workload.
* ``mismatch``: engine sampling log-probs vs the trainer's ``token_logprobs`` (max / mean
  |Δ log p|) on the mixed workload's first requests, in the benchmark's dtype.

Every timed region runs once untimed first (compilation), then ``--repeats`` times interleaved
with the others; the best wall time and the best CPU time (``ratio_cpu_time``, steadier on a
shared machine) are kept. Run: ``python -m cascade_jax.rollout.bench [--preset tiny] [--slots 8]``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import nemotron_h

from .engine import JaxEngine
from .mismatch import engine_mismatch
from .types import Request, SamplingParams


def _measure(fns: dict, repeats: int) -> dict:
    """``{name: (wall_s, cpu_s)}``, the minimum over ``repeats`` interleaved runs of each
    ``fns[name]()`` (every one run once first, untimed). CPU time (this process, all threads)
    is the steadier measure on a shared machine; wall time is what a user waits."""
    for fn in fns.values():
        fn()
    best = {k: (float("inf"), float("inf")) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            best[k] = (min(best[k][0], w), min(best[k][1], c))
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--steps-per-call", type=int, default=64)
    ap.add_argument("--refill-batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steady-len", type=int, default=64)
    ap.add_argument("--mixed-max", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--overlap", action="store_true", help="engine with host/device overlap")
    args = ap.parse_args(argv)
    model = nemotron_h
    cfg = model.preset(args.preset)
    params = jax.jit(model.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0),
                                                               jnp.dtype(args.dtype))
    S, P = args.slots, args.prompt_len
    n_req = 4 * S  # steady; the mixed workload has twice as many
    max_len = P + max(args.steady_len, args.mixed_max) + args.steps_per_call
    eng = JaxEngine(cfg, params, num_slots=S, max_len=max_len, prompt_buckets=(P,),
                    steps_per_call=args.steps_per_call, overlap=args.overlap,
                    refill_batch=args.refill_batch)
    eng.warmup()
    rng = np.random.default_rng(0)
    prompts = [tuple(rng.integers(3, cfg.vocab_size, P).tolist()) for _ in range(2 * n_req)]

    # steady: all slots busy, equal lengths
    steady = [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=args.steady_len,
                                                            temperature=1.0, seed=i))
              for i, p in enumerate(prompts[:n_req])]
    # mixed: response lengths spread 10:1 (log-uniform), engine vs fixed batches
    L, n_mixed = args.mixed_max, 2 * n_req
    lengths = np.exp(np.linspace(np.log(L / 10), np.log(L), n_mixed)).round().astype(int)
    rng.shuffle(lengths)
    mixed = [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=int(m), temperature=1.0,
                                                           seed=i))
             for i, (p, m) in enumerate(zip(prompts, lengths))]
    useful = int(lengths.sum())

    # the bare loop decodes at least as many tokens per row as a steady request (whole calls)
    t = _measure({"steady": lambda: eng.generate(steady),
                  "bare": eng.bare_decode(args.steady_len, P),
                  "mixed": lambda: eng.generate(mixed)}, args.repeats)
    bare_steps = -(-args.steady_len // args.steps_per_call) * args.steps_per_call
    fixed_steps = n_mixed // S * L  # fixed batches: every row decodes L steps
    t["fixed"] = tuple(x * fixed_steps / bare_steps for x in t["bare"])
    steady_tokens = n_req * args.steady_len
    bare_tokens = S * bare_steps
    mm = engine_mismatch(eng, mixed[:S])
    report = {
        "backend": jax.default_backend(), "preset": args.preset, "dtype": args.dtype,
        "num_slots": S, "steps_per_call": args.steps_per_call, "overlap": eng.overlap,
        "refill_batch": eng.refill_batch,
        "steady": {"requests": n_req, "response_len": args.steady_len,
                   "engine_tokens_per_s": round(steady_tokens / t["steady"][0], 1),
                   "bare_decode_tokens_per_s": round(bare_tokens / t["bare"][0], 1),
                   "ratio": round(steady_tokens / t["steady"][0] / (bare_tokens / t["bare"][0]), 3),
                   "ratio_cpu_time": round(steady_tokens / t["steady"][1] / (bare_tokens / t["bare"][1]), 3),
                   "goal": 0.8},
        "mixed": {"requests": n_mixed, "response_len_min": int(lengths.min()),
                  "response_len_max": int(lengths.max()), "useful_tokens": useful,
                  "engine_tokens_per_s": round(useful / t["mixed"][0], 1),
                  "fixed_batch_tokens_per_s": round(useful / t["fixed"][0], 1),
                  "ratio": round(t["fixed"][0] / t["mixed"][0], 3),
                  "ratio_cpu_time": round(t["fixed"][1] / t["mixed"][1], 3),
                  "ideal_ratio": round(fixed_steps / (useful / S), 3), "goal": 2.0},
        "mismatch": {k: mm[k] for k in ("mismatch_abs_max", "mismatch_abs_mean", "tokens")},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
