"""The stage loop: ``run_stage(config, run_dir) -> summary`` for objectives ``sft``, ``grpo``
and ``mopd``.

One step (strictly on-policy for RL: one optimiser update per rollout batch)::

    sft :  batch = next(sft_data)                                      # packed SFTBatch
    grpo:  prompts = next(prompt_data) → rollouts = engine.generate(prompts, n per prompt)
           → rewards = scorer[domain](prompt, response, metadata)      # worker pools
           → (dynamic filtering: draw more prompts until batch_prompts groups have reward
              variance, at most ``data.oversample`` × batch_prompts prompts per step)
           → RLBatch (+ policy version) → step
    mopd:  as grpo, plus teacher log-probs of every response from its domain's teacher
    then:  state, metrics = train_step(state, batch)  → engine.update_weights(new params)
           → periodic eval (avg@k / pass@k per domain, ``evaluate.py``) → metrics → checkpoint

``rollout.max_policy_lag: 1`` (served engines) draws the rollouts of step t+1 while step t
trains (:mod:`cascade_jax.runner.lag`; the pending batch is kept with each checkpoint in
``pending/``).

Run dir: ``run_config.json`` (resolved config), ``provenance.json``, ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` (orbax), ``hub/`` (final Hub export with tokenizer),
``exports/step_<n>/`` (periodic exports), ``eval/step_<n>.json``, ``summary.json``.

Checkpoints: every ``run.checkpoint_every`` steps, whenever ``run.checkpoint_every_s`` seconds
have passed since the last one, and at the end. SIGTERM (a pod's preemption notice) or SIGINT
(Ctrl-C) lets the step in flight finish, checkpoints it and raises ``Preempted`` (exit code 75);
on several hosts the processes agree on the step first (:mod:`cascade_jax.runner.preempt`).

Resume: rerunning with the same config and run dir continues from the newest loadable
checkpoint (params, optimiser state, data-iterator state, RNG, step); because every source of
randomness is a function of (seed, step) and the restored state, the final parameters equal an
uninterrupted run's bit for bit. A different config in the run dir is refused unless ``fresh``
(checkpoint cadence and logging may differ); a run dir whose run never wrote a checkpoint is
started over. ``fresh`` removes only the run artefacts (``RUN_ARTIFACTS``), and an input of the
run (``--init``, teachers, tokenizer, data) inside them is refused before anything is removed.
Only process 0 writes files (orbax coordinates its own multi-process writes).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import jax

from cascade_jax import config as C
from cascade_jax.runner import build as B
from cascade_jax.runner import lag as L
from cascade_jax.runner import provenance
from cascade_jax.runner.checkpoint import Checkpointer
from cascade_jax.data.rows import DataError
from cascade_jax.runner.errors import InputFileError, Preempted, RunDirError
from cascade_jax.runner.faults import fault_point
from cascade_jax.runner.metrics import MetricsWriter, PhaseTimer, Progress
from cascade_jax.runner.preempt import StopSignals, hold_point
from cascade_jax.runner.preflight import check_inputs
from cascade_jax.runner.stage import Stage

__all__ = ["run_stage", "check_run_dir", "started", "RUN_ARTIFACTS", "BOOKKEEPING_KEYS",
           "fault_point"]


#: What a run writes into its run dir (``fresh`` removes exactly these).
RUN_ARTIFACTS = ("run_config.json", "provenance.json", "metrics.jsonl", "tensorboard",
                 "checkpoints", "checkpoints.corrupt", "hub", "exports", "eval", "summary.json",
                 "profile", "weights", "error.log", L.PENDING_DIR)


#: Config keys that do not change what a run computes: a run dir resumes under other values.
BOOKKEEPING_KEYS = ("run.log_every", "run.checkpoint_every", "run.checkpoint_every_s",
                    "run.keep_last", "run.keep_best", "run.async_checkpoint", "run.profile_steps")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix[:-1]]


def _inputs(config: C.Config) -> list[tuple[str, str]]:
    """``(what, path)`` of everything the stage reads from disk that a run dir could hold."""
    out = [("--init (model.checkpoint)", config.model.checkpoint),
           ("data.tokenizer", config.data.tokenizer)]
    out += [(f"stage.teachers.{d}", p) for d, p in sorted(config.stage.teachers.items())]
    out += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(config.data.sources)]
    return [(w, p) for w, p in out if p]


def _artifact_of(path: str, run_dir: pathlib.Path) -> Optional[str]:
    """The run artefact of ``run_dir`` that ``path`` is (or lies in), else ``None``."""
    try:
        rel = pathlib.Path(path).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return None
    if not rel.parts:
        return "."
    return rel.parts[0] if rel.parts[0] in RUN_ARTIFACTS else None


def started(run_dir: pathlib.Path) -> bool:
    """Whether ``run_dir`` holds results worth keeping: a complete checkpoint or a final
    export. A run dir without either (its run stopped before its first checkpoint) holds
    nothing a rerun could resume, so a corrected command may replace it."""
    ck = run_dir / "checkpoints"
    has_ckpt = ck.is_dir() and any(p.name.isdigit() and p.is_dir() for p in ck.iterdir())
    return has_ckpt or (run_dir / "hub" / "config.json").is_file()


def check_run_dir(config: C.Config, run_dir: pathlib.Path, *, fresh: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> bool:
    """Whether ``run_dir`` holds this run (resume) — ``False`` for a new run dir, or one whose
    earlier run stopped before its first checkpoint (:func:`started`). A different run there
    raises :class:`RunDirError` naming the differing keys unless ``fresh``; so does an input of
    the run (``--init``, a teacher, the tokenizer, data) that lies among the run dir's own
    artefacts, which this run would overwrite (``fresh`` or not). Keys of
    :data:`BOOKKEEPING_KEYS` (checkpoint cadence, logging) may differ. A ``run_config.json`` of an
    older layout (the flat ``rollout`` keys) is compared after :func:`cascade_jax.config.migrate_dict`,
    the move said through ``log``; the resumed run writes it back in today's layout."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir}: exists and is not a directory")
    for what, path in _inputs(config):
        art = _artifact_of(path, run_dir)
        if art is not None:
            inside = "is the run dir" if art == "." else f"lies in the run dir's {art}/"
            raise RunDirError(f"{what} {path} {inside} {run_dir}, which this run "
                              f"{'clears (--fresh)' if fresh else 'overwrites'}; start from it "
                              f"into another --run-dir")
    f = run_dir / "run_config.json"
    if fresh or not f.exists():
        return False
    try:
        old = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        if not started(run_dir):
            return False
        raise RunDirError(f"run dir {run_dir}: unreadable run_config.json ({e}); pass --fresh "
                          f"to start over") from None
    try:
        moved, now = C.moved_keys(old), C.migrate_dict(old)
    except C.ConfigError as e:
        if not started(run_dir):
            return False
        raise RunDirError(f"run dir {run_dir}: run_config.json: {e}; fix it by hand or pass --fresh") from None
    keys = [k for k in _diff(now, C.to_dict(config)) if k not in BOOKKEEPING_KEYS]
    if keys:
        if not started(run_dir):
            return False
        shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        raise RunDirError(f"run dir {run_dir} holds a different run (differs in {shown}); pass "
                          f"--fresh to replace it or choose another --run-dir")
    if moved and log is not None:
        shown = ", ".join(f"{a} -> {b}" for a, b in moved[:4]) + (" ..." if len(moved) > 4 else "")
        log(f"run dir {run_dir}: run_config.json is in the layout before the rollout sections; "
            f"migrated ({len(moved)} key(s): {shown}) and rewritten on resume")
    return True


