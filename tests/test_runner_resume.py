"""Exact resume: a GRPO stage killed with SIGKILL at seeded points (right after an async
checkpoint save started, inside the weight sync), then with its newest checkpoint corrupted,
rerun each time with the same command, ends with parameters and optimizer state equal bit for
bit to an uninterrupted run's; nothing in the run dir is left corrupted or duplicated."""

import json
import random

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.runner_support import assert_same_state, metrics, run_cli, sft_run, write_config

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

STEPS = 4
SEED = 0  # seeds the kill points


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sft = sft_run(tmp_path_factory)
    d = tmp_path_factory.mktemp("resume")

    def cfg(name):
        return write_config(d / f"{name}.json", "grpo", d / name, steps=STEPS,
                            domains=("structured_output", "math"),
                            run={"checkpoint_every": 1, "keep_last": 2})

    ref = run_cli(tmp_path_factory, f"--config={cfg('ref')}", f"--init={sft}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    rng = random.Random(SEED)
    save_at = rng.randint(1, STEPS - 2)  # killed while checkpoint `save_at` is being written
    sync_at = rng.randint(save_at + 1, STEPS - 1)  # killed inside the sync after update `sync_at`
    args = (f"--config={cfg('killed')}", f"--init={sft}")
    log = []
    for fault in (f"save@{save_at}", f"sync@{sync_at}"):
        r = run_cli(tmp_path_factory, *args, fault=fault)
        assert r.returncode == -9, (fault, r.returncode, r.stderr[-3000:])
        log.append(r)
    # corrupt the newest complete checkpoint: the rerun must fall back to the one before
    ck = d / "killed" / "checkpoints"
    newest = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    victim = next(p for p in sorted((ck / str(newest) / "state").rglob("*")) if p.is_file()
                  and p.stat().st_size > 0 and "ocdbt" in str(p.parent) + p.name)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    r = run_cli(tmp_path_factory, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    log.append(r)
    return d, save_at, sync_at, newest, log, sft


def test_resumed_run_equals_uninterrupted(runs):
    d, save_at, sync_at, newest, log, sft = runs
    final = log[-1]
    assert f"checkpoint {newest} does not load" in final.stderr, final.stderr[-2000:]
    assert "resumed" in final.stderr
    assert_same_state(d / "ref", d / "killed", STEPS)
    a, b = load_file(d / "ref" / "hub" / "model.safetensors"), load_file(d / "killed" / "hub" / "model.safetensors")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    # training really moved the weights (the comparison is not vacuous)
    init = load_file(sft / "hub" / "model.safetensors")
    assert sum(not np.array_equal(init[k], a[k]) for k in a) > len(a) // 2


def test_run_dir_is_clean_after_resume(runs):
    d = runs[0]
    ck = d / "killed" / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    assert all(n.isdigit() for n in names), names  # no partial (tmp) checkpoint left behind
    assert int(names[-1]) == STEPS
    steps = [m["step"] for m in metrics(d / "killed")]
    assert steps == sorted(set(steps)) == list(range(1, STEPS + 1)), steps  # each step logged once
    ref = {m["step"]: m for m in metrics(d / "ref")}
    for m in metrics(d / "killed"):
        assert m["loss"] == ref[m["step"]]["loss"] and m["reward_mean"] == ref[m["step"]]["reward_mean"]
    prov = json.loads((d / "killed" / "provenance.json").read_text())
    assert len(prov["resumes"]) == 2 and prov["git"] == json.loads((d / "ref" / "provenance.json").read_text())["git"]
    assert (d / "killed" / "checkpoints.corrupt").is_dir()
