"""Runner benchmarks (JSON, baselines measured in the same run).

    python launch/bench_runner.py overhead [--steps 8]        # run_stage vs direct calls
    python launch/bench_runner.py checkpoint [--big-gb 2.0]   # async save blocked time, restore

``overhead``: a tiny GRPO stage through :func:`cascade_jax.runner.run_stage` (embedded engine,
tiny domain rewards, metrics, TensorBoard, checkpoint every step) against the same work called
directly — ``engine.generate`` on the same requests, the scorer, ``pack_rollouts``, the jitted
train step and ``update_weights`` — in the same process after the same warm-up. Reports the
median step time of each, the ratio (goal ≤ 1.05) and the runner's time split.

``checkpoint``: for the tiny model's train state and a model-shaped state of at least
``--big-gb`` GB (params + Adam moments, fp32): the seconds a step is blocked by an async orbax
save, the time until the save is on disk, and the restore time; with the bytes and GB/s.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cascade_jax import config as C  # noqa: E402


def tiny_grpo_config(run_dir: str, steps: int) -> C.Config:
    return C.from_dict(C.Config, {
        "model": {"preset": "tiny", "dtype": "float32"},
        "optimizer": {"lr": 1e-3},
        "rollout": {"sampling": {"n_samples": 4, "max_prompt_len": 64, "max_response_len": 24, "thinking": True},
                    "batching": {"num_slots": 32}},
        "data": {"domains": ["math"], "batch_prompts": 8, "tiny_rows_per_domain": 256},
        "stage": {"name": "bench", "objective": "grpo", "steps": steps},
        "eval": {"every": -1},
        "run": {"out_dir": run_dir, "checkpoint_every": 1, "keep_last": 2},
    })


def bench_overhead(steps: int) -> dict:
    from cascade_jax import rl
    from cascade_jax.rollout.packing import pack_rollouts
    from cascade_jax.runner import build as B
    from cascade_jax.runner import run_stage
    from cascade_jax.runner.evaluate import prompts_of
    from cascade_jax.runner.stage import Stage
    from models import nemotron_h as nh

    with tempfile.TemporaryDirectory() as tmp:
        # warm-up run (compiles every program of this shape), then the measured run
        run_stage(tiny_grpo_config(f"{tmp}/warm", 2), progress=False, log=lambda m: None)
        cfg = tiny_grpo_config(f"{tmp}/run", steps)
        run_stage(cfg, progress=False, log=lambda m: None)
        rows = [json.loads(l) for l in open(f"{tmp}/run/metrics.jsonl")]
        runner_steps = [r["time/step_s"] for r in rows[1:] if "time/step_s" in r]
        split = {k: float(np.median([r[k] for r in rows[1:] if k in r]))
                 for k in rows[-1] if k.startswith("time/")}

        # direct: the same components, no runner
        parts = B.build(cfg)
        st = Stage(cfg, pathlib.Path(tmp) / "direct", parts, log=lambda m: None)
        state = st.state
        specs = nh.param_specs(parts.model_cfg)
        key = jax.random.key(0)
        direct = []
        for i in range(steps):
            t0 = time.perf_counter()
            prompts = prompts_of(next(parts.data))[:cfg.data.batch_prompts]
            seeds = np.arange(len(prompts)) + 1000 * i
            reqs = st._requests(prompts, seeds)
            ro = parts.rl.engine.generate(reqs)
            rewards = st._score(prompts, ro).reshape(-1)
            batch = pack_rollouts(ro, rewards, layout="padded",
                                  seq_len=cfg.rollout.sampling.max_prompt_len + cfg.rollout.sampling.max_response_len)
            batch = batch.replace(policy_version=jnp.full(rewards.shape, i, jnp.int32))
            state, m = parts.train_step(state, batch)
            jax.block_until_ready(m)
            parts.rl.engine.update_weights(rl.compute_params(state.params, specs, st.dtype), str(i + 1))
            direct.append(time.perf_counter() - t0)
        del key
    r, d = float(np.median(runner_steps)), float(np.median(direct[1:]))
    return {"bench": "runner_overhead", "steps": steps, "runner_step_s": r, "direct_step_s": d,
            "ratio": r / d, "goal": "<= 1.05", "runner_time_split_median_s": split,
            "backend": jax.default_backend()}


def _state_of(model_cfg, seed=0):
    from cascade_jax import rl
    from models import nemotron_h as nh

    params = jax.jit(nh.init_params, static_argnums=(0, 2))(model_cfg, jax.random.key(seed),
                                                            jnp.float32)
    st = rl.TrainState.from_config(params, C.OptimizerConfig(), nh.param_specs(model_cfg))
    return {"params": st.params, "opt_state": st.opt_state, "step": st.step,
            "rng": jax.random.key_data(jax.random.key(seed))}


def bench_checkpoint(big_gb: float) -> dict:
    from cascade_jax.runner.checkpoint import Checkpointer
    from models import nemotron_h as nh

    out = []
    big = nh.preset("tiny", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024,
                    moe_shared_expert_intermediate_size=2048, n_routed_experts=16,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                    mamba_num_heads=32, mamba_head_dim=64, vocab_size=32768)
    total = nh.param_counts(big)[0]
    scale = max(1, int(np.ceil(big_gb * 1e9 / (total * 4 * 3))))  # params + mu + nu in fp32
    if scale > 1:
        big = nh.with_overrides(big, vocab_size=big.vocab_size * scale)
    for name, mcfg in (("tiny", nh.preset("tiny")), ("big", big)):
        state = _state_of(mcfg)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        with tempfile.TemporaryDirectory() as tmp:
            ck = Checkpointer(pathlib.Path(tmp), keep_last=2, keep_best=0)
            ck.save(0, state, {"pos": 0}, {})  # warm-up (first save creates the layout)
            ck.wait()
            t0 = time.perf_counter()
            blocked = ck.save(1, state, {"pos": 1}, {})
            ck.wait()
            written = time.perf_counter() - t0
            t0 = time.perf_counter()
            restored, _, _ = ck.restore(1, state)
            jax.block_until_ready(restored)
            restore_s = time.perf_counter() - t0
            ck.close()
            ok = all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
        out.append({"model": name, "params": nh.param_counts(mcfg)[0], "state_bytes": nbytes,
                    "save_blocked_s": blocked, "save_total_s": written,
                    "save_GBps": nbytes / written / 1e9, "restore_s": restore_s,
                    "restore_GBps": nbytes / restore_s / 1e9, "restored_equal": ok})
        del state
    return {"bench": "checkpoint", "results": out, "backend": jax.default_backend()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=("overhead", "checkpoint"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--big-gb", type=float, default=2.0)
    args = ap.parse_args(argv)
    res = bench_overhead(args.steps) if args.which == "overhead" else bench_checkpoint(args.big_gb)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
