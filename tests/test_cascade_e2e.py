"""The shortened tiny cascade end to end through ``launch/run.py --stage=cascade`` (every stage,
the RLHF side branch included, two steps each), killed between stages and inside a stage and
rerun to completion without redoing finished stages; then ``--stage=mopd --teachers-from``.

Real processes (the command line), real runner, real rewards; small shapes shared by all stages
and JAX's persistent compilation cache keep it short."""

import json
import os
import pathlib
import signal
import sys
import time

import pytest

from tests.runner_support import Child

pytestmark = pytest.mark.integration  # the integration tier (setup.cfg; launch/test.sh --integration)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--set=stage.steps=2", "--set=eval.prompts=1", "--set=eval.k=1",
         "--set=run.checkpoint_every=1", "--set=data.batch_prompts=2", "--set=rollout.sampling.n_samples=2",
         "--set=rollout.sampling.max_response_len=16", "--set=data.batch_rows=2"]
STAGES = ["sft", "rlhf_teacher", "if_rl", "multi_domain_rl", "mopd", "rlhf", "long_context_rl",
          "code_rl", "swe_rl"]


def _env():
    # the default persistent compilation cache (~/.cache/cascade_jax/xla): reruns start warm
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _state(cdir):
    try:
        return json.loads((cdir / "cascade_state.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _run(args, env, log, *, kill_when=None, timeout=900):
    """Run ``launch/run.py args``; with ``kill_when``, SIGKILL its process group as soon as the
    predicate holds. Returns the exit code ("killed" when killed)."""
    with Child([sys.executable, str(ROOT / "launch/run.py"), *args], env, cwd=ROOT, log=log) as c:
        t0 = time.monotonic()
        while c.p.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(c.pid, signal.SIGKILL)
                c.p.wait()
                return "killed"
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"launch/run.py {' '.join(args)} ran over {timeout} s")
            time.sleep(0.1)
        return c.p.returncode


def test_tiny_cascade_end_to_end_with_kills(tmp_path):
    cdir, log = tmp_path / "cascade", tmp_path / "log.txt"
    env = _env()
    args = ["--stage=cascade", f"--run-dir={cdir}", "--no-progress", *SHORT]

    # 1. killed between stages: the side branch has finished, IF-RL has just started
    rc = _run(args, env, log, kill_when=lambda: _state(cdir).get("if_rl", {}).get("status") == "running")
    assert rc == "killed", log.read_text()[-3000:]
    st = _state(cdir)
    assert st["sft"]["status"] == st["rlhf_teacher"]["status"] == "done"
    stamps = {n: (cdir / n / "summary.json").stat().st_mtime_ns for n in ("sft", "rlhf_teacher")}

    # 2. killed inside multi-domain RL, after its step-1 checkpoint
    def inside():
        s = _state(cdir).get("multi_domain_rl", {})
        return s.get("status") == "running" and (cdir / "multi_domain_rl/checkpoints/1").is_dir()

    rc = _run(args, env, log, kill_when=inside)
    assert rc == "killed", log.read_text()[-3000:]
    assert _state(cdir)["if_rl"]["status"] == "done"

    # 3. rerun to the end
    rc = _run(args, env, log)
    assert rc == 0, log.read_text()[-3000:]
    st = _state(cdir)
    assert [n for n in STAGES if st[n]["status"] == "done"] == STAGES
    for n, t in stamps.items():  # finished stages were not redone
        assert (cdir / n / "summary.json").stat().st_mtime_ns == t, n
    assert st["multi_domain_rl"]["resumed_from"] == 1  # resumed inside the stage
    for n in STAGES:
        for f in ("run_config.json", "provenance.json", "metrics.jsonl", "summary.json", "hub/config.json"):
            assert (cdir / n / f).exists(), (n, f)
        steps = [json.loads(l)["step"] for l in (cdir / n / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2, n

    # each stage starts from the previous stage's final export; the side branch from SFT
    cfg = lambda n: json.loads((cdir / n / "run_config.json").read_text())
    assert cfg("rlhf_teacher")["model"]["checkpoint"] == str(cdir / "sft/hub")
    assert cfg("if_rl")["model"]["checkpoint"] == str(cdir / "sft/hub")
    assert cfg("swe_rl")["model"]["checkpoint"] == str(cdir / "code_rl/hub")
    # the paper's MOPD teachers, from the registry
    teachers = cfg("mopd")["stage"]["teachers"]
    assert teachers["math"] == str(cdir / "sft/hub")
    assert teachers["rlhf"] == str(cdir / "rlhf_teacher/hub")
    assert {teachers[d] for d in ("instruction_following", "mcq", "tool_call", "structured_output")} \
        == {str(cdir / "multi_domain_rl/hub")}

    # the RLHF stages' KL term has its reference (the stage's start): 0 before the first update
    for n in ("rlhf_teacher", "rlhf"):
        rows = [json.loads(l) for l in (cdir / n / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["kl_ref"] == 0.0 and all("time/reference_s" in r for r in rows if "kl_ref" in r)

    reg = json.loads((cdir / "teachers.json").read_text())
    assert list(reg["checkpoints"]) == ["base", *STAGES]
    for name, e in reg["checkpoints"].items():
        assert len(e["scores"]) == 9 and all(0.0 <= v <= 1.0 for v in e["scores"].values()), name
    report = (cdir / "report.md").read_text()
    for png in ("score_matrix", "reward_per_domain", "response_lengths", "is_mismatch", "time_split"):
        assert f"({png}.png)" in report and (cdir / f"{png}.png").stat().st_size > 5000

    # --stage=mopd alone, teachers and start from the finished cascade
    mdir = tmp_path / "mopd"
    rc = _run(["--stage=mopd", f"--teachers-from={cdir}", f"--run-dir={mdir}", "--no-progress", *SHORT],
              env, log)
    assert rc == 0, log.read_text()[-3000:]
    m = json.loads((mdir / "run_config.json").read_text())
    assert m["model"]["checkpoint"] == str(cdir / "multi_domain_rl/hub")
    assert m["stage"]["teachers"] == teachers
    assert json.loads((mdir / "summary.json").read_text())["steps"] == 2


def test_cascade_command_errors(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from launch import run as R

    for args, needle in [
        (["--stage=cascade", "--preset=huge"], "unknown cascade preset 'huge'"),
        (["--stage=cascade", "--teachers=math:sft"], "--teachers 'math:sft'"),
        (["--stage=cascade", f"--teachers-from={tmp_path}"], "--teachers-from applies to --stage=mopd"),
        (["--stage=mopd", f"--teachers-from={tmp_path}"], "no teachers.json there"),
        (["--stage=cascade", "--set=stage.stepz=2"], "stage.stepz"),
    ]:
        code = R.main([*args, f"--run-dir={tmp_path / 'c'}", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
