"""Learning acceptance of the tiny stages, through the stage runner and ``launch/run.py``.

CI (seeded, margins stated with the values they gave on 2 CPU cores):

* ``launch/run.py --stage=tiny/sft`` (the packaged tiny SFT config, fewer steps and rows) lowers
  the loss on held-out rows (tiny examples drawn with ``eval.seed``, a different example set).
* A GRPO stage through :func:`cascade_jax.runner.run_stage`, started from a short SFT of the same
  domains, raises the domain's sampled score (avg@4 over 32 held-out prompts, temperature 1).
* ``launch/run.py`` MOPD with two teacher checkpoints (two exports of that SFT) lowers each
  domain's reverse KL to its teacher and moves each domain's score toward its teacher's.

Slow: the full default tiny cascade (``launch/run.py --stage=cascade``): every RL stage raises its
own domain(s) over its start; the rlhf_teacher and if_rl stages learn on other seeds too.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.runner_support import metrics, tiny_stage_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_tiny_sft_stage_lowers_heldout_loss(tmp_path_factory, launch_run):
    """Held-out loss of the packaged tiny SFT config, 24 steps of 4 rows x 256 tokens: it must
    fall below 20% of its initial value (measured: 6.306 -> 0.314 on 2 CPU cores)."""
    d = tmp_path_factory.mktemp("sft")
    r = launch_run("--stage=tiny/sft", f"--run-dir={d / 'run'}",
                "--set=stage.steps=24", "--set=optimizer.decay_steps=24", "--set=eval.every=24",
                "--set=data.batch_rows=4", "--set=data.seq_len=256", "--set=eval.prompts=8")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [m["eval/heldout/loss"] for m in metrics(d / "run") if "eval/heldout/loss" in m]
    assert len(ev) == 2, ev
    print(f"held-out loss {ev[0]:.3f} -> {ev[1]:.3f}")
    assert ev[0] > 5.0 and ev[1] < 0.2 * ev[0], ev


def _tiny_cfg(tmp, name, objective, steps, **sections):
    from cascade_jax import config as C

    d = {"model": tiny_stage_model(),
         "rollout": {"sampling": {"n_samples": 8, "max_prompt_len": 48, "max_response_len": 16,
                                  "thinking": False}},
         "data": {"domains": ["structured_output"], "batch_prompts": 16, "batch_rows": 4,
                  "seq_len": 256, "tiny_rows_per_domain": 512,
                  "tiny_near_miss_rate": 0.0},  # SFT on the references: content, not slips
         "stage": {"name": name, "objective": objective, "steps": steps},
         "eval": {"every": steps, "prompts": 32, "k": 4},
         "run": {"out_dir": str(tmp / name)}}
    return C.from_dict(C.Config, C.merge(d, sections))


MOPD_DOMAINS = ("structured_output", "math")
MOPD_STEPS = 12
#: nats per token: a student whose sampled reverse KL to a teacher is below this is close to it
KL_CLOSE = 0.6


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """SFT (60 steps, lr 1e-2 cosine) of the tiny stages' model on structured_output + math,
    exported at steps 20, 40 and 60 (``hub``): the start and teachers of the RL tests below."""
    from cascade_jax.runner import run_stage

    d = tmp_path_factory.mktemp("tiny_sft")
    sft = _tiny_cfg(d, "sft", "sft", 60, data={"domains": list(MOPD_DOMAINS)},
                    optimizer={"lr": 1e-2, "warmup_steps": 5, "grad_clip": 1.0, "b2": 0.98,
                               "schedule": "cosine", "decay_steps": 60, "min_lr": 1e-3},
                    run={"export_every": 20})
    run_stage(sft, d / "sft", progress=False, log=lambda m: None)
    return d / "sft"


@pytest.mark.slow  # CI's learning claim with a 2-SE margin is tests/test_rl_learning.py; this stage-level
# check's margin (0.02) is within one SE of its eval (issue 24: a stronger fixture is still to come)
def test_grpo_stage_raises_its_domain_score(tiny_sft, tmp_path):
    """A GRPO stage (20 steps, 16 prompts x 8 samples, lr 1e-3) on structured_output through
    ``run_stage`` from :func:`tiny_sft`; the stage's own eval (avg@4 over 32 held-out prompts,
    temperature 1, seeded) must rise by >= 0.02. Measured on 2 CPU cores: 0.023 -> 0.062. This
    is a seeded regression check: the margin is within one standard error of a 128-sample eval;
    the margins well above noise are the full tiny cascade's (``test_full_tiny_cascade``, slow)."""
    from cascade_jax.runner import run_stage

    rl = _tiny_cfg(tmp_path, "grpo", "grpo", 20, optimizer={"lr": 1e-3, "grad_clip": 1.0},
                   model={"checkpoint": str(tiny_sft / "hub")})
    run_stage(rl, tmp_path / "grpo", progress=False, log=lambda m: None)
    ev = {m["step"]: m["eval/structured_output/avg@4"] for m in metrics(tmp_path / "grpo")
          if "eval/structured_output/avg@4" in m}
    print(f"structured_output avg@4 {ev[0]:.3f} -> {ev[20]:.3f}")
    assert ev[20] - ev[0] >= 0.02, ev


