"""Helpers for the runner tests: tiny stage configs, ``launch/run.py`` in a subprocess (sharing
one persistent compilation cache per test session, so repeated runs skip XLA compiles), and a
session-wide SFT'd tiny checkpoint that the GRPO / resume / MOPD tests start from."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CACHE: dict = {}

#: shapes shared by the runner tests (one compile per program across the session)
ROLLOUT = {"n_samples": 4, "max_prompt_len": 64, "max_response_len": 24, "thinking": True}


def tiny_stage_model() -> dict:
    """The tiny stages' ``model`` section (one home: ``configs/tiny/base.json``)."""
    return json.loads((ROOT / "configs" / "tiny" / "base.json").read_text())["model"]


def write_config(path: pathlib.Path, objective: str, run_dir: pathlib.Path, *, steps: int,
                 domains=("structured_output",), **sections) -> pathlib.Path:
    """A tiny-preset stage config at ``path``; ``sections`` update the defaults per section."""
    cfg = {
        "model": {"preset": "tiny", "dtype": "float32"},
        "optimizer": {"lr": 2e-3, "grad_clip": 1.0},
        "rollout": dict(ROLLOUT),
        "data": {"domains": list(domains), "batch_prompts": 4, "batch_rows": 8, "seq_len": 256,
                 "tiny_rows_per_domain": 256},
        "stage": {"name": f"test_{objective}", "objective": objective, "steps": steps},
        "eval": {"every": -1, "prompts": 8, "k": 2},
        "run": {"out_dir": str(run_dir)},
    }
    for sec, vals in sections.items():
        cfg.setdefault(sec, {}).update(vals)
    path.write_text(json.dumps(cfg, indent=1))
    return path


#: environment variable naming the session's compilation cache (set by ``tests/conftest.py``)
CACHE_ENV = "CASCADE_TEST_JIT_CACHE"


def cache_dir(tmp_path_factory) -> pathlib.Path:
    """The session's persistent compilation cache (``tests/conftest.py``'s, else a new one)."""
    if "jax_cache" not in _CACHE:
        shared = os.environ.get(CACHE_ENV)
        _CACHE["jax_cache"] = pathlib.Path(shared) if shared else tmp_path_factory.mktemp("jax_cache")
    return _CACHE["jax_cache"]


def run_cli(tmp_path_factory, *args, fault=None, timeout=600) -> subprocess.CompletedProcess:
    """``python launch/run.py *args`` on CPU with the session's compilation cache;
    ``fault="<point>@<step>"`` makes the run kill itself there (SIGKILL)."""
    env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "JAX_COMPILATION_CACHE_DIR": str(cache_dir(tmp_path_factory)),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if fault:
        env["CASCADE_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def sft_run(tmp_path_factory) -> pathlib.Path:
    """A tiny model SFT'd for 60 steps on structured_output + math (run once per session)."""
    reuse = os.environ.get("CASCADE_TEST_SFT_RUN")  # a finished run of this fixture (dev speed-up)
    if reuse and "sft" not in _CACHE:
        _CACHE["sft"] = pathlib.Path(reuse)
    if "sft" not in _CACHE:
        d = tmp_path_factory.mktemp("sft")
        cfg = write_config(d / "sft.json", "sft", d / "run", steps=60,
                           domains=("structured_output", "math"),
                           optimizer={"lr": 3e-3, "warmup_steps": 5, "b2": 0.98},
                           run={"export_every": 20})  # exports/step_20, step_40; hub = 60
        r = run_cli(tmp_path_factory, f"--config={cfg}")
        assert r.returncode == 0, r.stderr[-3000:]
        _CACHE["sft"] = d / "run"
    return _CACHE["sft"]


def metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(run_dir: pathlib.Path, step: int) -> tuple:
    """``({path: array}, data state)`` of the orbax checkpoint at ``step`` of ``run_dir`` (params,
    optimizer state, step, rng; and the data iterators' state)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(pathlib.Path(run_dir).absolute() / "checkpoints",
                               item_names=("state", "data", "meta")) as m:
        out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      data=ocp.args.JsonRestore()))
    leaves = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}, out["data"]