def _clear(run_dir: pathlib.Path) -> None:
    """Remove the run artefacts (:data:`RUN_ARTIFACTS`) of ``run_dir`` and nothing else."""
    for name in RUN_ARTIFACTS:
        p = run_dir / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------


_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12,
               "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6 lite": 918e12}


def _peak_flops() -> Optional[float]:
    kind = jax.devices()[0].device_kind
    for k, v in _PEAK_FLOPS.items():
        if k in kind:
            return v * jax.device_count()
    return None


def _data_report(stage: Stage, log, reported: dict) -> dict:
    """The data iterator's skip counters as metrics (``data/overlong`` ...); logs each kind of
    skipped row the first time it occurs (and its first location)."""
    it = stage.parts.data
    stats = getattr(it, "stats", None) or {}
    out = {}
    for key, text in (("overlong", "longer than the length limit, dropped"),
                      ("truncated", "longer than data.seq_len, truncated"),
                      ("bad_row", "bad, skipped"), ("no_loss_tokens", "without loss tokens")):
        n = int(stats.get(key, 0) or 0)
        if key in stats:
            out[f"data/{key}"] = float(n)
        if n and not reported.get(key):
            reported[key] = True
            where = (getattr(it, "first_skipped", None) or {}).get(key)
            limit = ("rollout.sampling.max_prompt_len" if stage.obj != "sft" else "data.seq_len")
            log(f"data: {n} row(s) so far {text.replace('the length limit', limit)}"
                + (f" (first: {where})" if where else "")
                + f"; counted as data/{key} in metrics.jsonl")
    return out


