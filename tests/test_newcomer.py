"""A hostile newcomer: the README's promises tried as real command lines in subprocesses --
interruptions, bad input, mistyped paths -- each checked for its exit code, its single
``error:`` line and what it left on disk."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.runner_support import (Child, assert_same_state, cache_dir, checkpoint_state, cli_env,
                                  launch_cmd, write_config)

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: a progress line ("[sft] step 3/5 ...", printed every 30 s without a terminal)
PROGRESS = re.compile(r"^\[[\w/.-]+\] ")

#: a tiny SFT stage of a few short steps (seconds on CPU once compiled)
TINY_SFT = {"data": {"batch_rows": 2, "seq_len": 128, "domains": ["math"]},
            "optimizer": {"lr": 3e-3, "warmup_steps": 1}}


def _run(tmp_path_factory, script, *args, timeout=300, **env):
    return subprocess.run(launch_cmd(script, *args), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(tmp_path_factory, **env))


def _one_error(r, code: int, *needles) -> str:
    """Exit ``code``, exactly one non-empty stderr line, ``error: ...`` containing ``needles``."""
    lines = [l for l in r.stderr.splitlines() if l.strip() and not PROGRESS.match(l)]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# Preemption: SIGTERM after a checkpointed step, exit 75, rerun resumes bit for bit


STEPS = 5


@pytest.mark.integration
def test_sigterm_checkpoints_exits_75_and_resumes_bit_identically(tmp_path, tmp_path_factory):
    def cfg(name, **run):
        return write_config(tmp_path / f"{name}.json", "sft", tmp_path / name, steps=STEPS,
                            run={"checkpoint_every": 2, **run}, **TINY_SFT)

    # the reference saves by wall time only (every step is past a 1 us interval): the time
    # cadence writes checkpoints, and the comparison below shows a cadence changes no result
    ref_cfg = cfg("ref", checkpoint_every=0, checkpoint_every_s=1e-6, keep_last=STEPS)
    ref = _run(tmp_path_factory, "run.py", f"--config={ref_cfg}", "--no-progress")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(int(x.name) for x in (tmp_path / "ref" / "checkpoints").iterdir()
                  if x.name.isdigit()) == list(range(1, STEPS + 1))

    # the run waits after step 3 (CASCADE_FAULT=hold@3) until a signal arrives from outside;
    # checkpoint 2 is on disk by then, step 3 is not a checkpoint step
    args = (f"--config={cfg('killed')}", "--no-progress")
    ck = tmp_path / "killed" / "checkpoints"
    with Child(launch_cmd("run.py", *args), cli_env(tmp_path_factory, CASCADE_FAULT="hold@3")) as p:
        p.wait_for(lambda: (ck / "2").is_dir(), timeout=240)
        code = p.signal_and_wait(signal.SIGTERM, timeout=120)
    err = "\n".join(p.lines)
    assert code == 75, (code, err[-3000:])
    assert "SIGTERM received" in err and "stopped by SIGTERM after step 3/5" in err, err[-3000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert sorted(int(x.name) for x in ck.iterdir() if x.name.isdigit()) == [2, 3]
    assert not (tmp_path / "killed" / "hub").exists() and not (tmp_path / "killed" / "summary.json").exists()
    mid_state, _ = checkpoint_state(tmp_path / "killed", 3)
    assert int(mid_state["['step']"]) == 3

    again = _run(tmp_path_factory, "run.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr and "at step 3" in again.stderr
    a = assert_same_state(tmp_path / "ref", tmp_path / "killed", STEPS)
    ref_rows = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]
    # training moved the weights after the resume: the equality above is not vacuous
    assert any(not np.array_equal(mid_state[k], a[k]) for k in a if k.startswith("['params']"))


# --------------------------------------------------------------------------------------------
# Bad input: one error line, the documented code, nothing written


def _jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                              for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, needle", [
    (b'{"messages": [', "malformed JSON"),
    ({"text": "no messages here"}, "missing field 'messages'"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "malformed JSON"),
])
def test_bad_sft_rows_exit_3_and_write_nothing(tmp_path, tmp_path_factory, bad, needle):
    src = _jsonl(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
    run = tmp_path / "run"
    args = ["--stage=tiny/sft", f"--run-dir={run}", "--no-progress",
            '--set=data.sources=[{"path": "%s", "format": "jsonl"}]' % src,
            "--set=data.batch_rows=2", "--set=data.seq_len=128", "--set=stage.steps=1"]
    r = _run(tmp_path_factory, "run.py", *args)
    _one_error(r, 3, "data.jsonl:2", needle)
    assert not run.exists()


def test_sft_source_whose_only_row_is_too_long_is_an_error_not_a_hang(tmp_path, tmp_path_factory):
    long = {"prompt": "x " * 400, "response": "y"}
    src = _jsonl(tmp_path / "long.jsonl", [long])
    run = tmp_path / "run"
    r = _run(tmp_path_factory, "run.py", "--stage=tiny/sft", f"--run-dir={run}", "--no-progress",
             '--set=data.sources=[{"path": "%s", "format": "jsonl"}]' % src,
             "--set=data.batch_rows=2", "--set=data.seq_len=64", timeout=120)
    _one_error(r, 3, "no usable SFT example", "1 longer than data.seq_len=64", "long.jsonl:1")
    assert not run.exists()


def test_rl_prompts_all_too_long_exit_3_and_write_nothing(tmp_path, tmp_path_factory):
    rows = [{"prompt": "what is 2 + 2?", "domain": "math", "metadata": {"answer": "4"}}] * 3
    src = _jsonl(tmp_path / "rl.jsonl", rows)
    run = tmp_path / "run"
    r = _run(tmp_path_factory, "run.py", "--stage=tiny/multi_domain_rl", f"--run-dir={run}",
             "--no-progress", '--set=data.sources=[{"path": "%s", "format": "jsonl"}]' % src,
             '--set=data.domains=["math"]', "--set=data.domain_weights={}",
             "--set=rollout.sampling.max_prompt_len=8", timeout=120)
    _one_error(r, 3, "domain math", "rollout.sampling.max_prompt_len = 8")
    assert not run.exists()


def test_init_inside_the_run_dir_is_refused_before_anything_is_deleted(tmp_path):
    """``--init runs/x --run-dir runs/x --fresh``: refused up front; the earlier run's ``hub/``
    and ``eval/`` stay."""
    run = tmp_path / "x"
    (run / "hub").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "hub" / "config.json").write_text("{}")
    (run / "eval" / "e.json").write_text("{}")
    (run / "run_config.json").write_text("{}")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for extra in (["--fresh"], []):
        r = subprocess.run(launch_cmd("run.py", "--stage=tiny/sft", f"--init={run}", f"--run-dir={run}",
                                      *extra), capture_output=True, text=True, timeout=120, env=cli_env())
        _one_error(r, 4, "--init", "lies in the run dir's hub/", "another --run-dir")
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_fresh_removes_only_run_artefacts(tmp_path):
    from cascade_jax.runner.loop import RUN_ARTIFACTS, _clear

    run = tmp_path / "run"
    (run / "hub").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    (run / "mydata").mkdir()
    (run / "metrics.jsonl").write_text("")
    _clear(run)
    assert sorted(p.name for p in run.iterdir()) == ["mydata", "notes.txt"]
    assert "notes.txt" not in RUN_ARTIFACTS


def _quick(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=ROOT)


def test_plan_negative_seq_len_names_the_flag():
    r = _quick(str(ROOT / "launch" / "plan.py"), "--mesh=fsdp:1", "--seq-len=-5")
    assert r.returncode == 2 and "argument --seq-len: must be > 0, got -5" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_stage_mopd_is_the_30b_stage_and_names_what_is_missing(tmp_path):
    r = _quick(str(ROOT / "launch" / "run.py"), "--stage=mopd", f"--run-dir={tmp_path / 'm'}")
    line = _one_error(r, 3, "teachers: stage.teachers.", "data: data.sources[0].path")
    assert "runs/sft/final" in line and "[cascade]" not in r.stderr  # not the tiny bootstrap
    assert not (tmp_path / "m").exists()
    r = _quick(str(ROOT / "launch" / "run.py"), "--stage=mopd", "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["preset"] == "nano-30b-a3b"


def test_print_config_works_for_every_stage_name(capsys):
    import configs
    from launch import run as R

    r = _quick(str(ROOT / "launch" / "run.py"), "--stage=cascade", "--print-config")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"sft", "mopd", "swe_rl"} and out["mopd"]["model"]["preset"] == "tiny"
    for name in configs.stage_names():  # in process: the same main, without 19 interpreters
        assert R.main([f"--stage={name}", "--print-config"]) == 0, name
        assert json.loads(capsys.readouterr().out)["stage"]["name"]


def test_unknown_preset_is_named_as_such():
    r = _quick(str(ROOT / "launch" / "run.py"), "--stage=tiny/sft", "--preset=huge", "--print-config")
    assert r.returncode == 2 and "unknown preset 'huge'" in r.stderr and "real data" not in r.stderr


def test_study_mistyped_cascade_dir_is_an_error(tmp_path):
    r = _quick(str(ROOT / "launch" / "study.py"), f"--cascade-dir={tmp_path / 'cascde'}",
               f"--study-dir={tmp_path / 's'}")
    _one_error(r, 2, "--cascade-dir", "no cascade there")
    assert not (tmp_path / "cascde").exists() and not (tmp_path / "s").exists()


def test_study_bad_seeds_flag_is_an_error(tmp_path):
    r = _quick(str(ROOT / "launch" / "study.py"), "--seeds=3,x,5", f"--study-dir={tmp_path / 's'}")
    _one_error(r, 2, "--seeds '3,x,5'", "comma-separated integers")
    assert not (tmp_path / "s").exists()


def _config_only_hub(d: pathlib.Path) -> pathlib.Path:
    """A directory with the tiny preset's ``config.json`` (enough for checks that need only the
    model's shape; loading weights from it would fail)."""
    from models import nemotron_h as nh

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(nh.preset("tiny").to_hf_dict()))
    return d


