"""One step off-policy vs strictly on-policy: step time of a tiny GRPO stage with its rollouts
served by ``launch/serve.py`` (weights synced by disk), ``rollout.max_policy_lag`` 0 (baseline)
and 1, measured in the same invocation (JSON on stdout)::

    python launch/bench_lag.py [--steps 8] [--batch-prompts 16] [--n-samples 4]
                               [--response-len 32] [--hidden 256] [--layers 8]

Each run gets a fresh server started from the same random tiny checkpoint (so both start from
the same weights); ``launch/run.py`` runs the stage in its own process. Reported per lag: the
median ``time/step_s`` over steps 2.. (step 1 compiles; with lag 1 it also draws its own
batch), the median rollout (+ reward) and train times of the lag-0 run (the overlap can at best
hide the smaller of the two), and ``ratio`` = lag-1 median step / lag-0 median step (goal
<= 0.65 when rollout and training take similar time; the ideal is
``(max(r, t) + sync) / (r + t + sync)``, reported as ``ideal_ratio``). ``--hidden`` /
``--layers`` size the model so that training and rollouts take comparable time.

Measured (``--steps 6``, defaults otherwise; 2 shared, busy CPU cores, server and trainer on
them; 7 min 49 s wall): lag 0 median step 6.33 s (rollout + reward 3.32 s, train 2.35 s, sync
0.49 s), lag 1 3.79 s (the rollouts ahead 3.30 s, waited for 0.18 s); ratio 0.60 (ideal 0.62).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _config(path: pathlib.Path, run_dir: pathlib.Path, hub: pathlib.Path, url: str, lag: int, a) -> None:
    cfg = {
        "model": {"preset": "tiny", "dtype": "float32", "checkpoint": str(hub)},
        "optimizer": {"lr": 1e-3, "grad_clip": 1.0},
        "rollout": {"engine": "jax_server", "servers": {"url": url}, "sync": {"method": "disk"},
                    "sampling": {"n_samples": a.n_samples, "max_prompt_len": 64,
                                 "max_response_len": a.response_len, "thinking": True},
                    "batching": {"num_slots": a.slots, "steps_per_call": 8}, "max_policy_lag": lag},
        "data": {"domains": ["structured_output", "math"], "batch_prompts": a.batch_prompts,
                 "tiny_rows_per_domain": 256},
        "stage": {"name": f"bench_lag{lag}", "objective": "grpo", "steps": a.steps},
        "eval": {"every": -1},
        "run": {"out_dir": str(run_dir), "checkpoint_every": 0, "checkpoint_every_s": 0},
    }
    path.write_text(json.dumps(cfg, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--hidden", type=int, default=0, help="model hidden size (0 = the tiny preset's)")
    p.add_argument("--layers", type=int, default=0, help="pattern repeats (0 = the tiny preset's)")
    a = p.parse_args(argv)

    import jax
    import numpy as np

    from cascade_jax.data import save_tokenizer, tiny_tokenizer
    from cascade_jax.rollout.launcher import Launcher, serve_command
    from models import nemotron_h as nh

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        hub = tmp / "init"
        over = {}
        if a.hidden:
            over.update(hidden_size=a.hidden, intermediate_size=2 * a.hidden)
        if a.layers:
            over.update(pattern=nh.preset("tiny").pattern * a.layers)
        mcfg = nh.preset("tiny", **over)
        nh.save_checkpoint(nh.init_params(mcfg, jax.random.key(0), np.float32), mcfg, str(hub))
        save_tokenizer(tiny_tokenizer(), hub)
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")  # server and trainer on one GPU
        extra = ["--num-slots", str(a.slots), "--steps-per-call", "8",
                 "--max-len", str(64 + a.response_len)]
        out = {"steps": a.steps, "batch_prompts": a.batch_prompts, "n_samples": a.n_samples,
               "response_len": a.response_len, "model": {"hidden_size": mcfg.hidden_size,
                                                         "pattern": mcfg.pattern},
               "device": jax.devices()[0].device_kind}
        for lag in (0, 1):
            launcher = Launcher(serve_command(extra=extra), n=1, checkpoint=str(hub), weight_version="0",
                                env=env, log_dir=str(tmp), health_timeout_s=900)
            launcher.start()
            try:
                cfg = tmp / f"lag{lag}.json"
                _config(cfg, tmp / f"run{lag}", hub, launcher.urls[0], lag, a)
                r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--no-progress",
                                    f"--config={cfg}"], capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    print(r.stderr[-4000:], file=sys.stderr)
                    return 1
            finally:
                launcher.stop()
            rows = [json.loads(x) for x in (tmp / f"run{lag}" / "metrics.jsonl").read_text().splitlines()]
            rows = [m for m in rows if "loss" in m][1:]  # step 1 compiles
            med = lambda k: statistics.median(m[k] for m in rows if k in m)  # noqa: E731
            res = {"step_s_median": med("time/step_s"), "step_s_all": [m["time/step_s"] for m in rows],
                   "train_s_median": med("time/train_s"), "sync_s_median": med("time/sync_s"),
                   "policy_lag_max": max(m["policy_lag_max"] for m in rows)}
            if lag == 0:
                res["rollout_reward_s_median"] = med("time/rollout_reward_s")
            else:
                res["ahead_rollout_s_median"] = med("time/ahead_rollout_s")
                res["rollout_wait_s_median"] = med("time/rollout_wait_s")
            out[f"lag{lag}"] = res
        l0, l1 = out["lag0"], out["lag1"]
        r_, t_, s_ = l0["rollout_reward_s_median"], l0["train_s_median"], l0["sync_s_median"]
        out["ratio"] = l1["step_s_median"] / l0["step_s_median"]
        out["ideal_ratio"] = (max(r_, t_) + s_) / (r_ + t_ + s_)
        out["rollout_over_train"] = r_ / t_
        out["goal"] = "ratio <= 0.65 when rollout and training take similar time"
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
