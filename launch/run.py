"""cascade-jax entry point: run one stage (or the demo) from a config.

    python launch/run.py                                    # no arguments: the tiny demo
    python launch/run.py --stage=tiny/sft --run-dir runs/sft
    python launch/run.py --stage=tiny/multi_domain_rl --init runs/sft --run-dir runs/mdrl
    python launch/run.py --stage=mopd --set optimizer.lr=3e-6 --print-config
    python launch/run.py --config my.json --set stage.steps=40 --fresh
    python launch/run.py --stage=cascade [--preset tiny|nano-30b-a3b] [--run-dir runs/cascade]
    python launch/run.py --stage=mopd [--teachers-from CASCADE_DIR] [--teachers paper|best|d=stage,..]

``--stage=cascade`` runs every stage of the cascade in the paper's order (``cascade_jax.cascade``),
one run dir per stage under the cascade dir, with ``teachers.json`` and ``report.md``; rerunning
resumes. ``--stage=mopd`` is the 30B MOPD stage as configured (``configs/mopd.json``): it checks
its teachers, data and devices first and names whatever is missing, before anything large is
built; with ``--teachers-from`` a finished cascade dir supplies its start and teachers (in the
preset that cascade ran with). ``--stage=tiny/mopd`` is the tiny bootstrap: the earlier tiny
stages run first (into ``runs/cascade``), or ``--teachers-from`` a tiny cascade (with
``--set stage.teachers=...`` it is a plain stage config). ``--set`` applies to every stage;
``--preset`` picks the stage configs of ``--stage=cascade`` (``tiny``, the default, or the 30B).

``--stage NAME`` loads the packaged ``configs/NAME.json`` (``tiny/NAME`` for the toy-scale
variants); ``--config PATH`` any JSON config. Then, in order: ``--preset`` sets ``model.preset``
(and drops ``model.checkpoint``), ``--init`` sets ``model.checkpoint`` (a Hub checkpoint, or a
run dir whose final export ``hub/`` is used), ``--run-dir`` sets ``run.out_dir``, and every
``--set a.b=v`` overrides one field (validated; unknown keys are errors naming the key).

Rerunning the same command resumes from the run dir's newest complete checkpoint; a run dir
holding a different config is refused unless ``--fresh`` (which removes that run's artefacts
and nothing else; an ``--init`` or teacher inside them is refused first). A run dir whose run
stopped before its first checkpoint is simply started over.

Checkpoints are written every ``run.checkpoint_every`` steps and every ``run.checkpoint_every_s``
seconds (defaults 1000 steps, 30 minutes). SIGTERM (a pod preemption) or Ctrl-C during the steps
finishes the step, writes a checkpoint and exits 75; rerunning the same command resumes it bit
for bit. Interrupted anywhere else (build, compile, evaluation) it exits 130, having written
nothing half-done. Without a terminal, a progress line (step, rate, ETA) is printed at least
every 30 seconds.

Errors print one line ``error: ...`` and exit with a distinct code: 2 config, 3 missing or
unreadable file or data, 4 run dir holds another run, 5 checkpoint, 6 rollout server, 7 cannot
write (disk full), 1 other (its traceback goes to ``<run dir>/error.log``). Nothing is written
before validation passes (data included: the first batch is drawn before the run dir is made).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import NoReturn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:  # `python launch/run.py` from a checkout
    sys.path.insert(0, str(ROOT))

from cascade_jax import config as C  # noqa: E402
from cascade_jax.runner import errors as E  # noqa: E402

DEFAULT_STAGE = "demo"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", help="stage name: the packaged configs/<stage>.json (e.g. tiny/sft)")
    ap.add_argument("--config", help="path of a JSON config (instead of --stage)")
    ap.add_argument("--preset", help="model preset (tiny, nano-30b-a3b); drops model.checkpoint")
    ap.add_argument("--init", help="initial weights: a Hub checkpoint dir or a finished run dir")
    ap.add_argument("--run-dir", help="run directory (default: run.out_dir of the config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set optimizer.lr=2e-6 (repeatable)")
    ap.add_argument("--fresh", action="store_true", help="replace whatever run the run dir holds")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--teachers", default="paper",
                    help="cascade/mopd: MOPD teachers: paper, best, or domain=stage,... (default paper)")
    ap.add_argument("--teachers-from", help="mopd: a finished cascade dir supplying start and teachers")
    dry = ap.add_argument_group("dry run (cascade_jax/sharding/dryrun.py; docs/sharding.md)")
    dry.add_argument("--dry-run", action="store_true",
                     help="compile every accelerator program of the stage for its target pod on simulated "
                          "CPU devices (no weights, nothing written); exit 1 naming what does not fit")
    dry.add_argument("--devices", type=int, help="dry run: device count (default target.devices)")
    dry.add_argument("--device-memory-gib", type=float, help="dry run: memory per device (default "
                     "target.device_memory_gib)")
    dry.add_argument("--platform", help="dry run: gpu or tpu (default target.platform)")
    dry.add_argument("--json", action="store_true", help="dry run: print one JSON object")
    return ap.parse_args(argv)


def _dry_run(args, argv) -> int:
    """``--dry-run``: simulate the target's device count (re-executing this command in a fresh
    process if jax already started with fewer devices), then compile and report."""
    import subprocess

    from cascade_jax.sharding import dryrun

    cfg = resolve_config(args)
    try:
        n = dryrun.simulated_device_count(cfg, args.devices)
        if not dryrun.use_simulated_devices(n):
            env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(n))
            return subprocess.call([sys.executable, str(pathlib.Path(__file__).resolve()), *argv], env=env)
        return dryrun.command(cfg, devices=args.devices, device_memory_gib=args.device_memory_gib,
                              platform=args.platform, as_json=args.json,
                              log=lambda m: print(m, file=sys.stderr))
    except dryrun.DryRunError as e:
        raise E.ConfigError(str(e)) from None


def resolve_config(args) -> C.Config:
    """The run config of the command line (raises ``RunError`` subclasses on bad input)."""
    import configs

    if args.stage and args.config:
        raise E.ConfigError("pass either --stage or --config, not both")
    try:
        if args.config:
            cfg = C.load(args.config)
        else:
            try:
                path = configs.stage_path(args.stage or DEFAULT_STAGE)
            except KeyError as e:
                raise E.ConfigError(e.args[0]) from None
            cfg = C.load(str(path))
        if args.preset:
            cfg = C.replace_path(cfg, "model.preset", args.preset)
            cfg = C.replace_path(cfg, "model.checkpoint", None)
        if args.init:
            from cascade_jax.runner.build import resolve_init

            cfg = C.replace_path(cfg, "model.checkpoint", resolve_init(args.init))
        if args.run_dir:
            cfg = C.replace_path(cfg, "run.out_dir", args.run_dir)
        cfg = C.apply_overrides(cfg, args.overrides)
    except C.ConfigError as e:
        raise E.ConfigError(str(e)) from None
    except FileNotFoundError as e:
        raise E.InputFileError(f"--config {e.filename}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise E.InputFileError(f"--config {args.config}: cannot read ({e})") from None
    return cfg


def run_demo(cfg: C.Config, out_dir: pathlib.Path) -> dict:
    """Build the model (tiny preset or a Hub checkpoint), export it as a Hub checkpoint, reload
    it, generate with the rollout engine of ``cfg.rollout`` (prefill + continuous-batching
    decode; ``data.batch_prompts`` random prompts of varied lengths, ``rollout.sampling.n_samples`` each,
    no stop token) and report tokens/s of the second, compiled, call."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from models import nemotron_h as nh
    from cascade_jax.rollout import Request, factory
    from cascade_jax.runner.build import build_model

    mcfg, params = build_model(cfg)
    total, active = nh.param_counts(mcfg)
    print(f"model: pattern={mcfg.pattern} params={total:,} active/token={active:,}")
    ckpt = out_dir / "checkpoint"
    nh.save_checkpoint(params, mcfg, str(ckpt))
    mcfg, params = nh.load_checkpoint(str(ckpt), dtype=jnp.dtype(cfg.model.dtype))
    print(f"exported and reloaded Hub-layout checkpoint: {ckpt}")

    r = cfg.rollout.sampling
    rng = np.random.default_rng(cfg.run.seed)
    lengths = np.arange(cfg.data.batch_prompts) % r.max_prompt_len // 2 + r.max_prompt_len // 2 + 1
    requests = [Request(prompt_ids=tuple(rng.integers(3, mcfg.vocab_size, int(n)).tolist()),
                        sampling=factory.sampling_params(r, seed=cfg.run.seed + 1 + i))
                for i, n in enumerate(lengths)]
    engine = factory.make_engine(cfg.rollout, model_cfg=mcfg, params=params)
    t0 = time.perf_counter()
    engine.generate(requests)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = engine.generate(requests).samples()
    gen_s = time.perf_counter() - t0
    n_tok = sum(len(s.response_ids) for s in samples)
    for s in samples[:3]:
        print(f"  response: {s.response_ids[:12].tolist()} ...")
    return {
        "stage": cfg.stage.name, "sequences": len(samples), "new_tokens": n_tok,
        "first_call_s": round(compile_s, 3), "generate_s": round(gen_s, 4),
        "decode_tokens_per_s": round(n_tok / gen_s, 1),
        "mean_rollout_logp": float(np.concatenate([s.logprobs for s in samples]).mean()),
        "backend": jax.default_backend(),
    }


