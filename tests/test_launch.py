"""The entry point: demo end to end, config errors exit 2 naming the key."""

import json

import pytest


@pytest.fixture
def _run(launch_run):
    return lambda *args: launch_run(*args, timeout=300)


def test_demo_runs(tmp_path, _run):
    r = _run("--stage=demo", f"--set=run.out_dir={tmp_path}", "--set=rollout.sampling.max_response_len=6",
             "--set=rollout.sampling.n_samples=2")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["new_tokens"] == 2 * 2 * 6 and report["decode_tokens_per_s"] > 0
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run_config.json").read_text())["rollout"]["sampling"]["n_samples"] == 2


def test_bad_key_and_stage(_run):
    r = _run("--stage=mopd", "--set=optimizer.lrr=1", "--print-config")
    assert r.returncode == 2 and "optimizer.lrr" in r.stderr and "warmup_steps" in r.stderr
    r = _run("--stage=demo", "--set=model.overrides.hiden_size=8")
    assert r.returncode == 2 and "hiden_size" in r.stderr and "hidden_size" in r.stderr
    r = _run("--stage=nope")
    assert r.returncode == 2 and "valid stages" in r.stderr and "mopd" in r.stderr


def test_print_config(_run):
    r = _run("--stage=mopd", "--set=stage.steps=40", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["stage"]["steps"] == 40 and cfg["optimizer"]["warmup_init_lr"] == 2e-7
