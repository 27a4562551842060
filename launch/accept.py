"""Accelerator acceptance in one command: kernels, a 30B-width train step and the engine, each
figure beside a baseline measured in the same run; writes ``accept.json`` and ``accept.md``.

    python launch/accept.py [--out-dir accept] [--budget 450] [--only SECTION,...]   # GPU / TPU host
    python launch/accept.py --smoke --out-dir /tmp/accept                             # CPU, tiny shapes

Sections (in run order; each records ``status`` ok / error / skipped, its error, its seconds):

* ``platform`` — backend, device kind, documented dense bf16 peak and HBM bandwidth of the kind
  (:data:`PEAKS`), beside a measured square bf16 matmul and a device copy.
* ``train`` — a 30B-width slice of Nemotron-3-Nano (``--slice``: the real layer kinds at full
  width, default the longest of :data:`SLICES` whose train state fits the device; embeddings and
  LM head included), the project's GRPO step (``compile_train_step``, kernels ``auto``) on
  ``batch × seq`` tokens: tokens/s, MFU = ``6 · N_active · tokens / step_s / peak`` (the
  runner's convention; ``mfu_traced`` counts the traced step's matmul FLOPs instead, attention
  and recompute included), peak device memory beside the planner's CPU estimate of the same
  step (``launch/plan.py --json``, run as a CPU subprocess in parallel) and their ratio.
* ``engine`` — :class:`cascade_jax.rollout.engine.JaxEngine` on that slice: prefill tokens/s
  (vs the bare jitted ``prefill``) and decode tokens/s at 1, 16 and 64 slots (vs the engine's
  decode program alone, ``JaxEngine.bare_decode``).
* ``mismatch`` — sampling log-probs vs the train step's log-probs in bf16: the zero-mismatch
  sampler (``generate_exact``, trainer at ``row_len``) bit for bit, beside the default engine.
* ``correctness`` — every Pallas kernel at production shapes in bf16, forward and backward (a
  fixed random cotangent), against its XLA reference run in fp32 on the same bf16 inputs:
  ``err = max|x − ref| / max|ref|`` per output and gradient; pass iff ``err <= 2e-2`` or
  ``err <= 1.5 ×`` the XLA reference's own bf16 error (reported beside it). Grouped matmul
  (Triton and Mosaic GPU variants on GPU, the TPU layout on TPU; up-projection with the relu²
  epilogue and down-projection), flash attention (causal GQA; with segment ids), Mamba2 SSD
  (with initial state and segment ids).
* ``speed_gmm`` / ``speed_attention`` / ``speed_ssd`` — ``kernels/benchmark.py`` rows at 4K,
  8K and 32K tokens, forward and forward+backward, TFLOP/s, each of our rows with its ratio to
  every baseline of the same case: grouped matmul vs ``jax.lax.ragged_dot``, tokamax and the
  XLA loop ``auto`` runs today; attention vs cuDNN and the XLA blockwise form; SSD vs the
  pure-JAX chunked form. FLOPs: grouped matmul ``2·M·K·N`` (M = 6·tokens) ×3 fwd+bwd; causal
  attention ``2·S²·H·D`` ×3.5; SSD ``S·H·(2QN+2QP+4PN)`` ×3.

Robustness: the work runs in a child process that rewrites ``accept.json`` after every section;
a section that raises records its error and the run goes on; a child that dies (a crash, an
out-of-memory abort) is restarted on the remaining sections, the dead one recorded as
``crashed``. ``--budget`` seconds are shared out per section (:data:`SHARES`); a section stops
starting new cases once its share is spent (those rows say ``time budget``), and a section
reached after the global budget is skipped. ``--smoke``: tiny shapes on CPU, Pallas in
interpret mode (the Mosaic GPU kernel in JAX's GPU interpreter), well under a minute.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("platform", "train", "engine", "mismatch", "correctness", "speed_gmm", "speed_attention", "speed_ssd")
#: share of ``--budget`` per section (the planner subprocess runs alongside, on CPU)
SHARES = {"platform": 0.02, "train": 0.15, "engine": 0.2, "mismatch": 0.06, "correctness": 0.17,
          "speed_gmm": 0.16, "speed_attention": 0.14, "speed_ssd": 0.1}

#: documented dense bf16 peak (FLOP/s) and HBM bandwidth (B/s) per device kind (substring of
#: ``device_kind``); datasheets: H100 SXM5 989.4 TF/s, 3.35 TB/s; H200 same compute, 4.8 TB/s;
#: TPU v5p 459 TF/s, 2.765 TB/s; v5e ("TPU v5 lite") 197 TF/s, 819 GB/s; v6e ("TPU v6 lite",
#: Trillium) 918 TF/s, 1.64 TB/s.
PEAKS = {
    "H200": (989.4e12, 4.8e12), "H100": (989.4e12, 3.35e12),
    "TPU v5p": (459e12, 2.765e12), "TPU v5 lite": (197e12, 0.819e12), "TPU v5e": (197e12, 0.819e12),
    "TPU v6 lite": (918e12, 1.64e12), "TPU v6e": (918e12, 1.64e12),
}

#: slice patterns tried longest first (at least one Mamba, one attention and one MoE layer)
SLICES = ("MEM*EME", "MEM*E", "M*E")
TOL = 2e-2            # bf16 tolerance (max-normalised), the project's
TOL_FACTOR = 1.5      # ... or this multiple of the XLA reference's own bf16 error

GOALS = {  # compass goals (kernels/README.md); absolute TF/s goals refer to one H100
    ("gmm", "fwd"): ("tflops", 600.0), ("gmm", "fwd+bwd"): ("tflops", 500.0),
    ("attention", "fwd+bwd"): ("ratio:cudnn", 1.0), ("ssd", "fwd+bwd"): ("ratio:xla", 3.0),
}
OURS = {"gmm": ("pallas", "pallas_triton"), "attention": ("pallas",), "ssd": ("pallas",)}
BASELINES = {"gmm": ("ragged_dot", "tokamax", "xla"), "attention": ("cudnn", "xla_blockwise"), "ssd": ("xla",)}

FULL = dict(
    gmm=dict(tokens=(4096, 8192, 32768), top_k=6, experts=128, dims=((2688, 1856),), loads=(True, False),
             dtype="bfloat16"),
    attention=dict(seq=(4096, 8192, 32768), heads=32, kv_heads=2, head_dim=128, dtype="bfloat16"),
    ssd=dict(seq=(4096, 8192, 32768), heads=64, head_dim=64, groups=8, state=128, chunk=128, dtype="bfloat16"),
    correct=dict(tokens=4096, seq=4096, gmm_cases=2),
    train=dict(batch=2, seq=4096, iters=3),
    engine=dict(slots=(1, 16, 64), prompt=1024, decode=64, steps_per_call=32, repeats=2),
    mismatch=dict(row_len=256, prompts=4, new_tokens=8), matmul=8192, copy_bytes=2**30, iters=5)
SMOKE = dict(
    gmm=dict(tokens=(32,), top_k=2, experts=8, dims=((64, 32),), loads=(True,), dtype="float32"),
    attention=dict(seq=(64,), heads=4, kv_heads=2, head_dim=16, dtype="float32"),
    ssd=dict(seq=(64,), heads=4, head_dim=8, groups=2, state=16, chunk=16, dtype="float32"),
    correct=dict(tokens=24, seq=48, gmm_cases=1),
    train=dict(batch=2, seq=32, iters=1), engine=dict(slots=(2,), prompt=8, decode=6, steps_per_call=4, repeats=1),
    mismatch=dict(row_len=16, prompts=3, new_tokens=4), matmul=128, copy_bytes=2**20, iters=1)


# ------------------------------------------------------------------------------------------
# helpers


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:400]}"


def _median_time(fn, iters: int) -> float:
    import jax
    jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def device_peak(kind: str):
    """``(peak_flops, hbm_bytes_per_s, matched_key)`` for a device kind, or ``(None, None, None)``."""
    for key, (f, bw) in PEAKS.items():
        if key.lower() in kind.lower():
            return f, bw, key
    return None, None, None


def slice_params(cfg) -> int:
    from models import nemotron_h as nh
    return nh.param_counts(cfg)[0]


def pick_slice(model_preset: str, memory_bytes, smoke: bool) -> str:
    """The longest :data:`SLICES` pattern whose train state (fp32 master + Adam + fp32 grads +
    bf16 copy ≈ 18 B/param) takes at most 60 % of the device memory (the shortest if unknown)."""
    from models import nemotron_h as nh
    if smoke or memory_bytes is None:
        return SLICES[-1]
    for pat in SLICES:
        if 18 * slice_params(nh.preset(model_preset, pattern=pat)) <= 0.6 * memory_bytes:
            return pat
    return SLICES[-1]


def _memory_limit():
    import jax
    try:
        return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - CPU and some backends report nothing
        return None


def _peak_memory():
    import jax
    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        return None
    return st.get("peak_bytes_in_use")


class Budget:
    """Wall-clock budget of one section (``deadline`` a ``perf_counter`` value)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def spent(self) -> bool:
        return time.perf_counter() > self.deadline


