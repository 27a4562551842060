"""Evaluate a checkpoint: avg@k and pass@k per domain, as JSON and a table.

    python launch/eval.py --checkpoint runs/sft                 # a run dir (its final hub/)
    python launch/eval.py --checkpoint runs/sft/hub --domains math mcq --k 8 --prompts 64
    python launch/eval.py --checkpoint DIR --temperature 0.6 --top-p 0.95 --max-new-tokens 256

``--checkpoint`` is a Hub checkpoint or a run dir; for a run dir the defaults (domains, eval
and rollout settings) come from its ``run_config.json`` (or from ``--config``) and the result is also written to
``<run dir>/eval/<name>.json``. Prompts: ``--prompts`` per domain from the data pipeline with
``data.shuffle_seed = --seed`` (held out from training for the tiny domains). The runner's
periodic evaluation calls the same code (``cascade_jax.runner.evaluate``). ``--max-new-tokens``
must fit the model's context with the prompts; ``--name`` is a plain file name; both are
checked before the evaluation. A progress line is printed every 30 seconds (``CASCADE_PROGRESS_S``):
the phase while loading and compiling, then samples generated of all, rate and ETA::

    [eval] sample 96/384 (25%), 3.2 samples/s, ETA 1m30s

Errors: one line,
exit codes as ``launch/run.py`` (130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
if (ROOT / "cascade_jax").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cascade_jax import config as C  # noqa: E402
from cascade_jax.runner import errors as E  # noqa: E402

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Hub checkpoint dir or run dir")
    ap.add_argument("--config", help="take domains, data, rollout and eval settings from this run config")
    ap.add_argument("--domains", nargs="+", help="domains (default: the run's, else all tiny domains)")
    ap.add_argument("--k", type=int, help="samples per prompt (avg@k, pass@k)")
    ap.add_argument("--prompts", type=int, help="prompts per domain")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--greedy", action="store_true", help="argmax decoding")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--thinking", choices=("on", "off"), help="thinking-mode prompts")
    ap.add_argument("--name", default="eval", help="file name under <run dir>/eval/")
    return ap.parse_args(argv)


def resolve(args) -> tuple[C.Config, pathlib.Path | None]:
    from cascade_jax import domains as D
    from cascade_jax.runner.build import resolve_init

    src = pathlib.Path(args.checkpoint)
    hub = resolve_init(args.checkpoint, "--checkpoint")
    run_dir = src if (src / "run_config.json").is_file() else None
    if args.config:
        try:
            cfg = C.load(args.config)
        except C.ConfigError as e:
            raise E.ConfigError(str(e)) from None
        except OSError as e:
            raise E.InputFileError(f"--config {args.config}: cannot read ({e})") from None
    elif run_dir is not None:
        try:
            cfg = C.from_dict(C.Config, C.migrate_dict(json.loads((run_dir / "run_config.json").read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise E.InputFileError(f"{run_dir}/run_config.json: cannot read ({e})") from None
    else:
        cfg = C.Config(rollout=C.RolloutConfig(sampling=C.SamplingSection(max_prompt_len=128, max_response_len=48)),
                       data=C.DataConfig(domains=tuple(D.DOMAINS)))
    sets = [("model.checkpoint", hub), ("model.preset", cfg.model.preset)]
    if args.domains:
        sets.append(("data.domains", list(args.domains)))
    if not cfg.data.domains:
        sets.append(("data.domains", list(D.DOMAINS)))
    for flag, key in (("k", "eval.k"), ("prompts", "eval.prompts"), ("temperature", "eval.temperature"),
                      ("top_p", "eval.top_p"), ("top_k", "eval.top_k"), ("seed", "eval.seed"),
                      ("max_new_tokens", "eval.max_response_len")):
        if getattr(args, flag) is not None:
            sets.append((key, getattr(args, flag)))
    if args.greedy:
        sets += [("eval.temperature", 0.0)]
    if args.thinking:
        sets.append(("rollout.sampling.thinking", args.thinking == "on"))
    # one validation pass over the final values (a single field may be invalid on its own)
    d = C.to_dict(cfg)
    for key, v in sets:
        sec, _, name = key.partition(".")
        d[sec][name] = v
    try:
        cfg = C.from_dict(C.Config, d)
    except C.ConfigError as e:
        raise E.ConfigError(str(e)) from None
    return cfg, run_dir


def check_name(name: str) -> str:
    """``--name``: a plain file name (letters, digits, ``.``, ``_``, ``-``; no path)."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise E.ConfigError(f"--name {name!r}: expected a plain file name (letters, digits, '.', "
                            f"'_', '-'), written as <run dir>/eval/<name>.json")
    return name


def _interrupt(signum, frame):
    """SIGTERM stops the evaluation like Ctrl-C."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _hold_hook(count):
    """``count`` -- and, as a test hook with ``CASCADE_FAULT=hold@eval``, a wait of at most
    300 s after the first finished sample, announced on stderr, so a test can interrupt the
    generation there."""
    import time

    hold = os.environ.get("CASCADE_FAULT") == "hold@eval"

    def progress(done: int, total: int) -> None:
        nonlocal hold
        count(done, total)
        if hold and done > 0:
            hold = False
            print(f"[eval] holding in the generation ({done}/{total} samples)", file=sys.stderr,
                  flush=True)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 300:
                time.sleep(0.05)

    return progress


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    bar = None
    try:
        check_name(args.name)
        cfg, run_dir = resolve(args)
        from cascade_jax.runner.build import model_config
        from cascade_jax.runner.evaluate import check_lengths, evaluate_checkpoint, format_table
        from cascade_jax.runner.metrics import Progress

        check_lengths(cfg, model_config(cfg), flag="--max-new-tokens")
        bar = Progress(0, desc="eval", enabled=False, unit="sample")
        res = evaluate_checkpoint(cfg, phase=bar.set_phase, progress=_hold_hook(bar.count))
        bar.close()
        print(bar.line(), file=sys.stderr)  # the last count, whatever the beat
    except E.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return E.ConfigError.exit_code
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'}): nothing was written", file=sys.stderr)
        return E.INTERRUPTED_EXIT
    finally:
        if bar is not None:
            bar.close()
    print(format_table(res["domains"]), file=sys.stderr)
    if run_dir is not None:
        out = run_dir / "eval" / f"{args.name}.json"
        try:
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(res, indent=2) + "\n")
        except OSError as e:
            full = E.disk_error(e) or E.OutputError(f"cannot write {out}: {e.strerror or e}")
            print(json.dumps(res))  # the result is not lost
            print(f"error: {full}", file=sys.stderr)
            return full.exit_code
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    code = main()
    if code == E.INTERRUPTED_EXIT:  # threads of XLA / the scorers may still run: no teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