def test_eval_max_new_tokens_checked_against_the_context(tmp_path):
    hub = _config_only_hub(tmp_path / "hub")
    r = _quick(str(ROOT / "launch" / "eval.py"), f"--checkpoint={hub}", "--max-new-tokens=100000")
    line = _one_error(r, 2, "--max-new-tokens 100000", "context of")
    assert "at most" in line


def test_eval_name_outside_the_eval_dir_is_refused_first(tmp_path):
    run = tmp_path / "run"
    (run / "hub").mkdir(parents=True)
    r = _quick(str(ROOT / "launch" / "eval.py"), f"--checkpoint={run}", "--name=../../x")
    _one_error(r, 2, "--name '../../x'", "plain file name")
    assert not (tmp_path / "x.json").exists() and not (run / "eval").exists()


def test_long_rows_among_good_ones_are_counted_with_their_location(tmp_path):
    from cascade_jax import config as C
    from cascade_jax import data

    long = {"prompt": "x " * 400, "response": "y"}
    src = _jsonl(tmp_path / "mix.jsonl", [GOOD, long, GOOD, GOOD])
    cfg = C.from_dict(C.Config, {"data": {"sources": [{"path": str(src), "format": "jsonl"}],
                                          "batch_rows": 1, "seq_len": 64, "num_epochs": 1}})
    it = data.sft_batches(cfg, data.tiny_tokenizer())
    it.check()
    assert it.stats["overlong"] == 0  # check() rewinds
    n = sum(1 for _ in it)
    assert n >= 1 and it.stats["overlong"] == 1 and it.stats["examples"] == 3
    assert it.first_skipped["overlong"].startswith(f"{src}:2: ")