def run_stage(config: C.Config, run_dir=None, *, fresh: bool = False,
              argv: Optional[Sequence[str]] = None, progress: bool = True,
              log: Optional[Callable[[str], None]] = None) -> dict:
    """Run (or resume) one stage of ``config`` in ``run_dir`` (default ``run.out_dir``);
    returns the summary (also written to ``summary.json``). Bad input raises
    :class:`~cascade_jax.runner.errors.RunError` before anything is written. SIGTERM / SIGINT
    during the steps checkpoint the last finished step and raise
    :class:`~cascade_jax.runner.errors.Preempted` (:mod:`cascade_jax.runner.preempt`)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    run_dir = pathlib.Path(run_dir or config.run.out_dir)
    if str(run_dir) != config.run.out_dir:
        config = C.replace_path(config, "run.out_dir", str(run_dir))
    obj = config.stage.objective
    if obj not in ("sft", "grpo", "mopd"):
        raise B.ConfigError(f"stage.objective {obj!r}: run_stage runs sft, grpo and mopd")
    B.start_distributed()  # before anything asks JAX about processes or devices
    bar = Progress(config.stage.steps, desc=config.stage.name,
                   enabled=progress and jax.process_index() == 0,
                   lines=jax.process_index() == 0, log=log)
    try:
        return _run_stage(config, run_dir, fresh=fresh, argv=argv, log=log, bar=bar)
    finally:
        bar.close()


def _run_stage(config: C.Config, run_dir: pathlib.Path, *, fresh: bool, argv, log,
               bar: Progress) -> dict:
    obj = config.stage.objective
    # ---- validate and build everything before writing anything
    bar.set_phase("validating")
    B.validate(config)
    check_inputs(config)  # every missing teacher / data / tokenizer path, named at once
    resume = check_run_dir(config, run_dir, fresh=fresh, log=log)
    bar.set_phase("building (model, data, compile)")
    parts = B.build(config)
    writer = jax.process_index() == 0

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh or (not resume and (run_dir / "run_config.json").exists()):
            _clear(run_dir)  # a fresh start (or over a run that never checkpointed)
        _write_json(run_dir / "run_config.json", C.to_dict(config))
        prov = provenance.collect(config, mesh=parts.mesh, argv=argv)
        old = run_dir / "provenance.json"
        if resume and old.exists():  # keep the first start's record, list every resume
            try:
                first = json.loads(old.read_text())
                prov = {**first, "resumes": first.get("resumes", []) + [
                    {k: prov[k] for k in ("time", "argv", "git", "devices")}]}
            except (OSError, json.JSONDecodeError):
                pass
        _write_json(old, prov)
    stage = Stage(config, run_dir, parts, log=log)
    ckpt = Checkpointer(run_dir, keep_last=config.run.keep_last, keep_best=config.run.keep_best,
                        async_save=config.run.async_checkpoint)
    start = 0
    restored = ckpt.restore_latest(stage.checkpoint_state(), log=log) if resume else None
    if restored is not None:
        start, state, data_state, meta = restored
        stage.load_checkpoint_state(state, data_state)
        log(f"resumed {run_dir} at step {start}")
    lag = L.make(stage, run_dir, config.stage.steps, writer=writer)  # rollout.max_policy_lag 1
    if lag is not None and restored is not None:
        lag.restore(start)
    metrics_w = MetricsWriter(run_dir, enabled=writer)
    metrics_w.truncate_after(start)
    steps = config.stage.steps
    every = config.eval.every
    ck_every, ck_every_s = config.run.checkpoint_every, config.run.checkpoint_every_s
    last_eval = None
    peak = _peak_flops()
    reported: dict = {}
    try:
        with StopSignals(log) as stop:
            if every > 0 and start == 0 and steps > 0:  # the baseline of the learning curve
                bar.set_phase("evaluating the start")
                last_eval = stage.evaluate(0)
                if last_eval is not None:
                    metrics_w.write(0, last_eval["flat"], prefix="eval/")
            bar.begin_steps(start)
            last_save = time.monotonic()
            for step in range(start, steps):
                timer = PhaseTimer()
                t0 = time.perf_counter()
                profiling = step + 1 in config.run.profile_steps  # numbered as in metrics.jsonl
                if profiling:
                    jax.profiler.start_trace(str(run_dir / "profile"))
                try:
                    m = (lag or stage).step(step, timer)
                except StopIteration:  # a finite data source (data.num_epochs) ran out
                    log(f"data exhausted after step {step}; stopping")
                    steps = step
                    break
                except DataError as e:
                    raise InputFileError(f"data: {e}") from None
                fault_point("train", step + 1)
                if profiling:
                    jax.profiler.stop_trace()
                done = step + 1
                final = done == steps
                with timer("eval"):
                    if (every > 0 and done % every == 0) or (final and every >= 0):
                        bar.set_phase("evaluating")
                        last_eval = stage.evaluate(done)
                        bar.set_phase("steps")
                        if last_eval is not None:
                            m.update({f"eval/{k}": v for k, v in last_eval["flat"].items()})
                hold_point(done, stop)
                halt, time_due = stop.poll(done, bool(ck_every_s) and
                                           time.monotonic() - last_save >= ck_every_s)
                if final or halt or time_due or (ck_every and done % ck_every == 0):
                    score = last_eval["score"] if last_eval and last_eval["step"] == done else None
                    if lag is not None:  # the next step's batch belongs to this checkpoint
                        lag.save(done, ckpt.steps())
                    m["time/checkpoint_blocked_s"] = ckpt.save(
                        done, stage.checkpoint_state(), stage.data_state(),
                        {"eval": last_eval["domains"] if score is not None else None,
                         "time": time.time()}, eval_score=score)
                    last_save = time.monotonic()
                    fault_point("save", done)
                step_s = time.perf_counter() - t0
                m.update({f"time/{k}_s": v for k, v in timer.t.items()})
                m["time/step_s"] = step_s
                if "total_tokens" in m:
                    m["tokens_per_s"] = m["total_tokens"] / step_s
                    flops = 6.0 * stage.active_params * m["total_tokens"]
                    m["model_tflops_per_s"] = flops / step_s / 1e12
                    if peak:
                        m["mfu"] = flops / step_s / peak
                m.update(_data_report(stage, log if writer else (lambda _: None), reported))
                if done % config.run.log_every == 0 or final or halt:
                    metrics_w.write(done, m)
                bar.update(m)
                if config.run.export_every and done % config.run.export_every == 0 \
                        and not final and not halt:  # every process gathers, process 0 writes
                    stage.export(run_dir / "exports" / f"step_{done}", write=writer)
                if halt and not final:
                    bar.set_phase("writing the checkpoint before exiting")
                    ckpt.wait()
                    raise Preempted(
                        f"stopped by {stop.signal_name} after step {done}/{steps}: checkpoint "
                        f"{done} written to {run_dir / 'checkpoints'}; rerun the same command "
                        f"to resume")
            bar.set_phase("final checkpoint and export")
            if steps > start and steps not in ckpt.steps():
                ckpt.save(steps, stage.checkpoint_state(), stage.data_state(), {"eval": None})
            ckpt.wait()
        summary = {"stage": config.stage.name, "objective": obj, "steps": steps,
                   "resumed_from": start, "run_dir": str(run_dir),
                   "checkpoints": ckpt.steps(), "eval": last_eval["domains"] if last_eval else None}
        stats = getattr(parts.data, "stats", None)
        if stats:
            summary["data"] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        if steps > start or not (run_dir / "hub" / "config.json").exists():
            summary["hub"] = str(stage.export(run_dir / "hub", write=writer))
        else:
            summary["hub"] = str(run_dir / "hub")
        if writer:
            summary.update(stage.summary())
            _write_json(run_dir / "summary.json", summary)
        return summary
    finally:
        metrics_w.close()
        ckpt.close()
        if lag is not None:
            lag.close()
        stage.close()
