"""A hostile newcomer: the README's promises tried as real command lines in subprocesses --
interruptions, bad input, mistyped paths -- each checked for its exit code, its single
``error:`` line and what it left on disk."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.runner_support import cache_dir, write_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: a tiny SFT stage of a few short steps (seconds on CPU once compiled)
TINY_SFT = {"data": {"batch_rows": 2, "seq_len": 128, "domains": ["math"]},
            "optimizer": {"lr": 3e-3, "warmup_steps": 1}}


def _env(tmp_path_factory, **extra) -> dict:
    env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": str(ROOT),
           "JAX_COMPILATION_CACHE_DIR": str(cache_dir(tmp_path_factory)),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.update(extra)
    return env


def _cmd(script: str, *args) -> list:
    return [sys.executable, str(ROOT / "launch" / script), *args]


def _run(tmp_path_factory, script, *args, timeout=300, **env):
    return subprocess.run(_cmd(script, *args), capture_output=True, text=True, timeout=timeout,
                          env=_env(tmp_path_factory, **env))


def _one_error(r, code: int, *needles) -> str:
    """Exit ``code``, exactly one non-empty stderr line, ``error: ...`` containing ``needles``."""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _state(run_dir: pathlib.Path, step: int) -> dict:
    """Every array of the orbax checkpoint at ``step`` plus its data-iterator state."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(run_dir.absolute() / "checkpoints",
                               item_names=("state", "data", "meta")) as m:
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      data=ocp.args.JsonRestore()))
    leaves = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}, out["data"]


# --------------------------------------------------------------------------------------------
# Preemption: SIGTERM after a checkpointed step, exit 75, rerun resumes bit for bit


STEPS = 5


def test_sigterm_checkpoints_exits_75_and_resumes_bit_identically(tmp_path, tmp_path_factory):
    def cfg(name):
        return write_config(tmp_path / f"{name}.json", "sft", tmp_path / name, steps=STEPS,
                            run={"checkpoint_every": 2}, **TINY_SFT)

    ref = _run(tmp_path_factory, "run.py", f"--config={cfg('ref')}", "--no-progress")
    assert ref.returncode == 0, ref.stderr[-3000:]

    # the run waits after step 3 (CASCADE_FAULT=hold@3) until a signal arrives from outside;
    # checkpoint 2 is on disk by then, step 3 is not a checkpoint step
    args = (f"--config={cfg('killed')}", "--no-progress")
    p = subprocess.Popen(_cmd("run.py", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env(tmp_path_factory, CASCADE_FAULT="hold@3"))
    ck = tmp_path / "killed" / "checkpoints"
    t0 = time.monotonic()
    while not (ck / "2").is_dir() and p.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, (p.returncode, err[-3000:])
    assert "SIGTERM received" in err and "stopped by SIGTERM after step 3/5" in err, err[-3000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert sorted(int(x.name) for x in ck.iterdir() if x.name.isdigit()) == [2, 3]
    assert not (tmp_path / "killed" / "hub").exists() and not (tmp_path / "killed" / "summary.json").exists()
    mid_state, _ = _state(tmp_path / "killed", 3)
    assert int(mid_state["['step']"]) == 3

    again = _run(tmp_path_factory, "run.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "at step 3" in again.stderr
    a, ad = _state(tmp_path / "ref", STEPS)
    b, bd = _state(tmp_path / "killed", STEPS)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert ad == bd
    ref_rows = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]
    # training moved the weights after the resume: the equality above is not vacuous
    assert any(not np.array_equal(mid_state[k], a[k]) for k in a if k.startswith("['params']"))
