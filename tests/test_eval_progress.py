"""``launch/eval.py`` talks while it works: per-sample progress of the generation.

* in process: :func:`cascade_jax.runner.evaluate.evaluate` with ``progress`` on an engine of
  2 slots for 3 prompts x 2 samples hears every finished sample (0, ..., 6, strictly
  increasing, at least 3 distinct counts) and returns exactly what ``engine.generate`` gives;
* as a command without a terminal (``CASCADE_PROGRESS_S=0.05`` for the default 30 s):
  ``[eval] <phase> (...)`` lines while loading and compiling, and the count with its rate and
  ETA, ending at ``sample 8/8 (100%)``;
* Ctrl-C in the middle of the generation: exit 130, one line, no ``terminate called``; the
  same command then runs to the end."""

import json
import pathlib
import re
import signal
import subprocess
import time

from tests.runner_support import Child, cli_env, launch_cmd


def _tiny_hub(d: pathlib.Path, tiny_cfg, tiny_params) -> pathlib.Path:
    from cascade_jax import data
    from models import nemotron_h as nh

    cfg = tiny_cfg()
    nh.save_checkpoint(tiny_params(cfg), cfg, str(d))
    data.save_tokenizer(data.tiny_tokenizer(), d)
    return d


def test_evaluate_counts_every_sample_and_changes_nothing(tiny_cfg, tiny_params):
    from cascade_jax import config as C
    from cascade_jax import data
    from cascade_jax.rewards import make_scorer
    from cascade_jax.rollout import JaxEngine
    from cascade_jax.runner import evaluate as E

    cfg = tiny_cfg()
    params = tiny_params(cfg)
    tok = data.tiny_tokenizer()
    config = C.from_dict(C.Config, {"data": {"domains": ["math"]}, "eval": {"prompts": 3, "k": 2},
                                    "rollout": {"sampling": {"max_prompt_len": 64, "max_response_len": 12}}})
    prompts = E.heldout_prompts(config, tok, ["math"])
    assert len(prompts) == 3
    kw = dict(k=2, max_new_tokens=12, temperature=1.0, seed=5)
    seen = []
    got = E.evaluate(JaxEngine(cfg, params, num_slots=2, max_len=76), tok, prompts,
                     {"math": make_scorer("math")}, progress=lambda d, t: seen.append((d, t)), **kw)
    want = E.evaluate(JaxEngine(cfg, params, num_slots=2, max_len=76), tok, prompts,
                      {"math": make_scorer("math")}, **kw)
    assert got == want
    assert {t for _, t in seen} == {6}
    counts = [d for d, _ in seen]
    assert counts[0] == 0 and counts[-1] == 6 and len(counts) >= 3
    assert all(a < b for a, b in zip(counts, counts[1:])), counts


def test_eval_command_prints_sample_progress_with_rate_and_eta(tmp_path, tmp_path_factory,
                                                               tiny_cfg, tiny_params):
    hub = _tiny_hub(tmp_path / "hub", tiny_cfg, tiny_params)
    r = subprocess.run(launch_cmd("eval.py", f"--checkpoint={hub}", "--domains", "math",
                                  "--prompts=4", "--k=2", "--max-new-tokens=8"),
                       capture_output=True, text=True, timeout=300,
                       env=cli_env(tmp_path_factory, CASCADE_PROGRESS_S="0.05"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["domains"]["math"]["n_prompts"] == 4
    lines = [l for l in r.stderr.splitlines() if l.startswith("[eval] ")]
    assert any(re.match(r"\[eval\] (loading the checkpoint|generating 4 prompts x 2 samples).* so far\)$", l)
               for l in lines), lines[:5]
    counted = [l for l in lines if l.startswith("[eval] sample ")]
    done = [int(re.match(r"\[eval\] sample (\d+)/8 \(\d+%\)", l).group(1)) for l in counted]
    assert done == sorted(done) and done[-1] == 8, counted
    last = counted[-1]
    assert last.startswith("[eval] sample 8/8 (100%), ") and "ETA 0s" in last, last
    assert re.search(r", [\d.]+ (samples/s|s/sample), ", last), last


def test_ctrl_c_in_the_evaluation_exits_130_and_the_command_reruns(tmp_path, tmp_path_factory,
                                                                   tiny_cfg, tiny_params):
    hub = _tiny_hub(tmp_path / "hub", tiny_cfg, tiny_params)
    cmd = launch_cmd("eval.py", f"--checkpoint={hub}", "--domains", "math", "--prompts=4", "--k=2",
                     "--max-new-tokens=8")
    with Child(cmd, cli_env(tmp_path_factory, CASCADE_FAULT="hold@eval")) as p:
        p.wait_for("[eval] holding in the generation", timeout=300)
        code = p.signal_and_wait(signal.SIGINT, timeout=120)
    assert code == 130, (code, p.text())
    others = [l for l in p.lines if l.strip() and not l.startswith("[eval] ")]
    assert others == ["interrupted (SIGINT): nothing was written"], p.text()
    assert p.out == []
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(tmp_path_factory))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["domains"]["math"]["n_prompts"] == 4


def test_progress_announces_each_phase_before_the_first_unit_and_never_prints_exponents():
    """Without a terminal a phase shorter than the beat still gets its line (announced when it
    starts, before the first counted unit; later phase changes wait for the beat), and a rate
    of thousands per second is printed in digits (the eval lines' format)."""
    from cascade_jax.runner.metrics import Progress, _rate

    assert [_rate(x) for x in (2500.0, 1234.5, 12.345, 0.5)] == ["2500", "1234", "12.3", "0.5"]
    lines = []
    bar = Progress(0, desc="eval", enabled=False, log=lines.append, every_s=60.0, unit="sample")
    bar.set_phase("loading the checkpoint")
    bar.set_phase("generating 4 prompts x 2 samples")
    bar.count(0, 8)
    bar.set_phase("scoring")  # after the first unit: the beat reports it, no extra line
    bar.count(8, 8)
    bar._t_steps = time.monotonic() - 8 / 5000.0  # as if 8 samples took 1.6 ms
    last = bar.line()
    bar.close()
    assert lines == ["[eval] loading the checkpoint (0s so far)",
                     "[eval] generating 4 prompts x 2 samples (0s so far)"], lines
    assert re.match(r"\[eval\] sample 8/8 \(100%\), \d+ samples/s, ETA 0s; scoring$", last), last