# ------------------------------------------------------------------------------------------
# sections


def sec_platform(ctx, budget):
    import jax
    import jax.numpy as jnp
    from kernels._common import platform

    dev = jax.devices()[0]
    kind = str(getattr(dev, "device_kind", dev))
    peak, bw, key = device_peak(kind)
    out = {"backend": jax.default_backend(), "platform": platform(), "device_kind": kind,
           "device_count": jax.device_count(), "jax": jax.__version__, "memory_bytes": _memory_limit(),
           "peak_table_key": key, "peak_bf16_flops": peak, "peak_hbm_bytes_per_s": bw}
    n = ctx["cfg"]["matmul"]
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(jnp.dot)
    sec = _median_time(lambda: mm(a, a), ctx["cfg"]["iters"])
    out["dense_matmul"] = {"shape": f"[{n},{n}]x[{n},{n}] bf16", "flops": 2.0 * n ** 3, "time_ms": sec * 1e3,
                           "tflops": 2.0 * n ** 3 / sec / 1e12,
                           "ratio_to_peak": (2.0 * n ** 3 / sec / peak) if peak else None}
    nb = ctx["cfg"]["copy_bytes"]
    x = jnp.ones((nb // 2,), jnp.bfloat16)
    inc = jax.jit(lambda x: x + 1)  # reads and writes every byte once
    sec = _median_time(lambda: inc(x), ctx["cfg"]["iters"])
    out["copy"] = {"bytes_moved": 2 * nb, "time_ms": sec * 1e3, "bytes_per_s": 2 * nb / sec,
                   "ratio_to_peak": (2 * nb / sec / bw) if bw else None}
    ctx["peak"] = peak
    return out


def _rl_batch(cfg, batch: int, seq: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np
    from cascade_jax.rl.batch import RLBatch

    rng = np.random.default_rng(seed)
    prompt = seq // 4
    tok = rng.integers(3, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
    mask = np.zeros((batch, seq), np.float32)
    mask[:, prompt:] = 1.0
    return RLBatch(tokens=jnp.asarray(tok), positions=jnp.asarray(np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))),
                   segment_ids=jnp.ones((batch, seq), jnp.int32), loss_mask=jnp.asarray(mask),
                   rollout_logp=jnp.asarray(-rng.uniform(0.5, 3.0, size=(batch, seq)).astype(np.float32) * mask),
                   rewards=jnp.asarray(np.arange(batch) % 2, jnp.float32), group_ids=jnp.zeros((batch,), jnp.int32),
                   finish_reason=jnp.zeros((batch,), jnp.int32), domain_ids=jnp.zeros((batch,), jnp.int32))


def _start_planner(ctx):
    """``launch/plan.py --json`` for the slice on a CPU subprocess (the dry run's estimate)."""
    c = ctx["cfg"]["train"]
    cmd = [sys.executable, str(ROOT / "launch" / "plan.py"), "--preset", ctx["preset"], "--mesh", "data:1",
           "--seq-len", str(c["seq"]), "--batch", str(c["batch"]), "--override", f"pattern={ctx['slice']}", "--json"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    out = tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False)
    err = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(ROOT))
    return {"proc": proc, "out": out.name, "err": err.name, "cmd": " ".join(cmd[1:])}


def _collect_planner(pl, timeout: float) -> dict:
    proc = pl["proc"]
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"status": "error", "error": f"planner still running after the budget ({timeout:.0f} s); killed",
                "command": pl["cmd"]}
    text = pathlib.Path(pl["out"]).read_text().strip()
    if proc.returncode != 0 or not text:
        tail = pathlib.Path(pl["err"]).read_text().strip().splitlines()[-3:]
        return {"status": "error", "error": f"exit {proc.returncode}: {' | '.join(tail)}", "command": pl["cmd"]}
    res = json.loads(text.splitlines()[-1])
    return {"status": "ok", "command": pl["cmd"], "total_bytes": res["total_bytes"],
            "params_bytes": res["params_bytes"], "optimizer_bytes": res["optimizer_bytes"],
            "temp_bytes": res["temp_bytes"], "argument_bytes": res["argument_bytes"],
            "flops_per_step": res["flops_per_step"], "flops_per_token": res["flops_per_token"]}


