"""(slow) One step off-policy (``rollout.max_policy_lag: 1``, cascade_jax/runner/lag.py) against a
served engine (one ``launch/serve.py`` per run, weights synced by disk), MOPD from a random
init towards another random init (a gradient at every step), 3 steps:

* every step after the first trains on rollouts of the weights one step older (``policy_lag``
  1, weight versions logged: the trainer's ``t-1``, the rollouts' ``t-2``), the IS statistics
  are logged, the server ends on the last version;
* SIGTERM while the run holds after step 2 (exit 75; checkpoint 2 holds the batch of step 3, drawn while step 2
  trained), then a rerun, ends with parameters, optimiser state and data state equal bit for bit
  to an uninterrupted lag-1 run's, and every step's loss equal.
"""

import signal

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # 3 runs of launch/run.py beside 2 servers: ~10 min on 2 busy cores

from cascade_jax.rollout.launcher import Launcher, serve_command
from tests.runner_support import (Child, assert_same_state, checkpoint_state, cli_env, launch_cmd,
                                  metrics, run_cli, write_config)

STEPS = 3
ENGINE = {"num_slots": 8, "steps_per_call": 8, "prefill_sizes": [1]}
SAMPLING = {"n_samples": 2, "max_prompt_len": 64, "max_response_len": 12, "thinking": True}
ROLL = {"sampling": SAMPLING, "batching": ENGINE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from cascade_jax.data import save_tokenizer, tiny_tokenizer
    from models import nemotron_h as nh

    d = tmp_path_factory.mktemp("lag")
    hub = d / "init"
    cfg = nh.preset("tiny")
    teacher = d / "teacher"  # another random init: the distillation gradient is never zero
    for path, seed in ((hub, 0), (teacher, 1)):
        nh.save_checkpoint(nh.init_params(cfg, jax.random.key(seed), np.float32), cfg, str(path))
        save_tokenizer(tiny_tokenizer(), path)
    extra = ["--num-slots", str(ENGINE["num_slots"]), "--steps-per-call", str(ENGINE["steps_per_call"]),
             "--prefill-sizes", "1", "--max-len", str(SAMPLING["max_prompt_len"] + SAMPLING["max_response_len"]),
             "--no-warmup"]
    launcher = Launcher(serve_command(extra=extra), n=2, checkpoint=str(hub), weight_version="0",
                        env=cli_env(tmp_path_factory), log_dir=str(d), health_timeout_s=600)
    launcher.start()
    try:
        def config(name, url):
            return write_config(d / f"{name}.json", "mopd", d / name, steps=STEPS,
                                domains=("structured_output", "math"),
                                rollout={**ROLL, "engine": "jax_server", "servers": {"url": url},
                                         "sync": {"method": "disk"}, "max_policy_lag": 1},
                                model={"checkpoint": str(hub)},
                                stage={"teachers": {"structured_output": str(teacher), "math": str(teacher)},
                                       "is_correction": "icepop"},
                                data={"batch_prompts": 4},
                                run={"checkpoint_every": 1, "keep_last": 2})

        ref = run_cli(tmp_path_factory, f"--config={config('ref', launcher.urls[0])}")
        assert ref.returncode == 0, ref.stderr[-3000:]
        ck = d / "killed" / "checkpoints"
        with Child(launch_cmd("run.py", "--no-progress", f"--config={config('killed', launcher.urls[1])}"),
                   cli_env(tmp_path_factory, CASCADE_FAULT="hold@2")) as p:
            p.wait_for(lambda: (ck / "1").is_dir(), timeout=300)
            code = p.signal_and_wait(signal.SIGTERM, timeout=180)
        err = "\n".join(p.lines)
        assert code == 75, (code, err[-3000:])
        pending = sorted(x.name for x in (d / "killed" / "pending").iterdir())
        again = run_cli(tmp_path_factory, f"--config={d / 'killed.json'}")
        assert again.returncode == 0, again.stderr[-3000:]
        return d, err, again.stderr, pending
    finally:
        launcher.stop()


def test_lag1_trains_one_step_behind_and_logs_it(runs):
    d = runs[0]
    rows = [m for m in metrics(d / "ref") if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    # step 1 draws its own batch from w_0; step t >= 2 trains w_{t-1} on rollouts of w_{t-2}
    assert [m["policy_lag_max"] for m in rows] == [0.0] + [1.0] * (STEPS - 1)
    assert [m["weight_version/trainer"] for m in rows] == [float(t - 1) for t in range(1, STEPS + 1)]
    assert [m["weight_version/rollout_max"] for m in rows] == [0.0] + [float(t - 2) for t in range(2, STEPS + 1)]
    for m in rows:
        assert {"is_abs_delta_mean", "is_frac_corrected", "is_weight_mean"} <= m.keys()
    assert all("time/ahead_rollout_s" in m for m in rows[:-1]) and "time/ahead_rollout_s" not in rows[-1]
    # the lag shows in the IS statistics: off-policy tokens move away from ratio 1
    assert max(m["is_abs_delta_mean"] for m in rows[1:]) > rows[0]["is_abs_delta_mean"]


def test_lag1_sigterm_resume_is_bit_exact(runs):
    d, err, again, pending = runs
    assert "stopped by SIGTERM after step 2/3" in err, err[-3000:]
    assert pending == ["1.pkl", "2.pkl"]  # checkpoint s holds the batch of step s + 1
    assert "resumed" in again and "at step 2" in again, again[-3000:]
    a = assert_same_state(d / "ref", d / "killed", STEPS)
    ref = [m for m in metrics(d / "ref") if "loss" in m]
    got = [m for m in metrics(d / "killed") if "loss" in m]
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in got] == [m["loss"] for m in ref]
    assert [m["weight_version/rollout_max"] for m in got] == [m["weight_version/rollout_max"] for m in ref]
    mid, _ = checkpoint_state(d / "killed", 2)
    assert any(not np.array_equal(mid[k], a[k]) for k in a if k.startswith("['params']"))