@pytest.mark.slow
def test_full_disk_is_one_error_line_exit_7(tmp_path, tmp_path_factory):
    """A file size limit (RLIMIT_FSIZE: writes fail with EFBIG, as ENOSPC would) hit by the
    first checkpoint: one ``error:`` line, exit 7, no traceback; the same command reruns."""
    import resource

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "sft.json", "sft", run, steps=2, **TINY_SFT)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run(launch_cmd("run.py", f"--config={cfg}", "--no-progress"), capture_output=True,
                       text=True, timeout=600, env=cli_env(tmp_path_factory), preexec_fn=limit)
    _one_error(r, 7, "cannot write the run's files", "file too large")
    assert "Traceback" not in r.stderr
    again = _run(tmp_path_factory, "run.py", f"--config={cfg}", "--no-progress", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]


def test_progress_lines_without_a_terminal_name_step_rate_and_eta():
    """Without a terminal a background thread prints a line every ``every_s`` seconds, while
    building and while steps run (30 s by default; 0.05 here)."""
    import threading

    from cascade_jax.runner.metrics import Progress

    lines, got = [], threading.Event()

    def log(m):
        lines.append(m)
        if m.startswith("[sft] step 5/10"):
            got.set()

    bar = Progress(10, desc="sft", enabled=False, log=log, every_s=0.05)
    bar.set_phase("building (model, data, compile)")
    time.sleep(0.2)
    bar.begin_steps(2)
    for _ in range(3):
        time.sleep(0.02)
        bar.update({"loss": 1.5, "time/step_s": 0.02})
    assert got.wait(5)
    bar.close()
    assert any(l.startswith("[sft] building (model, data, compile) (") for l in lines), lines
    last = [l for l in lines if " ETA " in l][-1]
    assert last.startswith("[sft] step 5/10 (50%), ") and "steps/s" in last and "loss 1.5" in last
    n = len(lines)
    time.sleep(0.2)
    assert len(lines) == n  # closed: no more lines