def _cascade_route(args):
    """``(command stage, preset)`` when the command line asks for the cascade driver, else
    ``None``: ``--stage=cascade``; ``--stage=tiny/mopd`` with no teachers set (the tiny
    bootstrap: the cascade's stages up to MOPD, or ``--teachers-from`` a cascade); and
    ``--stage=mopd --teachers-from DIR`` (the preset that cascade was run with). Plain
    ``--stage=mopd`` is the 30B MOPD stage as configured (``configs/mopd.json``)."""
    if args.config:
        return None
    if args.stage == "cascade":
        return "cascade", args.preset
    if args.stage == "tiny/mopd" and not any(o.split("=", 1)[0].strip().startswith("stage.teachers")
                                             for o in args.overrides):
        return "mopd", args.preset or "tiny"
    if args.stage == "mopd" and args.teachers_from:
        from cascade_jax.cascade import plan as P

        return "mopd", args.preset or P.load_state(args.teachers_from).get("preset", "nano-30b-a3b")
    return None


def _print_cascade_config(args) -> int:
    """``--stage=cascade --print-config``: every stage's resolved config, by stage name."""
    from cascade_jax.cascade import plan as P

    preset = args.preset or "tiny"
    cdir = pathlib.Path(args.run_dir or "runs/cascade")
    try:
        out = {n: C.to_dict(P.stage_config(n, preset=preset, cascade_dir=cdir,
                                           overrides=args.overrides))
               for n in P.STAGE_NAMES}
    except C.ConfigError as e:
        raise E.ConfigError(str(e)) from None
    print(json.dumps(out, indent=2))
    return 0


