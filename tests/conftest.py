"""Shared fixtures: the tiny model, tiny run configs and ``launch/run.py`` in a subprocess.

===================  ==========================================================================
fixture              gives
===================  ==========================================================================
tiny_cfg             ``make(**overrides)``: ``nh.preset("tiny", **overrides)`` (``ModelConfig``)
tiny_params          ``make(cfg, seed=0, dtype=float32)``: ``nh.init_params(cfg, key(seed))``,
                     fresh arrays every call (a train step may donate them)
tiny_stage_model     the tiny stages' ``model`` section (``configs/tiny/base.json``)
run_config           ``write(objective, *, steps, domains=..., **sections)``: a tiny stage config
                     file in the test's ``tmp_path`` (``runner_support.write_config``), its run dir
                     ``tmp_path / "run"``; returns the config path
launch_run           ``run(*args, timeout=600, fault=None)``: ``python launch/run.py --no-progress
                     *args`` on CPU with the session's persistent compilation cache
                     (``runner_support.run_cli``)
===================  ==========================================================================

The longest files start first (:data:`LONGEST_FIRST`).

One session directory (:data:`SESSION_DIR`) per test run, shared by the ``pytest -n N``
(xdist) workers: it holds one persistent XLA compilation cache (:data:`JIT_CACHE`), used in every
worker and in every child that inherits the environment, and the session's SFT'd tiny checkpoint
(``runner_support.sft_run``, built once under a file lock). With the cache, tests that build
their own ``jax.jit`` of a program another test already compiled (the tiny model's forward and
gradient at the same shapes, engines of the same sizes) load it instead of compiling it again
(measured: the tiny model's gradient re-jitted 12.3 CPU s -> 1.8 CPU s). A loaded executable is
the compiled one (same results, same ``memory_analysis`` / ``cost_analysis``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import pytest

from models import nemotron_h as nh
from tests import runner_support

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: an xdist worker's name ("gw0", ...); None in a plain pytest or in xdist's controller
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER and os.environ.get(runner_support.SESSION_ENV):
    SESSION_DIR = os.environ[runner_support.SESSION_ENV]  # the controller's, shared by every worker
else:
    SESSION_DIR = tempfile.mkdtemp(prefix="cascade-jax-test-")
    os.environ[runner_support.SESSION_ENV] = SESSION_DIR  # inherited by xdist workers
#: the session's persistent compilation cache (removed when the session ends)
JIT_CACHE = os.path.join(SESSION_DIR, "jit")
os.makedirs(JIT_CACHE, exist_ok=True)
_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": JIT_CACHE,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
os.environ.update(_CACHE_ENV)  # children (servers, launchers, multi-device scripts)
os.environ[runner_support.CACHE_ENV] = JIT_CACHE
jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


#: the longest test files first, per tier (wall seconds of their tests, 2 xdist workers on a
#: loaded 2-core machine, 2026-12-07). ``--dist loadfile --no-loadscope-reorder``
#: (``launch/test.sh``) hands files to the workers in collection order, so these start first and
#: the many short files fill the gaps at the end instead of one worker finishing a long file
#: alone; a tier collects only its own files. ``test_runner_resume`` builds the session's SFT
#: run, which ``test_runner_served`` waits for: they stay far apart.
LONGEST_FIRST = (
    # the fast tier (launch/test.sh)
    "test_newcomer.py", "test_rl_steps.py", "test_model.py", "test_rollout_engine.py",
    "test_sglang_clients.py", "test_dryrun.py", "test_serve_rollout.py", "test_kernels_xla_flash.py",
    "test_runner_cli.py", "test_eval_progress.py", "test_kernels_tuning.py", "test_parity.py",
    # the integration tier (launch/test.sh --integration)
    "test_preempt_multihost.py", "test_runner_resume.py", "test_cascade_e2e.py",
    "test_sharding_steps.py", "test_fidelity_train_step.py", "test_sharding_plan.py",
    "test_rollout_chunked.py", "test_fidelity_engine.py", "test_sharding_scan.py",
    "test_zero_mismatch.py", "test_runner_fidelity.py", "test_runner_sharded.py",
    "test_accept.py", "test_expert_load.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


def pytest_unconfigure(config):
    if not WORKER:  # the controller ends after its workers
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cfg():
    def make(**overrides):
        return nh.preset("tiny", **overrides)
    return make


@pytest.fixture(scope="session")
def tiny_params():
    def make(cfg, seed: int = 0, dtype=jnp.float32):
        return nh.init_params(cfg, jax.random.key(seed), dtype=dtype)
    return make


@pytest.fixture(scope="session")
def tiny_stage_model() -> dict:
    return runner_support.tiny_stage_model()


@pytest.fixture
def run_config(tmp_path):
    def write(objective: str, *, steps: int, name: str = "cfg.json", **kw) -> pathlib.Path:
        return runner_support.write_config(tmp_path / name, objective, tmp_path / "run", steps=steps, **kw)
    return write


@pytest.fixture(scope="session")
def launch_run(tmp_path_factory):
    def run(*args, timeout: int = 600, fault=None):
        return runner_support.run_cli(tmp_path_factory, *args, fault=fault, timeout=timeout)
    return run