def sec_train(ctx, budget):
    import jax
    import jax.numpy as jnp
    from cascade_jax import sharding
    from cascade_jax.config import MeshConfig, OptimizerConfig
    from cascade_jax.sharding.plan import jaxpr_flops
    from models import nemotron_h as nh

    c = ctx["cfg"]["train"]
    cfg = ctx["model_cfg"]
    total, active = nh.param_counts(cfg)
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    mem_before = _peak_memory()
    state = sharding.init_train_state(cfg, OptimizerConfig(), jax.random.key(0), mesh)
    batch = _rl_batch(cfg, c["batch"], c["seq"])
    step = sharding.compile_train_step("grpo", mesh=mesh, state=state, batch=batch, model_cfg=cfg,
                                       compute_dtype=jnp.bfloat16)  # default GRPOSettings
    t0 = time.perf_counter()
    traced = step.trace(state, batch)
    traced_flops = jaxpr_flops(traced.jaxpr)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    compiled_bytes = (int(ma.argument_size_in_bytes) + int(ma.temp_size_in_bytes) + int(ma.output_size_in_bytes)
                      - int(ma.alias_size_in_bytes)) if ma is not None else None
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(c["iters"]):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = c["batch"] * c["seq"]
    flops6 = 6.0 * active * tokens
    peak = ctx.get("peak")
    peak_mem = _peak_memory()
    out = {"slice": ctx["slice"], "preset": ctx["preset"], "layers": len(cfg.pattern),
           "params_total": total, "params_active": active, "batch": c["batch"], "seq_len": c["seq"],
           "tokens_per_step": tokens, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
           "flops_formula": "6 · params_active · tokens (runner convention)", "flops_6n": flops6,
           "flops_traced": traced_flops, "tflops": flops6 / step_s / 1e12,
           "mfu": (flops6 / step_s / peak) if peak else None,
           "mfu_traced": (traced_flops / step_s / peak) if peak else None,
           "goal_mfu": 0.40, "loss": float(m["loss"]), "finite": bool(jnp.isfinite(m["loss"])),
           "peak_memory_bytes": peak_mem, "peak_memory_before_bytes": mem_before,
           "compiled_memory_bytes": compiled_bytes}
    del state
    out["planner"] = {"status": "running", "command": ctx["planner"]["cmd"]} if "planner" in ctx else \
        {"status": "skipped", "error": "planner not started"}
    if not peak_mem:
        out["peak_memory_note"] = "the backend reports no memory statistics (CPU); the ratio needs a device"
    return out


def attach_planner(train: dict, planner: dict) -> dict:
    """The train section with the planner's estimate and the measured / estimated ratios."""
    train = {**train, "planner": planner}
    if planner.get("status") == "ok":
        est = planner["total_bytes"]
        peak, compiled = train.get("peak_memory_bytes"), train.get("compiled_memory_bytes")
        train.update(planner_total_bytes=est, planner_flops_per_step=planner["flops_per_step"],
                     ratio_peak_to_planner=(peak / est) if peak else None,
                     ratio_compiled_to_planner=(compiled / est) if compiled else None)
    return train


def _model_params(ctx):
    import jax
    import jax.numpy as jnp
    from models import nemotron_h as nh
    if "params_bf16" not in ctx:
        ctx["params_bf16"] = jax.jit(nh.init_params, static_argnums=(0, 2))(ctx["model_cfg"], jax.random.key(0), jnp.bfloat16)
    return ctx["params_bf16"]


def sec_engine(ctx, budget):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.types import Request, SamplingParams
    from models import nemotron_h as nh

    c = ctx["cfg"]["engine"]
    cfg, params = ctx["model_cfg"], _model_params(ctx)
    P, N, spc = c["prompt"], c["decode"], c["steps_per_call"]
    rng = np.random.default_rng(0)
    rows = []
    for S in c["slots"]:
        row = {"slots": S, "prompt_len": P, "new_tokens": N}
        if budget.spent():
            rows.append({**row, "status": "skipped", "reason": "time budget spent before this row"})
            continue
        try:
            max_len = P + N + spc
            eng = JaxEngine(cfg, params, num_slots=S, max_len=max_len, prompt_buckets=(P,), prefill_sizes=(S,),
                            steps_per_call=spc)
            prompts = [tuple(rng.integers(3, cfg.vocab_size, P).tolist()) for _ in range(S)]
            reqs = lambda n: [Request(prompt_ids=p, sampling=SamplingParams(max_new_tokens=n, temperature=1.0, seed=i))
                              for i, p in enumerate(prompts)]
            eng.generate(reqs(N))  # compile admission and decode
            t1 = min(_wall(lambda: eng.generate(reqs(1))) for _ in range(c["repeats"]))
            tn = min(_wall(lambda: eng.generate(reqs(N))) for _ in range(c["repeats"]))
            pre = jax.jit(lambda p, t: nh.prefill(p, t, cfg, max_len=max_len, last_only=True)[0])
            toks = jnp.asarray(np.asarray(prompts, np.int32))
            t_pre = _median_time(lambda: pre(params, toks), c["repeats"])
            bare = eng.bare_decode(N, P)
            bare()
            t_bare = min(_wall(bare) for _ in range(c["repeats"]))
            dec = S * (N - 1) / max(tn - t1, 1e-9)
            row.update(status="ok", prefill_tokens_per_s=S * P / t1, bare_prefill_tokens_per_s=S * P / t_pre,
                       prefill_ratio=t_pre / t1, decode_tokens_per_s=dec, bare_decode_tokens_per_s=S * N / t_bare,
                       decode_ratio=dec / (S * N / t_bare),
                       note="prefill = generate(max_new_tokens=1); decode = (generate(N) - generate(1)) / (N - 1) steps")
            ctx.setdefault("engine", eng)  # the smallest engine is reused by the mismatch section
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            row.update(status="error", reason=_err(e))
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
    return {"slice": ctx["slice"], "rows": rows}