# --------------------------------------------------------------------------------------------
# Ctrl-C in a cascade's registry evaluation and in launch/study.py: exit 130, one line; the
# rerun passes that point (SIGTERM at its next stage's first step then stops it with exit 75)


def _others(lines) -> list:
    """stderr lines that are not progress or log lines (``[name] ...``)."""
    return [l for l in lines if l.strip() and not PROGRESS.match(l)]


#: the tiny cascade, cheap: 2 steps a stage, 2 eval prompts x 1 sample per domain
CHEAP_CASCADE = ("stage.steps=2", "eval.prompts=2", "eval.k=1")


def _interrupt_registry_eval_then_resume(cmd, env, cwd, cascade_dir: pathlib.Path):
    with Child(cmd, dict(env, CASCADE_FAULT="hold@eval:base"), cwd=cwd) as first:
        first.wait_for("[cascade] base: holding in the evaluation")
        code = first.signal_and_wait(signal.SIGINT, timeout=120)
    assert code == 130, (code, first.text())
    others = _others(first.lines)
    assert len(others) == 1 and others[0].startswith("interrupted (SIGINT)"), others
    assert "rerun the same command" in others[0]
    assert "base" not in json.loads((cascade_dir / "teachers.json").read_text())["checkpoints"] \
        if (cascade_dir / "teachers.json").exists() else True

    with Child(cmd, dict(env, CASCADE_FAULT="hold@1"), cwd=cwd) as again:
        again.wait_for("holding after step 1")
        code = again.signal_and_wait(signal.SIGTERM, timeout=120)
    assert code == 75, (code, again.text())
    assert any("[cascade] base: evaluating" in l for l in again.lines)
    reg = json.loads((cascade_dir / "teachers.json").read_text())
    assert "base" in reg["checkpoints"]
    state = json.loads((cascade_dir / "cascade_state.json").read_text())
    assert state["stages"]["sft"]["status"] == "running"
    assert (cascade_dir / "sft" / "checkpoints" / "1").is_dir()
    for w in (first, again):
        text = "\n".join(w.lines)
        assert "terminate called" not in text and "Traceback" not in text, text[-3000:]


@pytest.mark.integration
def test_ctrl_c_in_the_cascade_registry_evaluation_exits_130_and_reruns(tmp_path, tmp_path_factory):
    cdir = tmp_path / "cascade"
    cmd = launch_cmd("run.py", "--stage=cascade", f"--run-dir={cdir}", "--no-progress",
               *[f"--set={s}" for s in CHEAP_CASCADE])
    env = cli_env(tmp_path_factory, CASCADE_JAX_CACHE=str(cache_dir(tmp_path_factory)))
    _interrupt_registry_eval_then_resume(cmd, env, None, cdir)


@pytest.mark.integration
def test_ctrl_c_in_study_exits_130_and_reruns(tmp_path, tmp_path_factory):
    cmd = launch_cmd("study.py", f"--study-dir={tmp_path / 'study'}", "--no-progress",
               *[f"--cascade-set={s}" for s in CHEAP_CASCADE])
    env = cli_env(tmp_path_factory, CASCADE_JAX_CACHE=str(cache_dir(tmp_path_factory)))
    _interrupt_registry_eval_then_resume(cmd, env, tmp_path, tmp_path / "runs" / "cascade")


def test_a_child_gets_ctrl_c_even_when_the_suite_runs_as_a_background_job():
    """The cause of the Ctrl-C tests' hang in the full suite: run as ``pytest ... &`` from a
    script, pytest starts with SIGINT ignored and every command it execs inherits that (exec keeps
    an ignored signal ignored), so the child outlived its Ctrl-C. :class:`Child` starts the
    command as a terminal would, SIGINT at its default; a plain ``subprocess`` run shows the
    premise."""
    probe = [sys.executable, "-c", "import signal; h = signal.getsignal(signal.SIGINT); "
             "print('ignored' if h == signal.SIG_IGN else getattr(h, '__name__', h))"]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `pytest ... &`
    try:
        plain = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=cli_env())
        with Child(probe, cli_env()) as c:
            assert c.wait(60) == 0, c.text()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # this process: unchanged
    finally:
        signal.signal(signal.SIGINT, before)
    assert plain.stdout.strip() == "ignored", plain.stdout
    assert c.out == ["default_int_handler"], c.out


