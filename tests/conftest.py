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
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import pytest

from models import nemotron_h as nh
from tests import runner_support

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