def _wall(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sec_mismatch(ctx, budget):
    import jax
    import numpy as np
    from cascade_jax import rl
    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.exact import generate_exact
    from cascade_jax.rollout.mismatch import engine_mismatch
    from cascade_jax.rollout.types import Request, SamplingParams

    c = ctx["cfg"]["mismatch"]
    cfg, params = ctx["model_cfg"], _model_params(ctx)
    R, n_new = c["row_len"], c["new_tokens"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, int(rng.integers(3, R // 2))).tolist() for _ in range(c["prompts"])]
    samples = generate_exact(params, cfg, prompts, row_len=R, num_slots=2, max_new_tokens=n_new, seed=3)
    n = len(samples)
    tok = np.zeros((n, R), np.int32)
    seg = np.zeros((n, R), np.int32)
    mask = np.zeros((n, R), np.float32)
    lp = np.zeros((n, R), np.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tok[i, :p], tok[i, p:p + r] = s.prompt_ids, s.response_ids
        seg[i, :p + r] = 1
        mask[i, p:p + r] = 1
        lp[i, p:p + r] = s.logprobs
    pos = np.broadcast_to(np.arange(R, dtype=np.int32), (n, R))
    batch = rl.SFTBatch(tokens=tok, positions=pos, segment_ids=seg, loss_mask=mask)
    train_lp = np.asarray(jax.jit(lambda p, b: rl.token_logprobs(p, b, cfg, row_len=R))(params, batch)[0])
    m = mask > 0
    d = np.abs(train_lp[m].astype(np.float64) - lp[m])
    out = {"dtype": "bfloat16", "slice": ctx["slice"], "row_len": R, "tokens": int(m.sum()),
           "exact": {"bitwise_equal": bool(np.array_equal(train_lp[m], lp[m])),
                     "equal_fraction": float((train_lp[m] == lp[m]).mean()) if m.any() else None,
                     "max_abs": float(d.max()) if d.size else 0.0, "mean_abs": float(d.mean()) if d.size else 0.0}}
    # baseline: the default engine (cached decode) against the default trainer path; the engine
    # section's smallest engine when there is one (its prompt bucket holds these prompts)
    try:
        eng = ctx.get("engine")
        if eng is None or eng.prompt_buckets[-1] < R // 2 or eng.max_len < eng.prompt_buckets[-1] + n_new:
            eng = JaxEngine(cfg, params, num_slots=2, max_len=R, prompt_buckets=(R // 2,), steps_per_call=n_new)
        reqs = [Request(prompt_ids=tuple(p), sampling=SamplingParams(max_new_tokens=n_new, temperature=1.0, seed=i))
                for i, p in enumerate(prompts)]
        mm = engine_mismatch(eng, reqs)
        out["engine_default"] = {"max_abs": mm["mismatch_abs_max"], "mean_abs": mm["mismatch_abs_mean"],
                                 "tokens": mm["tokens"], "bitwise_equal": mm["mismatch_abs_max"] == 0.0}
    except Exception as e:  # noqa: BLE001
        out["engine_default"] = {"status": "error", "reason": _err(e)}
    return out


# --- correctness ---------------------------------------------------------------------------


def _rel(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-6))


def _vjp_all(fn, args, diff, cts):
    """``(outputs, grads w.r.t. args[i] for i in diff)`` with cotangents ``cts``."""
    import jax

    def f(*d):
        full = list(args)
        for i, x in zip(diff, d):
            full[i] = x
        return fn(*full)

    outs, vjp = jax.vjp(f, *[args[i] for i in diff])
    return outs, vjp(cts)


def _check(name, ours, ref32, ref16, names):
    """Row comparing ``ours`` and the bf16 reference ``ref16`` with the fp32 reference."""
    import jax
    checks = []
    ok = True
    for nm, a, r, r16 in zip(names, jax.tree.leaves(ours), jax.tree.leaves(ref32), jax.tree.leaves(ref16)):
        e, e16 = _rel(a, r), _rel(r16, r)
        passed = e <= TOL or e <= TOL_FACTOR * e16
        ok &= passed
        checks.append({"what": nm, "err": e, "xla_bf16_err": e16, "pass": passed})
    return {"case": name, "status": "ok", "pass": ok, "checks": checks}


def _upcast(xs):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, xs)


def _mosaic_interpreted(lhs, rhs, gs, ct, epilogue):
    """The Mosaic GPU grouped matmul's forward and backward on CPU: its kernels in JAX's GPU
    interpreter, composed as its custom VJP does (weight gradient on the Triton layout, interpreted)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret import params as interp
    from jax.sharding import AbstractDevice, AbstractMesh

    import jax
    from kernels import pallas_gmm, pallas_gmm_mgpu as mg
    from kernels._common import epilogue_grad

    dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=8)
    cfg = mg.tuned_blocks(*lhs.shape, rhs.shape[2])
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=dev)), \
                interp.force_gpu_interpret_mode(interp.InterpretGPUParams()):
            outs = mg._call(lhs, rhs, gs, cfg, epilogue=epilogue)
            dh = epilogue_grad(ct, outs[0] if epilogue else None, epilogue, lhs.dtype)
            dlhs = mg._call(dh, rhs, gs, cfg, transpose_rhs=True)[0]
    except Exception:
        getattr(ipc, "reset_gpu_interpret_mode_state", lambda: None)()
        raise
    drhs = pallas_gmm.tgmm(lhs, dh, gs, variant="gpu", interpret=True)
    return outs[-1], (dlhs, drhs.astype(rhs.dtype))


def sec_correctness(ctx, budget):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import kernels
    from kernels import benchmark, pallas_attention, pallas_gmm, pallas_ssd, xla_attention, xla_gmm, xla_ssd
    from kernels._common import platform

    smoke = ctx["smoke"]
    cfg = ctx["model_cfg"]
    c = ctx["cfg"]["correct"]
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    plat = platform()
    cases = []

    def run(name, fn):
        if budget.spent():
            cases.append({"case": name, "status": "skipped", "reason": "time budget spent before this case"})
            return
        t0 = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            row = {"case": name, "status": "error", "pass": False, "reason": _err(e)}
        row["seconds"] = time.perf_counter() - t0
        cases.append(row)

    # grouped matmul: both projections of one MoE layer, skewed routing with empty experts
    E, top_k, H, F = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    M = c["tokens"] * top_k
    gs = jnp.asarray(benchmark._group_sizes(M, E, True, rng), jnp.int32)
    variants = {"cpu": ("gpu", "tpu", "mosaic"), "gpu": ("gpu", "mosaic"), "tpu": ("tpu",)}.get(plat, ("gpu",))
    for (k, n, epi) in ((H, F, "relu2"), (F, H, None))[:c["gmm_cases"]]:
        lhs = jnp.asarray(rng.normal(size=(M, k)), bf)
        rhs = jnp.asarray(rng.normal(size=(E, k, n)) / np.sqrt(k), bf)
        ct = jnp.asarray(rng.normal(size=(M, n)), bf)

        def ref(a, w, epi=epi):
            y = xla_gmm.gmm(a, w, gs)
            return jnp.square(jax.nn.relu(y)) if epi else y

        ref32 = jax.jit(lambda a, w, t: _vjp_all(ref, (a, w), (0, 1), t))(*_upcast((lhs, rhs, ct)))
        ref16 = jax.jit(lambda a, w, t: _vjp_all(ref, (a, w), (0, 1), t))(lhs, rhs, ct)
        for var in variants:
            name = f"gmm {var} M={M} {k}->{n}{' relu2' if epi else ''} skewed E={E}"
            if var == "mosaic" and plat == "cpu":
                fn = lambda: _mosaic_interpreted(lhs, rhs, gs, ct, epi)
            elif var == "mosaic":
                from kernels import pallas_gmm_mgpu
                fn = lambda: jax.jit(lambda a, w, t: _vjp_all(
                    lambda a, w: pallas_gmm_mgpu.gmm(a, w, gs, epilogue=epi), (a, w), (0, 1), t))(lhs, rhs, ct)
            else:
                fn = lambda var=var: jax.jit(lambda a, w, t: _vjp_all(
                    lambda a, w: pallas_gmm.gmm(a, w, gs, epilogue=epi, variant=var), (a, w), (0, 1), t))(lhs, rhs, ct)
            run(name, lambda fn=fn, name=name: _check(name, fn(), ref32, ref16, ["out", "d_lhs", "d_rhs"]))

    # flash attention: causal GQA, then packed with segment ids
    T = c["seq"]
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = jnp.asarray(rng.normal(size=(1, T, hq, d)), bf)
    kk = jnp.asarray(rng.normal(size=(1, T, hkv, d)), bf)
    v = jnp.asarray(rng.normal(size=(1, T, hkv, d)), bf)
    ct = jnp.asarray(rng.normal(size=(1, T, hq, d)), bf)
    cuts = sorted(rng.choice(np.arange(1, T), 2, replace=False))
    seg = jnp.asarray(np.searchsorted(cuts, np.arange(T), side="right")[None] + 1, jnp.int32)
    pos = jnp.asarray((np.arange(T) - np.concatenate([[0], cuts])[np.asarray(seg[0]) - 1])[None], jnp.int32)
    for label, kw in (("causal GQA", {}), ("causal GQA segment ids", dict(q_segment_ids=seg, kv_segment_ids=seg,
                                                                          q_positions=pos, kv_positions=pos))):
        name = f"attention {label} T={T} H={hq}/{hkv} D={d}"
        att_ref = lambda q_, k_, v_, kw=kw: xla_attention.attention(q_, k_, v_, **kw)
        ref32 = jax.jit(lambda *a: _vjp_all(att_ref, a[:3], (0, 1, 2), a[3]))(*_upcast((q, kk, v, ct)))
        ref16 = jax.jit(lambda *a: _vjp_all(att_ref, a[:3], (0, 1, 2), a[3]))(q, kk, v, ct)
        fn = lambda kw=kw: jax.jit(lambda *a: _vjp_all(lambda q_, k_, v_: pallas_attention.attention(q_, k_, v_, **kw),
                                                       a[:3], (0, 1, 2), a[3]))(q, kk, v, ct)
        run(name, lambda fn=fn, name=name, r32=ref32, r16=ref16: _check(name, fn(), r32, r16,
                                                                        ["out", "dq", "dk", "dv"]))

    # Mamba2 SSD with an initial state and segment ids
    h, p, g, ns, Q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.chunk_size
    x = jnp.asarray(rng.normal(size=(1, T, h, p)), bf)
    dt = jnp.asarray(rng.uniform(0.001, 0.1, size=(1, T, h)), jnp.float32)
    A = -jnp.asarray(rng.uniform(1, 16, size=(h,)), jnp.float32)
    Bm = jnp.asarray(rng.normal(size=(1, T, g, ns)), bf)
    Cm = jnp.asarray(rng.normal(size=(1, T, g, ns)), bf)
    s0 = jnp.asarray(rng.normal(size=(1, h, p, ns)), jnp.float32)
    cts = (jnp.asarray(rng.normal(size=(1, T, h, p)), jnp.float32), jnp.asarray(rng.normal(size=(1, h, p, ns)), jnp.float32))
    name = f"ssd initial state + segment ids T={T} H={h} P={p} G={g} N={ns} Q={Q}"
    ssd_args = (x, dt, A, Bm, Cm, s0)

    def ssd_of(impl):
        return lambda x, dt, A, Bm, Cm, s0: impl.ssd(x, dt, A, Bm, Cm, chunk_size=Q, segment_ids=seg, initial_state=s0)

    ref32 = jax.jit(lambda *a: _vjp_all(ssd_of(xla_ssd), a[:6], range(6), a[6]))(*_upcast(ssd_args), cts)
    ref16 = jax.jit(lambda *a: _vjp_all(ssd_of(xla_ssd), a[:6], range(6), a[6]))(*ssd_args, cts)
    run(name, lambda: _check(name, jax.jit(lambda *a: _vjp_all(ssd_of(pallas_ssd), a[:6], range(6), a[6]))(*ssd_args, cts),
                             ref32, ref16, ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "ds0"]))
    n_pass = sum(1 for r in cases if r.get("pass"))
    return {"dtype": "bfloat16", "tolerance": f"max|x - ref_fp32| / max|ref_fp32| <= {TOL} or <= {TOL_FACTOR} x "
                                              "the XLA reference's own bf16 error",
            "auto": {k: kernels.resolve_impl(k, "auto") for k in ("gmm", "attention", "ssd")},
            "cases": cases, "passed": n_pass, "total": len(cases),
            "all_passed": n_pass == len(cases) and all(r["status"] == "ok" for r in cases)}


# --- speed ---------------------------------------------------------------------------------


def _with_ratios(rows, kernel, peak, verdict: bool = True):
    """Our rows, each with its ratio to every baseline row of the same case and pass (and its
    goal; ``verdict=False``: no ``met`` verdict, e.g. interpreted kernels on CPU)."""
    index = {(r["case"], r["pass"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        if r["impl"] not in OURS[kernel]:
            continue
        entry = {k: r.get(k) for k in ("case", "pass", "impl", "status", "time_ms", "tflops", "reason", "interpret")
                 if r.get(k) is not None}
        if peak and r.get("tflops"):
            entry["mfu"] = r["tflops"] * 1e12 / peak
        base = {}
        for b in BASELINES[kernel]:
            br = index.get((r["case"], r["pass"], b))
            if br is None:
                continue
            if br["status"] == "ok" and r["status"] == "ok":
                base[b] = {"tflops": br["tflops"], "time_ms": br["time_ms"], "ratio": r["tflops"] / br["tflops"]}
            else:
                base[b] = {"status": br["status"], "reason": br.get("reason") or f"ours: {r.get('reason')}",
                           "tflops": br.get("tflops"), "ratio": None}
        entry["baselines"] = base
        goal = GOALS.get((kernel, r["pass"]))
        if goal and r["status"] == "ok":
            what, value = goal
            if what == "tflops":
                entry["goal"] = {"tflops_at_least": value, "met": (r["tflops"] >= value) if verdict else None}
            else:
                b = what.split(":")[1]
                ratio = base.get(b, {}).get("ratio")
                entry["goal"] = {f"ratio_to_{b}_at_least": value,
                                 "met": None if ratio is None or not verdict else ratio >= value}
        out.append(entry)
    return out


def _speed(kernel, ctx, budget):
    import numpy as np
    from kernels import benchmark
    from kernels._common import on_cpu

    cfg = ctx["cfg"][kernel]
    b = benchmark.Bench(ctx["cfg"]["iters"], impls=set(OURS[kernel]) | set(BASELINES[kernel]),
                        deadline=budget.deadline)
    fn = {"gmm": benchmark.bench_gmm, "attention": benchmark.bench_attention, "ssd": benchmark.bench_ssd}[kernel]
    fn(b, cfg, np.random.default_rng(0), on_cpu())
    flops = {"gmm": "2·M·K·N, M = top_k · tokens (fwd); ×3 fwd+bwd",
             "attention": "2·S²·H·D causal, B = 1 (fwd); ×3.5 fwd+bwd",
             "ssd": "S·H·(2QN + 2QP + 4PN) (fwd); ×3 fwd+bwd"}[kernel]
    return {"flop_formula": flops, "shapes": cfg,
            "rows": _with_ratios(b.rows, kernel, ctx.get("peak"), verdict=not ctx["smoke"]),
            "all_rows": b.rows}


def sec_speed_gmm(ctx, budget):
    return _speed("gmm", ctx, budget)


def sec_speed_attention(ctx, budget):
    return _speed("attention", ctx, budget)


def sec_speed_ssd(ctx, budget):
    return _speed("ssd", ctx, budget)


RUNNERS = {"platform": sec_platform, "train": sec_train, "engine": sec_engine, "mismatch": sec_mismatch,
           "correctness": sec_correctness, "speed_gmm": sec_speed_gmm, "speed_attention": sec_speed_attention,
           "speed_ssd": sec_speed_ssd}


# ------------------------------------------------------------------------------------------
# report


def _fmt(x, nd=3):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.{nd}g}" if abs(x) < 10 else f"{x:,.1f}"
    return str(x)


def goals(doc: dict) -> list:
    """The compass goals, each with the best measured figure of this run (over cases) and ``met``
    (None where the figure or its baseline was not measured)."""
    s = doc["sections"]
    out = []
    for (kernel, pas), (what, value) in GOALS.items():
        rows = [r for r in s.get(f"speed_{kernel}", {}).get("rows", []) if r["pass"] == pas and r["status"] == "ok"]
        if what == "tflops":
            best = max((r["tflops"] for r in rows), default=None)
            label = f"{kernel} {pas} TFLOP/s >= {value:g} (H100)"
        else:
            b = what.split(":")[1]
            best = max((r["baselines"].get(b, {}).get("ratio") or float("-inf") for r in rows), default=None)
            best = None if best in (None, float("-inf")) else best
            label = f"{kernel} {pas} / {b} >= {value:g}"
        out.append({"goal": label, "best": best, "met": None if best is None else best >= value})
    mfu = s.get("train", {}).get("mfu")
    out.append({"goal": "slice GRPO step MFU >= 0.40", "best": mfu, "met": None if mfu is None else mfu >= 0.40})
    if doc.get("smoke"):  # interpreted kernels on CPU: no verdict
        out = [{**g, "met": None, "note": "smoke run on CPU: not a measurement"} for g in out]
    return out


def markdown(doc: dict) -> str:
    """The acceptance table: one line per figure, beside its same-run baseline."""
    s = doc["sections"]
    L = [f"# Acceptance run{' (smoke, CPU)' if doc['smoke'] else ''}", "",
         f"device: {doc.get('device', '?')}; jax {doc.get('jax', '?')}; budget {doc['budget_s']:.0f} s; "
         f"wall {doc.get('wall_s', 0):.0f} s", "",
         "| section | status | seconds |", "|---|---|---|"]
    for name in SECTIONS:
        sec = s.get(name, {})
        L.append(f"| {name} | {sec.get('status', 'not run')}{': ' + sec['error'] if sec.get('error') else ''} | "
                 f"{_fmt(sec.get('seconds'))} |")
    L += ["", "| goal | best this run | met |", "|---|---|---|"]
    for g in goals(doc):
        L.append(f"| {g['goal']} | {_fmt(g['best'])} | {_fmt(g['met'])} |")
    L += ["", "| figure | value | baseline | baseline value | ratio | goal |", "|---|---|---|---|---|---|"]
    p = s.get("platform", {})
    if p.get("status") == "ok":
        dm, cp = p["dense_matmul"], p["copy"]
        L.append(f"| dense bf16 matmul {dm['shape']} TFLOP/s | {_fmt(dm['tflops'])} | documented peak "
                 f"({p['peak_table_key']}) | {_fmt((p['peak_bf16_flops'] or 0) / 1e12 or None)} | {_fmt(dm['ratio_to_peak'])} | |")
        L.append(f"| device copy GB/s | {_fmt(cp['bytes_per_s'] / 1e9)} | documented HBM | "
                 f"{_fmt((p['peak_hbm_bytes_per_s'] or 0) / 1e9 or None)} | {_fmt(cp['ratio_to_peak'])} | |")
    t = s.get("train", {})
    if t.get("status") == "ok":
        L.append(f"| slice {t['slice']} GRPO step tokens/s ({t['batch']}×{t['seq_len']}) | {_fmt(t['tokens_per_s'])} | "
                 f"6·N·tokens at peak | | MFU {_fmt(t['mfu'])} (traced {_fmt(t['mfu_traced'])}) | MFU ≥ 0.40 |")
        L.append(f"| slice peak device memory GiB | {_fmt((t['peak_memory_bytes'] or 0) / 2**30 or None)} | planner CPU "
                 f"estimate | {_fmt((t.get('planner_total_bytes') or 0) / 2**30 or None)} | "
                 f"{_fmt(t.get('ratio_peak_to_planner'))} | |")
    e = s.get("engine", {})
    for r in e.get("rows", []) if e.get("status") == "ok" else []:
        if r["status"] != "ok":
            L.append(f"| engine {r['slots']} slots | {r['status']}: {r.get('reason', '')} | | | | |")
            continue
        L.append(f"| engine prefill tok/s, {r['slots']} slots × {r['prompt_len']} | {_fmt(r['prefill_tokens_per_s'])} | "
                 f"bare prefill | {_fmt(r['bare_prefill_tokens_per_s'])} | {_fmt(r['prefill_ratio'])} | |")
        L.append(f"| engine decode tok/s, {r['slots']} slots | {_fmt(r['decode_tokens_per_s'])} | bare decode loop | "
                 f"{_fmt(r['bare_decode_tokens_per_s'])} | {_fmt(r['decode_ratio'])} | |")
    m = s.get("mismatch", {})
    if m.get("status") == "ok":
        ed = m.get("engine_default", {})
        L.append(f"| bf16 sampling vs train log-probs, max abs (zero-mismatch mode, {m['tokens']} tokens) | "
                 f"{_fmt(m['exact']['max_abs'])} | default engine | {_fmt(ed.get('max_abs'))} | | bitwise: "
                 f"{_fmt(m['exact']['bitwise_equal'])} |")
    c = s.get("correctness", {})
    if c.get("status") == "ok":
        for r in c["cases"]:
            if r["status"] != "ok":
                L.append(f"| {r['case']} | {r['status']}: {r.get('reason', '')} | | | | |")
                continue
            worst = max(r["checks"], key=lambda x: x["err"])
            L.append(f"| {r['case']} worst err ({worst['what']}) | {_fmt(worst['err'])} | XLA bf16 | "
                     f"{_fmt(worst['xla_bf16_err'])} | | pass: {_fmt(r['pass'])} |")
    for kern in ("gmm", "attention", "ssd"):
        sp = s.get(f"speed_{kern}", {})
        for r in sp.get("rows", []) if sp.get("status") == "ok" else []:
            label = f"{kern} {r['impl']} {r['case']} {r['pass']} TFLOP/s"
            if r["status"] != "ok":
                L.append(f"| {label} | {r['status']}: {r.get('reason', '')} | | | | |")
                continue
            goal = r.get("goal")
            gtxt = "" if not goal else " ".join(f"{k} {v}" for k, v in goal.items())
            for i, (bname, bv) in enumerate(r["baselines"].items() or [("–", {})]):
                L.append(f"| {label if i == 0 else ''} | {_fmt(r['tflops']) if i == 0 else ''} | {bname} | "
                         f"{_fmt(bv.get('tflops')) if bv.get('tflops') is not None else bv.get('status', '') + ': ' + str(bv.get('reason', ''))[:60]} | "
                         f"{_fmt(bv.get('ratio'))} | {gtxt if i == 0 else ''} |")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------
# driver: the child runs sections; the parent restarts a child that dies


def _write(out_dir: pathlib.Path, doc: dict):
    doc["goals"] = goals(doc)
    tmp = out_dir / "accept.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(out_dir / "accept.json")
    (out_dir / "accept.md").write_text(markdown(doc))


def _fault_point(section: str) -> None:
    """Test hook: ``CASCADE_ACCEPT_FAULT=crash:<section>`` kills the process at the start of that
    section (as a hard crash would), ``raise:<section>`` raises there."""
    kind, _, where = os.environ.get("CASCADE_ACCEPT_FAULT", "").partition(":")
    if where == section and kind == "crash":
        os._exit(3)
    if where == section and kind == "raise":
        raise RuntimeError(f"injected fault in {section}")


def child(args, doc_path: pathlib.Path, sections):
    import jax
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    from models import nemotron_h as nh

    doc = json.loads(doc_path.read_text())
    out_dir = doc_path.parent
    cfg = SMOKE if args.smoke else FULL
    dev = jax.devices()[0]
    doc["device"] = f"{jax.default_backend()}: {getattr(dev, 'device_kind', dev)}"
    doc["jax"] = jax.__version__
    preset = "tiny" if args.smoke else "nano-30b-a3b"
    ctx = {"smoke": args.smoke, "cfg": cfg, "preset": preset}
    ctx["slice"] = args.slice or pick_slice(preset, _memory_limit(), args.smoke)
    ctx["model_cfg"] = nh.preset(preset, pattern=ctx["slice"], scan_layers=True)
    ctx["peak"] = device_peak(str(getattr(dev, "device_kind", "")))[0]
    doc["slice"] = ctx["slice"]
    if "train" in sections:
        ctx["planner"] = _start_planner(ctx)
    t_end = doc["t0"] + args.budget
    for name in sections:
        now = time.time()
        sec = {"status": "running", "started": now}
        doc["sections"][name] = sec
        if now > t_end:
            doc["sections"][name] = {"status": "skipped", "error": "global time budget spent", "seconds": 0.0}
            _write(out_dir, doc)
            continue
        _write(out_dir, doc)
        share = min(SHARES[name] * args.budget, t_end - now)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            _fault_point(name)
            res = RUNNERS[name](ctx, Budget(share))
            sec = {"status": "ok", **res}
        except Exception as e:  # noqa: BLE001 - a failed section is recorded, the run goes on
            traceback.print_exc(file=sys.stderr)
            sec = {"status": "error", "error": _err(e)}
        sec["seconds"] = time.perf_counter() - t0
        sec["cpu_s"] = time.process_time() - c0
        sec["budget_s"] = share
        doc["sections"][name] = sec
        doc["wall_s"] = time.time() - doc["t0"]
        _write(out_dir, doc)
        print(f"[accept] {name}: {sec['status']} in {sec['seconds']:.1f} s ({sec['cpu_s']:.1f} s CPU)", file=sys.stderr, flush=True)
    if "planner" in ctx:  # it ran alongside the sections; wait for it within the budget (+ 60 s)
        res = _collect_planner(ctx["planner"], t_end - time.time() + 60)
        if doc["sections"].get("train", {}).get("status") == "ok":
            doc["sections"]["train"] = attach_planner(doc["sections"]["train"], res)
            _write(out_dir, doc)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Pallas interpreted)")
    ap.add_argument("--out-dir", default="accept")
    ap.add_argument("--budget", type=float, default=None, help="global seconds (default 450; smoke 120)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--slice", default=None, help=f"layer pattern of the train slice (default: longest of {SLICES} that fits)")
    ap.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache (speeds up a rerun)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 120.0 if args.smoke else 450.0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: --only: unknown section(s) {bad}; valid: {', '.join(SECTIONS)}")
    if args.slice is not None:
        kinds = set(args.slice)
        if not kinds <= set("ME*-") or not {"M", "E", "*"} <= kinds:
            raise SystemExit(f"error: --slice: {args.slice!r} must use M, E, * (and -) and hold each of M, E, *")
    out_dir = pathlib.Path(args.out_dir)
    if args.child:
        child(args, pathlib.Path(args.child), sections)
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"smoke": args.smoke, "budget_s": args.budget, "t0": time.time(), "sections": {}, "restarts": [],
           "command": " ".join([pathlib.Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    doc_path = out_dir / "accept.json"
    _write(out_dir, doc)
    remaining = list(sections)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # room for the slice's train state
    if args.smoke:  # CPU; nothing is timed for real, so XLA skips optimising machine code
        env.setdefault("JAX_PLATFORMS", "cpu")
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                     "--xla_llvm_disable_expensive_passes=true"]).strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    while remaining:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", str(doc_path), "--only", ",".join(remaining),
               "--budget", str(args.budget), "--out-dir", str(out_dir)] + (["--smoke"] if args.smoke else []) + \
              (["--slice", args.slice] if args.slice else []) + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        last = collections.deque(maxlen=40)
        for line in proc.stderr:  # streamed through; the tail names a crash
            sys.stderr.write(line)
            last.append(line)
        proc.wait()
        doc = json.loads(doc_path.read_text())
        done = [s for s in remaining if doc["sections"].get(s, {}).get("status") not in (None, "running")]
        running = [s for s in remaining if doc["sections"].get(s, {}).get("status") == "running"]
        if proc.returncode == 0 and not running:
            break
        tail = " | ".join(x.strip() for x in list(last)[-3:])[-600:]
        if running:
            dead = running[0]
            doc["sections"][dead] = {"status": "crashed", "error": f"process exit {proc.returncode}: {tail}",
                                     "seconds": time.time() - doc["sections"][dead].get("started", time.time())}
            doc["restarts"].append(dead)
        elif proc.returncode != 0 and not done:
            for s in remaining:
                doc["sections"][s] = {"status": "crashed", "error": f"process exit {proc.returncode}: {tail}",
                                      "seconds": 0.0}
        _write(out_dir, doc)
        remaining = [s for s in remaining if doc["sections"].get(s, {}).get("status") in (None, "running")]
    doc = json.loads(doc_path.read_text())
    doc["wall_s"] = time.time() - doc["t0"]
    _write(out_dir, doc)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