def test_stop_signals_keep_an_ignored_sigint_ignored():
    """A stage started with SIGINT ignored (a script's background job) ignores it in its steps
    as outside them; started normally, SIGINT in the steps asks for a stop."""
    from cascade_jax.runner.preempt import StopSignals

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with StopSignals(log=lambda m: None) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handler
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop.wait(0.2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with StopSignals(log=lambda m: None) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.wait(5) and stop.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------------------------
# Memory: a 30B stage on this machine is refused before anything compiles


def test_30b_stage_is_refused_for_memory_before_any_compile(tmp_path, tmp_path_factory):
    from cascade_jax import data
    from cascade_jax.runner.preflight import TRAIN_STATE_BYTES_PER_PARAM
    from models import nemotron_h as nh

    tok = tmp_path / "tok"
    data.save_tokenizer(data.tiny_tokenizer(), tok)
    src = _jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    cache = tmp_path / "xla_cache"
    cache.mkdir()
    run = tmp_path / "run"
    r = _run(tmp_path_factory, "run.py", "--stage=sft", f"--run-dir={run}", "--no-progress",
             '--set=data.sources=[{"path": "%s", "format": "jsonl"}]' % src,
             f"--set=data.tokenizer={tok}", "--set=data.seq_len=256", "--set=data.batch_rows=2",
             timeout=300, JAX_COMPILATION_CACHE_DIR=str(cache))
    line = _one_error(r, 2, "devices: stage sft needs at least", "have", "GiB")
    total, _ = nh.param_counts(nh.preset("nano-30b-a3b"))
    need = total * TRAIN_STATE_BYTES_PER_PARAM / 2 ** 30
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    assert need > have  # the premise: this machine cannot hold it
    m = re.search(r"needs at least ([\d,]+) GiB .* have ([\d,]+) GiB", line)
    assert m, line
    assert int(m.group(1).replace(",", "")) == round(need)
    assert int(m.group(2).replace(",", "")) == round(have)
    assert not run.exists()
    assert list(cache.iterdir()) == []  # nothing was compiled, let alone the 30B step


# --------------------------------------------------------------------------------------------
# Defaults and messages the issue named, checked in process


def test_checkpoints_are_on_by_default_in_every_stage():
    """Periodic checkpoints by steps and by wall time without any setting (1000 steps, 30 min),
    and every packaged stage keeps both on."""
    import configs
    from cascade_jax import config as C

    assert (C.Config().run.checkpoint_every, C.Config().run.checkpoint_every_s) == (1000, 1800.0)
    for name in configs.stage_names():
        run = C.load(str(configs.stage_path(name))).run
        assert run.checkpoint_every > 0 and 0 < run.checkpoint_every_s <= 1800, name


def test_exports_stop_at_the_chat_end_token_and_are_world_readable(tmp_path, tiny_cfg, tiny_params):
    import json as _json

    from cascade_jax import data
    from cascade_jax.runner.checkpoint import export_hub, export_model_config, publish_modes

    tok = data.tiny_tokenizer()
    end = tok.special_tokens["eos_token"]
    assert end == "<|im_end|>" and end in tok.chat_template and tok.eos_id == 4
    cfg = tiny_cfg()
    assert cfg.eos_token_id == 2  # the preset's </s>, which the chat template never emits
    out = export_hub(tiny_params(cfg), export_model_config(cfg, tok), tmp_path / "hub")
    publish_modes(out)
    assert _json.loads((out / "config.json").read_text())["eos_token_id"] == 4
    mask = os.umask(0)
    os.umask(mask)
    for p in out.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o644 & ~mask, p


def test_rl_temperature_zero_names_the_field_without_a_refused_switch():
    from cascade_jax import config as C
    from cascade_jax.runner import build as B
    from cascade_jax.runner.errors import ConfigError

    cfg = C.load(str(ROOT / "configs" / "tiny" / "multi_domain_rl.json"))
    cfg = C.replace_path(cfg, "rollout.sampling.temperature", 0.0)
    with pytest.raises(ConfigError, match=r"rollout.sampling.temperature: RL needs sampling") as e:
        B.validate(cfg)
    assert "greedy" not in str(e.value).replace("0 is greedy decoding", "")


def test_study_docstring_shows_only_flags_that_exist():
    from launch import study

    doc_flags = set(re.findall(r"(--[a-z][a-z-]+)", study.__doc__))
    src = (ROOT / "launch" / "study.py").read_text()
    real = set(re.findall(r'add_argument\("(--[a-z-]+)"', src))
    assert doc_flags and doc_flags <= real, doc_flags - real
