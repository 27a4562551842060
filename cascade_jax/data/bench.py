"""Data benchmarks; prints one JSON object.

    python -m cascade_jax.data.bench            # packing at 4K / 32K / 256K + pipeline tokens/s
    python -m cascade_jax.data.bench --quick    # smaller sample (a few seconds)

1. Packing efficiency (real tokens / slots) of the look-ahead first-fit-decreasing packer
   against the greedy in-order baseline (next-fit) on the same lengths: a long-tailed SFT-like
   length distribution, log-normal (median 3K tokens, sigma 1.3) clipped to [100, 100K];
   examples longer than ``seq_len`` are truncated to it (``data.overlong = truncate``).
2. Pipeline throughput: ``sft_batches`` end to end (JSONL read, field mapping, chat template,
   tokenize, pack) on synthetic multi-turn conversations in one process, tokens/s. Compared
   with what one host must feed a train step of the 30B-A3B model (assumption stated in the
   output: 6 * 3.2e9 active FLOPs per token for forward + backward, H100/H200-class chips at
   40% of 989 TFLOP/s bf16, 8 chips per host, each host loading its own share).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np

from cascade_jax.data import packing
from cascade_jax import config as C
from cascade_jax.data.convert import write_jsonl
from cascade_jax.data.sft import sft_batches
from cascade_jax.data.tokenizer import tiny_tokenizer

_WORDS = ("the of and to in is that for it as with was on be by this are or from at which an but "
          "not have they we can all one has their if there what so will would about into more "
          "other than then them these some could time only its when first also after two may "
          "apple river cloud stone tiger piano lemon candle forest rocket garden pencil mirror "
          "planet window dragon sum answer boxed function value return tool proof lemma hence "
          "therefore integer prime matrix vector gradient").split()


def sft_lengths(n: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    return np.clip(np.exp(r.normal(np.log(3000), 1.3, size=n)), 100, 100_000).astype(np.int64)


def bench_packing(n: int, buffer: int) -> dict:
    out = {}
    for seq_len in (4096, 32768, 262144):
        lens = np.minimum(sft_lengths(n), seq_len).tolist()
        t0 = time.perf_counter()
        rows = packing.ffd_stream(lens, seq_len, buffer)
        dt = time.perf_counter() - t0
        base = packing.greedy_in_order(lens, seq_len)
        e, b = packing.efficiency(rows, lens, seq_len), packing.efficiency(base, lens, seq_len)
        out[str(seq_len)] = {"examples": n, "buffer": buffer, "rows": len(rows),
                             "ffd_efficiency": round(e, 4), "greedy_in_order_efficiency": round(b, 4),
                             "ratio_vs_greedy": round(e / b, 3), "pack_s": round(dt, 3)}
    return out


def _conversation(r: random.Random, target_words: int) -> dict:
    def text(n):
        return " ".join(r.choice(_WORDS) for _ in range(n))

    turns = r.randint(1, 3)
    msgs = [{"role": "system", "content": text(20)}]
    per = max(1, target_words // turns)
    for _ in range(turns):
        msgs.append({"role": "user", "content": text(max(1, per // 5))})
        msgs.append({"role": "assistant", "content": text(max(1, per // 5)),
                     "reasoning_content": text(max(1, 3 * per // 5))})
    return {"messages": msgs}


def bench_pipeline(n_rows: int, seq_len: int, seconds: float) -> dict:
    r = random.Random(0)
    words = np.minimum(sft_lengths(n_rows, seed=1) // 3, seq_len // 4)  # ~3 tiny tokens per word
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.jsonl")
        write_jsonl((_conversation(r, int(w)) for w in words), path)
        cfg = C.apply_overrides(C.Config(), [
            f'data.sources=[{{"path": "{path}"}}]', f"data.seq_len={seq_len}", "data.batch_rows=1",
            "data.pack_buffer=256", "data.overlong=truncate"])
        tok = tiny_tokenizer()
        it = sft_batches(cfg, tok)
        next(it)  # warm up (file index, template compile)
        t0, rows = time.perf_counter(), 0
        tokens0 = it.stats["real_tokens"]
        while time.perf_counter() - t0 < seconds:
            next(it)
            rows += 1
        dt = time.perf_counter() - t0
        real = it.stats["real_tokens"] - tokens0
    tps = real / dt
    flops_per_token = 6 * 3.2e9
    chip_flops = 0.40 * 989e12
    need_per_chip = chip_flops / flops_per_token
    return {"seq_len": seq_len, "rows": rows, "seconds": round(dt, 2),
            "tokens_per_s_one_process": round(tps), "efficiency": round(it.efficiency, 4),
            "train_tokens_per_s_per_chip_assumed": round(need_per_chip),
            "train_tokens_per_s_per_host_of_8_assumed": round(8 * need_per_chip),
            "loader_processes_per_host_needed": round(8 * need_per_chip / tps, 2),
            "assumption": "30B-A3B, 6*3.2e9 FLOP/token fwd+bwd, 40% MFU of 989 TFLOP/s bf16, "
                          "8 chips/host; tiny 512-token BPE (more tokens per word than the real "
                          "131K vocabulary)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 3000 if args.quick else 20000
    out = {"packing": bench_packing(n, buffer=1024),
           "pipeline": bench_pipeline(400 if args.quick else 3000, 32768, 3.0 if args.quick else 15.0)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
