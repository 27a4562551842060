"""The MOPD-vs-GRPO study: from one cascade checkpoint, MOPD against continuing GRPO for matched
steps over >= 3 seeds, judged against claims declared in the study config before anything runs.

    python launch/study.py                                   # tiny: launch/studies/mopd_vs_grpo.json
    python launch/study.py --cascade-dir runs/cascade --study-dir runs/study
    python launch/study.py --cascade-set stage.steps=20      # overrides if the cascade must run first

Flags: ``--config`` (the study: claims, start stage, steps, seeds; the steps of the runs are set
there), ``--cascade-dir``, ``--study-dir``, ``--preset``, ``--cascade-set KEY=VALUE``
(repeatable), ``--seeds S,S,S`` (the same claims on another seed set: a replication, in its
own study dir), ``--no-progress``. If the cascade dir has not finished the study's start stage,
the cascade runs up to it first -- in the default ``runs/cascade``, or in a ``--cascade-dir``
that holds a cascade (``cascade_state.json``); a ``--cascade-dir`` that does not is an error
(a mistyped path would otherwise start a whole new cascade).
Writes ``<study-dir>/claims.json`` (before the runs), one run dir per method and seed,
``study_result.json`` (curves, teacher scores, verdicts, regressions) and ``report.md`` with
``mopd_vs_grpo.png``; prints one verdict line per claim. Rerunning resumes. Errors: one line ``error: ...`` (exit 2;
run errors with ``launch/run.py``'s codes); Ctrl-C / SIGTERM stop the current run with a
checkpoint (exit 75) or, outside a run's steps, at once (exit 130).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _interrupt(signum, frame):
    """SIGTERM outside a run's steps stops like Ctrl-C."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "launch" / "studies" / "mopd_vs_grpo.json"),
                    help="study config (claims, start stage, steps, seeds)")
    ap.add_argument("--cascade-dir", default="runs/cascade", help="cascade dir holding the start checkpoint and teachers")
    ap.add_argument("--study-dir", default="runs/study")
    ap.add_argument("--preset", default="tiny", help="cascade preset (tiny, nano-30b-a3b)")
    ap.add_argument("--cascade-set", dest="cascade_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="overrides for the cascade stages, if the cascade must run first")
    ap.add_argument("--seeds", default=None, metavar="S,S,S",
                    help="run the declared claims on these seeds (>= 3) instead of the study's own: "
                         "a replication on another seed set, in its own --study-dir")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from cascade_jax import config as C
    from cascade_jax.cascade import plan as P
    from cascade_jax.cascade import registry as R
    from cascade_jax.cascade import study as S
    from cascade_jax.cascade.driver import enable_compilation_cache, run_cascade
    from cascade_jax.runner import errors as E

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    explicit = any(a == "--cascade-dir" or a.startswith("--cascade-dir=")
                   for a in (sys.argv[1:] if argv is None else argv))
    try:
        if explicit and not (pathlib.Path(args.cascade_dir) / P.STATE_FILE).is_file():
            raise S.StudyError(f"--cascade-dir {args.cascade_dir}: no cascade there (no "
                               f"{P.STATE_FILE}); pass the dir a cascade ran in, or leave the "
                               f"flag out to run one in runs/cascade")
        spec = S.load_spec(args.config)
        seeds = None
        if args.seeds is not None:
            try:
                seeds = [int(x) for x in args.seeds.split(",")]
            except ValueError:
                raise S.StudyError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        enable_compilation_cache()
        S.declare(args.study_dir, spec, seeds)  # before any training
        state = P.load_state(args.cascade_dir)["stages"]
        if state.get(spec.start, {}).get("status") != "done":
            upto = list(P.STAGE_NAMES[:P.STAGE_NAMES.index(spec.start) + 1])
            run_cascade(args.cascade_dir, preset=args.preset, overrides=args.cascade_overrides,
                        stages=upto, progress=not args.no_progress)
        res = S.run_study(args.study_dir, spec, cascade_dir=args.cascade_dir, preset=args.preset,
                          progress=not args.no_progress, seeds=seeds)
    except (S.StudyError, R.RegistryError, C.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except E.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'}); rerun the same command to continue", file=sys.stderr)
        return E.INTERRUPTED_EXIT
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename == args.config:
            print(f"error: --config {args.config}: no such file", file=sys.stderr)
            return 3
        full = E.disk_error(e)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return full.exit_code
    for v in res["verdicts"]:
        print(f"{'HELD' if v['held'] else 'NOT HELD'}  {v['claim']}: {v['numbers']}")
    print(f"report: {pathlib.Path(args.study_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    code = main()
    if code in (130, 75, 7):  # threads of XLA / orbax / the scorers may still run: no teardown
        sys.stdout.flush()
        sys.stderr.flush()
        from cascade_jax.sharding.distributed import leave_distributed

        leave_distributed()
        os._exit(code)
    sys.exit(code)
