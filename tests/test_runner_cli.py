"""launch/run.py as a new user meets it: bad input → one line naming the thing, a distinct exit
code, no traceback, nothing written; sensible defaults with no arguments."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.runner import errors as E
from launch import run as R

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^\[[\w/.-]+\] ")


def _main(capsys, *args):
    code = R.main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _fails(capsys, tmp_path, code, needles, *args):
    run_dir = tmp_path / "run"
    got, err = _main(capsys, f"--run-dir={run_dir}", *args)
    assert got == code, err
    # progress lines ("[stage] ...", every 30 s of a slow build) are not part of the error
    lines = [l for l in err.splitlines() if l.strip() and not PROGRESS.match(l)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not run_dir.exists(), "something was written before validation passed"
    return lines[0]


def test_exit_codes_are_distinct():
    assert len(set(E.EXIT_CODES.values())) == len(E.EXIT_CODES)


def test_no_arguments_is_the_tiny_demo():
    cfg = R.resolve_config(R.parse_args([]))
    assert cfg.stage.objective == "demo" and cfg.model.preset == "tiny"
    assert cfg.rollout.sampling.max_prompt_len + cfg.rollout.sampling.max_response_len <= 64
    assert cfg.data.batch_prompts * cfg.rollout.sampling.n_samples <= 16


def test_config_errors(capsys, tmp_path):
    _fails(capsys, tmp_path, 2, ["unknown stage 'nope'", "tiny/sft"], "--stage=nope")
    _fails(capsys, tmp_path, 2, ["optimizer.lrr", "warmup_steps"], "--stage=tiny/sft",
           "--set=optimizer.lrr=1")
    _fails(capsys, tmp_path, 2, ["rollout.sampling.temperature", "greedy"], "--stage=tiny/multi_domain_rl",
           "--set=rollout.sampling.temperature=0")
    _fails(capsys, tmp_path, 2, ["rollout.sampling.top_p", "(0, 1]"], "--stage=tiny/multi_domain_rl",
           "--set=rollout.sampling.top_p=1.5")
    _fails(capsys, tmp_path, 2, ["rollout.sampling.top_p"], "--stage=tiny/multi_domain_rl",
           "--set=rollout.sampling.top_p=0")
    # the paper-scale rollout lengths on the tiny model: refused up front, not OOM later
    _fails(capsys, tmp_path, 2, ["max_response_len", "max_position_embeddings"],
           "--stage=multi_domain_rl", "--preset=tiny")
    _fails(capsys, tmp_path, 2, ["preset"], "--stage=tiny/sft", "--preset=huge")


def test_file_errors(capsys, tmp_path):
    _fails(capsys, tmp_path, 3, ["--config", "missing.json"], f"--config={tmp_path}/missing.json")
    _fails(capsys, tmp_path, 3, ["--config"], f"--config={tmp_path}")  # a directory
    (tmp_path / "bad.json").write_text("{not json")
    _fails(capsys, tmp_path, 2, ["bad.json", "not valid JSON"], f"--config={tmp_path}/bad.json")
    _fails(capsys, tmp_path, 3, ["--init", "nowhere"], "--stage=tiny/sft", f"--init={tmp_path}/nowhere")
    _fails(capsys, tmp_path, 3, ["data", "missing.jsonl", "no such file"], "--stage=tiny/sft",
           '--set=data.sources=[{"format": "jsonl", "path": "%s/missing.jsonl"}]' % tmp_path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from models import nemotron_h as nh

    d = tmp_path_factory.mktemp("hub") / "ckpt"
    cfg = nh.preset("tiny")
    nh.save_checkpoint(nh.init_params(cfg, jax.random.key(0), np.float32), cfg, str(d))
    from cascade_jax.data import save_tokenizer, tiny_tokenizer

    save_tokenizer(tiny_tokenizer(), d)
    return d


def test_checkpoint_errors(capsys, tmp_path, hub):
    import shutil

    # a checkpoint whose weights do not fit the configured model
    _fails(capsys, tmp_path, 5, ["model.checkpoint", "shape"], "--stage=tiny/sft", f"--init={hub}",
           "--set=model.overrides.intermediate_size=48")
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(hub, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, tmp_path, 5, ["model.checkpoint", "bad_ckpt"], "--stage=tiny/sft", f"--init={bad}")
    (bad / "config.json").write_text("{")
    _fails(capsys, tmp_path, 5, ["bad_ckpt", "config.json"], "--stage=tiny/sft", f"--init={bad}")
    # a MOPD teacher that is not there
    _fails(capsys, tmp_path, 3, ["stage.teachers.math", "gone"], "--stage=tiny/mopd",
           '--set=stage.teachers={"math": "%s/gone"}' % tmp_path)


def test_run_dir_holding_another_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = C.apply_overrides(R.resolve_config(R.parse_args(["--stage=tiny/sft"])),
                              ["optimizer.lr=0.5", f"run.out_dir={run_dir}"])
    (run_dir / "run_config.json").write_text(C.to_json(other))
    (run_dir / "checkpoints" / "7").mkdir(parents=True)  # it got as far as a checkpoint
    before = sorted(p.name for p in run_dir.iterdir())
    code, err = _main(capsys, "--stage=tiny/sft", f"--run-dir={run_dir}")
    assert code == 4 and "holds a different run" in err and "optimizer.lr" in err and "--fresh" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_print_config_resolves_everything(capsys, tmp_path, hub):
    code = R.main(["--stage=tiny/sft", f"--init={hub}", f"--run-dir={tmp_path}/r",
                   "--set=stage.steps=3", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0
    cfg = json.loads(out)
    assert cfg["model"]["checkpoint"] == str(hub) and cfg["run"]["out_dir"] == f"{tmp_path}/r"
    assert cfg["stage"]["steps"] == 3 and not (tmp_path / "r").exists()


def test_subprocess_one_line_and_code(tmp_path):
    """The real process: exit code and a single stderr line (no traceback)."""
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--stage=tiny/sft",
                        "--set=rollout.sampling.top_p=2", f"--run-dir={tmp_path}/r"],
                       capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "rollout.sampling.top_p" in r.stderr


def test_unreachable_rollout_server(capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _fails(capsys, tmp_path, 6, ["rollout server", f"127.0.0.1:{port}", "not reachable"],
           "--stage=tiny/multi_domain_rl", f"--set=rollout.servers.url=http://127.0.0.1:{port}",
           "--set=rollout.engine=jax_server")


@pytest.mark.integration
def test_profile_steps_trace_the_named_steps(tmp_path):
    """``run.profile_steps`` numbers steps as ``metrics.jsonl`` does: ``[2]`` on a 2-step SFT
    stage writes exactly one ``jax.profiler`` trace (an ``.xplane.pb``) under ``profile/`` (a
    0-based reading would trace a step 3 that never runs); 0 is refused naming the field."""
    from cascade_jax.runner import run_stage
    from tests.runner_support import write_config

    path = write_config(tmp_path / "sft.json", "sft", tmp_path / "run", steps=2,
                        data={"batch_rows": 2, "seq_len": 128}, run={"profile_steps": [2]})
    cfg = C.load(str(path))
    run_stage(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    traces = sorted((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    with pytest.raises(C.ConfigError, match=r"run.profile_steps: step numbers start at 1"):
        C.apply_overrides(cfg, ["run.profile_steps=[0, 3]"])