def _main(args, argv=()) -> int:
    if args.dry_run:
        return _dry_run(args, argv)
    route = _cascade_route(args)
    if route is None and (args.teachers_from or args.teachers != "paper"):
        raise E.ConfigError(f"--teachers / --teachers-from apply to --stage=cascade, --stage=mopd "
                            f"and --stage=tiny/mopd only, not --stage={args.stage or args.config}")
    if args.stage == "cascade" and args.print_config and not args.config:
        return _print_cascade_config(args)
    if route is not None and not args.print_config:
        from cascade_jax.cascade.driver import command

        if args.fresh:
            raise E.ConfigError(f"--fresh does not apply to --stage={args.stage}; use a new --run-dir")
        stage, preset = route
        out = command(stage, run_dir=args.run_dir, preset=preset, init=args.init,
                      overrides=args.overrides, teachers=args.teachers,
                      teachers_from=args.teachers_from, argv=[sys.executable, *sys.argv],
                      progress=not args.no_progress and sys.stderr.isatty())
        print(json.dumps(out))
        return 0
    cfg = resolve_config(args)
    if args.print_config:  # the resolved config; paths in it are not checked
        print(C.to_json(cfg))
        return 0
    from cascade_jax.runner.build import validate
    from cascade_jax.runner.loop import check_run_dir

    run_dir = pathlib.Path(cfg.run.out_dir)
    if cfg.stage.objective != "demo":  # an --init inside the run dir: refused before all else
        check_run_dir(cfg, run_dir, fresh=args.fresh)
    validate(cfg)
    if cfg.stage.objective != "demo":
        from cascade_jax.runner.preflight import check_inputs

        check_inputs(cfg)  # every missing teacher / data / tokenizer path, named at once
    if cfg.stage.objective == "demo":
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_config.json").write_text(C.to_json(cfg) + "\n")
        report = run_demo(cfg, run_dir)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        return 0
    from cascade_jax.runner import run_stage

    argv = [sys.executable, *sys.argv]
    summary = run_stage(cfg, run_dir, fresh=args.fresh, argv=argv,
                        progress=not args.no_progress and sys.stderr.isatty())
    print(json.dumps(summary))
    return 0