@pytest.mark.slow  # 80 s on 2 cores; CI's MOPD learning claim (relative KL) is tests/test_rl_learning.py
def test_mopd_stage_pulls_each_domain_toward_its_teacher(tiny_sft, tmp_path_factory, launch_run):
    """``launch/run.py`` MOPD with two teacher checkpoints: the student is :func:`tiny_sft` at
    step 20, structured_output's teacher the step-60 export and math's the step-40 one. Over
    12 steps (16 prompts x 2 samples, lr 5e-4) the student ends close to each domain's teacher
    (sampled reverse KL, mean of the last 3 steps, below :data:`KL_CLOSE` nats per token), a
    domain that started further away has closed at least 30% of its KL, and no domain's score
    moves away from its teacher's (the gap |student - teacher| in avg@4 over 32 held-out
    prompts does not grow; at these scores it is a few samples, so the KL is the main check).
    Measured on 2 CPU cores (run.seed 0): reverse KL math 0.89 -> 0.38 (first 3 -> last 3),
    structured_output 0.20 -> 0.39 (the step-20 student already matches its teacher there: per
    step 0.01 .. 0.59, noise of 32 sampled answers); avg@4 structured_output 0.023 -> 0.047
    (teacher 0.047), math 0.125 -> 0.086 (teacher 0.070). At lr 1e-3 the KL rose in an earlier
    run (0.18 -> 1.35 for math); at lr 2e-3 one run collapsed to 4-token answers."""
    from cascade_jax import config as C
    from cascade_jax.runner.evaluate import evaluate_checkpoint

    d = tmp_path_factory.mktemp("mopd")
    teachers = {"structured_output": str(tiny_sft / "hub"),
                "math": str(tiny_sft / "exports" / "step_40")}
    cfg = _tiny_cfg(d, "mopd", "mopd", MOPD_STEPS, model={"checkpoint": str(tiny_sft / "exports" / "step_20")},
                    data={"domains": list(MOPD_DOMAINS), "batch_prompts": 16},
                    rollout={"sampling": {"n_samples": 2}},
                    optimizer={"lr": 5e-4, "warmup_init_lr": 1e-4, "warmup_steps": 3, "grad_clip": 1.0},
                    stage={"teachers": teachers, "is_correction": "icepop"},
                    run={"out_dir": str(d / "run")})
    (d / "mopd.json").write_text(C.to_json(cfg))
    r = launch_run(f"--config={d / 'mopd.json'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(d / "run")
    ev = {m["step"]: m for m in rows if any(k.startswith("eval/") for k in m)}
    train = [m for m in rows if "loss" in m]
    report = {}
    for dom in MOPD_DOMAINS:
        kl = [m[f"mopd/reverse_kl/{dom}"] for m in train if f"mopd/reverse_kl/{dom}" in m]
        teacher = evaluate_checkpoint(cfg, checkpoint=teachers[dom], domains=[dom])["domains"][dom]["avg@4"]
        start, end = ev[0][f"eval/{dom}/avg@4"], ev[MOPD_STEPS][f"eval/{dom}/avg@4"]
        report[dom] = dict(kl_first3=sum(kl[:3]) / 3, kl_last3=sum(kl[-3:]) / 3, start=start,
                           end=end, teacher=teacher)
    print(json.dumps(report))
    for dom, v in report.items():
        assert len([m for m in train if f"mopd/reverse_kl/{dom}" in m]) == MOPD_STEPS, dom
        assert v["kl_last3"] < KL_CLOSE, (dom, v)
        if v["kl_first3"] >= KL_CLOSE:
            assert v["kl_last3"] <= 0.7 * v["kl_first3"], (dom, v)
        assert abs(v["end"] - v["teacher"]) <= abs(v["start"] - v["teacher"]), (dom, v)


#: own-domain avg@4 gains (32 held-out prompts x 4 samples, temperature 1, seeded) that the full
#: default tiny cascade must reach, per stage: start -> end measured on 2 CPU cores in brackets.
#: Margins are about half the measured gain and well above eval noise (standard error ~0.04).
#: Reported, not asserted (README): the rlhf stage (0.91 -> 0.84: MOPD had already distilled the
#: side-branch teacher, 0.94) and MOPD's other domains (math 0.68 -> 0.46, teacher 0.63).
CASCADE_GAINS = {
    "rlhf_teacher": ("rlhf", 0.2),  # 0.49 -> 0.94 (then 20 steps at lr 1e-3; docs/mopd.md §1)
    # if_rl: 0.59 -> 0.85 as the stage alone (seed 0) from a default SFT (docs/mopd.md §2; 0.59 -> 0.70
    # in the 2026-12-07 cascade at the old 8 prompts x 20 steps)
    "if_rl": ("instruction_following", 0.12),
    "multi_domain_rl": ("structured_output", 0.1),  # 0.68 -> 0.91 (mcq 0.90 -> 0.96, tool_call 0.91 -> 0.88)
    "mopd": ("rlhf", 0.25),  # 0.39 -> 0.91
    "long_context_rl": ("long_context", 0.2),  # 0.39 -> 0.81
    "code_rl": ("code", 0.12),  # 0.54 -> 0.82
    "swe_rl": ("swe", 0.4),  # 0.01 -> 0.98
}


@pytest.fixture(scope="module")
def full_cascade(tmp_path_factory, launch_run):
    """The full default tiny cascade (``launch/run.py --stage=cascade``): 11.5 min wall on 2 idle
    cores from a cold compilation cache."""
    cdir = tmp_path_factory.mktemp("full") / "cascade"
    r = launch_run("--stage=cascade", f"--run-dir={cdir}", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return cdir


@pytest.mark.slow
def test_full_tiny_cascade(full_cascade):
    """Default settings: SFT leaves partial sampled scores (every domain's avg@4 strictly between
    0 and 1), and the stages of :data:`CASCADE_GAINS` raise their own domain over their start
    by the stated margins."""
    reg = json.loads((full_cascade / "teachers.json").read_text())["checkpoints"]
    state = json.loads((full_cascade / "cascade_state.json").read_text())["stages"]
    sft = reg["sft"]["scores"]
    assert all(0.0 < v < 1.0 for v in sft.values()), sft  # measured 0.48 (swe) .. 0.87 (mcq)
    for stage, (dom, margin) in CASCADE_GAINS.items():
        before = reg[state[stage]["start"]]["scores"][dom]
        after = reg[stage]["scores"][dom]
        print(f"{stage}: {dom} {before:.3f} -> {after:.3f}")
        assert after - before >= margin, (stage, dom, before, after)


#: Seeds of the rlhf_teacher and if_rl stages beyond the cascade's own (run.seed 0), each from
#: the cascade's SFT export: a stage must learn on every seed, not on a lucky one (issue 24).
RLHF_TEACHER_SEEDS = (1, 2)
IF_RL_SEEDS = (1, 2)


def _gain_on_seed(full_cascade, run_dir, launch_run, stage: str, domain: str, seed: int):
    """``(start, end)`` avg@4 of ``domain`` (32 held-out prompts x 4 samples, the stage's own
    eval) for the default tiny ``stage`` (``configs/tiny/<stage>.json``) from the cascade's SFT
    export with ``run.seed`` = ``data.shuffle_seed`` = ``seed``."""
    steps = json.loads((ROOT / "configs" / "tiny" / f"{stage}.json").read_text())["stage"]["steps"]
    r = launch_run(f"--stage=tiny/{stage}", f"--init={full_cascade / 'sft'}", f"--run-dir={run_dir}",
                   f"--set=run.seed={seed}", f"--set=data.shuffle_seed={seed}",
                   f"--set=eval.every={steps}", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [m[f"eval/{domain}/avg@4"] for m in metrics(run_dir) if f"eval/{domain}/avg@4" in m]
    assert len(ev) == 2, ev
    print(f"{stage} seed {seed}: {domain} {ev[0]:.3f} -> {ev[1]:.3f}")
    return ev[0], ev[1]


@pytest.mark.slow  # 5-9 min per seed on 2 busy cores after the cascade (16 prompts per step)
@pytest.mark.parametrize("seed", RLHF_TEACHER_SEEDS)
def test_rlhf_teacher_stage_learns_on_other_seeds(full_cascade, tmp_path, launch_run, seed):
    """The default tiny rlhf_teacher stage (``configs/tiny/rlhf_teacher.json``) from the cascade's
    SFT export with ``run.seed`` = ``data.shuffle_seed`` = ``seed`` raises rlhf avg@4 (win rate
    against the fixed baseline, 32 held-out prompts x 4 samples) by >= 0.2, the gain
    :data:`CASCADE_GAINS` asks of the cascade's own run (about 4.5 standard errors of one score,
    0.044). Measured on 2 busy CPU cores from one SFT checkpoint (docs/mopd.md §1): +0.42 to
    +0.49 on each of seeds 0-8 (0.40 -> 0.82 .. 0.89); the old config (lr 1e-3, 20 steps, no
    dynamic filtering) gave -0.01 / +0.32 / +0.03 on seeds 0-2."""
    start, end = _gain_on_seed(full_cascade, tmp_path / "rlhf_teacher", launch_run,
                               "rlhf_teacher", "rlhf", seed)
    assert end - start >= 0.2, (start, end)


@pytest.mark.slow  # about 6 min per seed on 2 busy cores after the cascade
@pytest.mark.parametrize("seed", IF_RL_SEEDS)
def test_if_rl_stage_learns_on_other_seeds(full_cascade, tmp_path, launch_run, seed):
    """The default tiny if_rl stage (``configs/tiny/if_rl.json``) from the cascade's SFT export
    with ``run.seed`` = ``data.shuffle_seed`` = ``seed`` raises instruction-following avg@4
    (strict IFEval-style checks, 32 held-out prompts x 4 samples) by >= 0.2 (about 4.5 standard
    errors of one score, 0.044; 3.2 of a gain). Measured on 2 busy CPU cores from one SFT
    checkpoint (docs/mopd.md §2): +0.22 to +0.30 on each of seeds 0-5 (0.59 -> 0.81 .. 0.90);
    the old config (8 prompts per step, 20 steps) gave +0.11 / +0.08 / +0.00 on seeds 0-2."""
    start, end = _gain_on_seed(full_cascade, tmp_path / "if_rl", launch_run,
                               "if_rl", "instruction_following", seed)
    assert end - start >= 0.2, (start, end)


@pytest.mark.slow  # 11 min wall on 2 idle cores after the cascade
def test_shipped_study_holds_its_claims(full_cascade, tmp_path):
    """``launch/study.py`` as shipped (``launch/studies/mopd_vs_grpo.json``: MOPD vs continuing
    GRPO from the multi-domain RL checkpoint, 20 steps, seeds 0-2) on the full cascade: every
    declared claim holds (measured: MOPD reaches the rlhf teacher's 0.93 - 0.1 at step 16, GRPO
    not within 20; rlhf at step 20 0.910 vs 0.510; math 0.456 vs 0.443)."""
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "study.py"),
                        f"--cascade-dir={full_cascade}", f"--study-dir={tmp_path / 'study'}",
                        "--no-progress"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    verdicts = json.loads((tmp_path / "study" / "study_result.json").read_text())["verdicts"]
    assert len(verdicts) == 3 and all(v["held"] for v in verdicts), verdicts