def _interrupt(signum, frame):
    """SIGTERM outside a stage's steps: stop like Ctrl-C (the steps install their own handler,
    which checkpoints first)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _exit(code: int) -> "NoReturn":
    """Exit now with ``code`` once the output is flushed. After an interrupt, threads of XLA,
    orbax or the scorers may still run; the interpreter's normal teardown would destroy them
    while running (``terminate called without an active exception``, exit 134), so the process
    ends without it. Everything that must be on disk is written or abandoned by then. A
    multi-process job leaves ``jax.distributed`` first (all processes stop together after a
    preemption; process 0 hosts the coordination service, whose loss would abort the others)."""
    sys.stdout.flush()
    sys.stderr.flush()
    from cascade_jax.sharding.distributed import leave_distributed

    leave_distributed()
    os._exit(code)


class _Quiet:
    """Background-thread noise of a failing write, kept off the terminal: orbax's error log
    records (the ``absl`` logger) are held and written to ``<run dir>/error.log`` with the
    traceback, and tensorstore's late callbacks into a closed event loop (one traceback per
    array, hundreds for a full disk) are dropped -- the error surfaces once, as one
    ``error:`` line."""

    def __init__(self):
        import logging

        self.records: list = []
        outer = self

        class _Keep(logging.Handler):
            def emit(self, record):
                outer.records.append(self.format(record))

        self._logger = logging.getLogger("absl")
        self._handler = _Keep(level=logging.ERROR)
        self._handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        self._hook = sys.excepthook
        sys.excepthook = self._excepthook

    def _excepthook(self, tp, value, tb):
        if tp is RuntimeError and "Event loop is closed" in str(value):
            return
        self._hook(tp, value, tb)

    def text(self) -> str:
        return "".join(r + "\n" for r in self.records)


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    quiet = _Quiet()
    # a compilation-cache entry that cannot be written (a full disk) only costs a recompile
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    try:
        return _main(args, list(sys.argv[1:] if argv is None else argv))
    except E.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return E.ConfigError.exit_code
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'}): nothing was left half-written; rerun the same "
              f"command to continue", file=sys.stderr)
        return E.INTERRUPTED_EXIT
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: one line + the traceback on disk
        full = E.disk_error(e)
        if full is not None:
            print(f"error: {full}", file=sys.stderr)
            return full.exit_code
        where = pathlib.Path(args.run_dir) if args.run_dir else None
        msg = f"error: internal: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if where is not None and where.is_dir():
            (where / "error.log").write_text(quiet.text() + traceback.format_exc())
            msg += f" (traceback in {where / 'error.log'})"
        else:
            msg += " (set CASCADE_TRACEBACK=1 to see the traceback)"
            if os.environ.get("CASCADE_TRACEBACK"):
                traceback.print_exc()
        print(msg, file=sys.stderr)
        return 1


if __name__ == "__main__":
    code = main()
    if code in (E.INTERRUPTED_EXIT, E.Preempted.exit_code, E.OutputError.exit_code):
        _exit(code)
    sys.exit(code)
