"""Run the cascade: every stage of :data:`plan.CASCADE` through the stage runner, each from the
previous stage's final Hub export, evaluating every final export on all cascade domains into the
teacher registry, then the report.

    from cascade_jax.cascade import run_cascade
    run_cascade("runs/cascade", preset="tiny")          # rerun the same call to resume

Per stage: ``status`` in ``cascade_state.json`` goes ``running`` -> ``trained`` (the runner's
summary; its final export is ``<stage>/hub``) -> ``done`` (evaluated on every domain of
``eval_domains``, registered in ``teachers.json``). A rerun skips ``done`` stages, evaluates a
``trained`` one, and hands a ``running`` one back to the runner with the same run dir, which
resumes from the stage's own checkpoints. MOPD's ``stage.teachers`` come from the registry
(:func:`registry.assign_teachers`).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence, Union

from cascade_jax import config as C
from cascade_jax import domains as D
from cascade_jax.cascade import plan as P
from cascade_jax.cascade import registry as R
from cascade_jax.runner import evaluate as E
from cascade_jax.cascade.report import write_report
from cascade_jax.runner import run_stage
from cascade_jax.runner.build import resolve_init

__all__ = ["run_cascade", "run_mopd", "enable_compilation_cache",
           "parse_teacher_policy", "command", "BASE"]

#: Registry name of the cascade's starting model (the first stage's start).
BASE = "base"


def enable_compilation_cache(path: Union[str, os.PathLike, None] = None) -> str:
    """JAX's persistent compilation cache (shared by all stages, all processes and reruns): the
    stages share shapes, so most programs compile once. Default ``$CASCADE_JAX_CACHE`` or
    ``~/.cache/cascade_jax/xla``."""
    import jax

    path = str(path or os.environ.get("CASCADE_JAX_CACHE")
               or pathlib.Path.home() / ".cache" / "cascade_jax" / "xla")
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _registry_eval(name: str, config: C.Config, checkpoint: Optional[str],
                   domains: Sequence[str], log) -> dict:
    """:func:`cascade_jax.runner.evaluate.evaluate_checkpoint` for the registry row ``name``, announced first (Ctrl-C in
    it exits 130 with nothing registered; the rerun evaluates again). Test hook: with
    ``CASCADE_FAULT=hold@eval:<name>`` it waits after its first finished sample (at most
    300 s) so a test can interrupt it there."""
    log(f"[cascade] {name}: evaluating on {len(domains)} domain(s) for the teacher registry")
    hold = os.environ.get("CASCADE_FAULT") == f"hold@eval:{name}"

    def progress(done: int, total: int) -> None:
        nonlocal hold
        if hold and done > 0:
            hold = False
            log(f"[cascade] {name}: holding in the evaluation ({done}/{total} samples)")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 300:
                time.sleep(0.05)

    return E.evaluate_checkpoint(config, checkpoint=checkpoint, domains=domains, progress=progress)


def _avg(res: dict) -> dict:
    return {d: next(v for k, v in m.items() if k.startswith("avg@")) for d, m in res["domains"].items()}


def run_cascade(cascade_dir: Union[str, os.PathLike], *, preset: str = "tiny",
                overrides: Sequence[str] = (), teacher_policy="paper",
                base_checkpoint: Optional[str] = None, stages: Optional[Sequence[str]] = None,
                eval_domains: Sequence[str] = D.DOMAINS, report: bool = True,
                argv: Optional[Sequence[str]] = None, progress: bool = True,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Run (or resume) the cascade in ``cascade_dir``; returns the state dict.

    ``overrides``: ``--set`` values applied to every stage's config (e.g. ``stage.steps=2``).
    ``stages``: run only these (and nothing after the last of them), e.g. up to ``mopd``.
    ``base_checkpoint``: a Hub dir the first stage starts from (default: the preset's init).
    A rerun must use the same preset and overrides (else :class:`ConfigError`).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cdir = pathlib.Path(cascade_dir)
    wanted = list(stages) if stages is not None else list(P.STAGE_NAMES)
    for n in wanted:  # every stage's config resolves before anything is written
        P.stage_config(n, preset=preset, cascade_dir=cdir, overrides=overrides)
    state = P.load_state(cdir)
    setup = {"preset": preset, "overrides": list(overrides), "base_checkpoint": base_checkpoint,
             "teacher_policy": teacher_policy if isinstance(teacher_policy, str) else dict(teacher_policy)}
    for k, v in setup.items():
        if k in state and state[k] != v:
            raise C.ConfigError(f"cascade dir {cdir} was started with {k}={state[k]!r}, not {v!r}; "
                                f"use the same settings to resume or a new --run-dir")
    state.update(setup)
    P.save_state(cdir, state)
    reg_path = cdir / R.REGISTRY_FILE
    eval_domains = [D.check_domain(d) for d in eval_domains]

    # Every registry row is evaluated with the same settings: the first stage's rollout and
    # eval sections (its max_prompt_len fits every domain's prompts), whatever each stage trains
    # with, so the score matrix compares checkpoints and nothing else.
    cfg0 = P.stage_config(P.CASCADE[0].name, preset=preset, cascade_dir=cdir,
                          start_checkpoint=base_checkpoint, overrides=overrides)
    # The starting model's scores (the first stage's "before").
    if BASE not in R.load_registry(reg_path)["checkpoints"]:
        t0 = time.perf_counter()
        res = _registry_eval(BASE, cfg0, base_checkpoint, eval_domains, log)
        R.register_checkpoint(reg_path, BASE, base_checkpoint or f"{preset}-init", _avg(res),
                              eval_s=round(time.perf_counter() - t0, 2))
        log(f"[cascade] base scores: {_fmt(_avg(res))}")

    for spec in P.CASCADE:
        if spec.name not in wanted:
            continue
        st = P.load_state(cdir)["stages"].get(spec.name, {})
        if st.get("status") == "done":
            log(f"[cascade] {spec.name}: done, skipped")
            continue
        start_ck = base_checkpoint
        if spec.start is not None:
            prev = P.load_state(cdir)["stages"].get(spec.start, {})
            if prev.get("status") != "done":
                raise C.ConfigError(f"stage {spec.name} starts from {spec.start}, which has not "
                                    f"finished in {cdir}")
            start_ck = str(cdir / prev["hub"])
        teachers = None
        if P.load_stage_config(spec.name, preset).stage.objective == "mopd":
            reg = R.load_registry(reg_path)
            domains = P.load_stage_config(spec.name, preset).data.domains
            teachers = R.assign_teachers(reg, domains, teacher_policy, reg_dir=cdir)
            R.record_assignment(reg_path, teacher_policy, {d: os.path.relpath(p, cdir)
                                                           for d, p in teachers.items()})
        cfg = P.stage_config(spec.name, preset=preset, cascade_dir=cdir, start_checkpoint=start_ck,
                             teachers=teachers, overrides=overrides)
        if st.get("status") != "trained":
            # an SFT stage trains on every domain of its data: all count as its own
            own = list(cfg.data.domains) or (eval_domains if cfg.stage.objective == "sft" else [])
            P.update_stage_state(cdir, spec.name, status="running", start=spec.start,
                                 domains=own, steps=cfg.stage.steps)
            log(f"[cascade] {spec.name}: {'resuming' if st else 'starting'} from "
                f"{spec.start or (base_checkpoint or preset + ' init')} ({cfg.stage.steps} steps)")
            t0 = time.perf_counter()
            summary = run_stage(cfg, cdir / spec.name, argv=argv, progress=progress, log=log)
            wall = time.perf_counter() - t0 + float(st.get("wall_s") or 0.0)
            hub = os.path.relpath(summary["hub"], cdir) if os.path.isabs(summary["hub"]) else \
                os.path.relpath(os.path.abspath(summary["hub"]), os.path.abspath(cdir))
            P.update_stage_state(cdir, spec.name, status="trained", hub=hub, wall_s=round(wall, 2),
                                 resumed_from=summary.get("resumed_from", 0))
        st = P.load_state(cdir)["stages"][spec.name]
        t0 = time.perf_counter()
        res = _registry_eval(spec.name, cfg0, str(cdir / st["hub"]), eval_domains, log)
        eval_s = time.perf_counter() - t0
        (cdir / spec.name / "eval").mkdir(parents=True, exist_ok=True)
        (cdir / spec.name / "eval" / "cascade.json").write_text(json.dumps(res["domains"], indent=2) + "\n")
        R.register_checkpoint(reg_path, spec.name, str(cdir / st["hub"]), _avg(res),
                              eval_s=round(eval_s, 2))
        P.update_stage_state(cdir, spec.name, status="done", eval_s=round(eval_s, 2))
        log(f"[cascade] {spec.name}: done; scores {_fmt(_avg(res))}")
    if report:
        path = write_report(cdir, title=f"Cascade report ({preset})")
        log(f"[cascade] report: {path}")
    return P.load_state(cdir)


def _fmt(scores: dict) -> str:
    return ", ".join(f"{d} {v:.2f}" for d, v in scores.items())


def parse_teacher_policy(text: str):
    """``paper`` | ``best`` | ``domain=stage,domain=stage,...`` (an explicit map)."""
    if text in ("paper", "best"):
        return text
    out = {}
    for item in text.split(","):
        dom, sep, name = item.partition("=")
        if not sep or not dom.strip() or not name.strip():
            raise R.RegistryError(f"--teachers {text!r}: expected 'paper', 'best' or "
                                  f"'domain=stage,...' (bad item {item!r})")
        out[dom.strip()] = name.strip()
    return out


def run_mopd(run_dir: Union[str, os.PathLike], *, teachers_from: Optional[str] = None,
             preset: str = "tiny", overrides: Sequence[str] = (), teacher_policy="paper",
             argv: Optional[Sequence[str]] = None, progress: bool = True,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """The MOPD stage on its own. With ``teachers_from`` (a cascade dir): start from that
    cascade's multi-domain-RL export with teachers from its ``teachers.json``, in ``run_dir``.
    Without: bootstrap -- run the cascade up to and including MOPD with ``run_dir`` as the
    cascade dir (earlier stages first, each resumable). Returns the MOPD run's summary."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    spec = {s.name: s for s in P.CASCADE}["mopd"]
    if teachers_from is None:
        upto = list(P.STAGE_NAMES[:P.STAGE_NAMES.index("mopd") + 1])
        run_cascade(run_dir, preset=preset, overrides=overrides, teacher_policy=teacher_policy,
                    stages=upto, argv=argv, progress=progress, log=log)
        return json.loads((pathlib.Path(run_dir) / "mopd" / "summary.json").read_text())
    src = pathlib.Path(teachers_from)
    if not (src / R.REGISTRY_FILE).is_file():
        raise R.RegistryError(f"--teachers-from {src}: no {R.REGISTRY_FILE} there (not a cascade dir)")
    state = P.load_state(src)["stages"]
    if state.get(spec.start, {}).get("status") != "done":
        raise R.RegistryError(f"--teachers-from {src}: stage {spec.start} (MOPD's start) has not "
                              f"finished there")
    cfg0 = P.load_stage_config("mopd", preset)
    teachers = R.assign_teachers(R.load_registry(src / R.REGISTRY_FILE), cfg0.data.domains,
                                 teacher_policy, reg_dir=src)
    cfg = P.stage_config("mopd", preset=preset, cascade_dir=pathlib.Path(run_dir).parent,
                         start_checkpoint=str(src / state[spec.start]["hub"]), teachers=teachers,
                         overrides=overrides)
    cfg = C.replace_path(cfg, "run.out_dir", str(run_dir))
    log(f"[mopd] from {src / spec.start}; teachers: " + ", ".join(
        f"{d} <- {os.path.relpath(p, src)}" for d, p in teachers.items()))
    return run_stage(cfg, run_dir, argv=argv, progress=progress, log=log)


def command(stage: str, *, run_dir: Optional[str] = None, preset: Optional[str] = None,
            init: Optional[str] = None, overrides: Sequence[str] = (), teachers: str = "paper",
            teachers_from: Optional[str] = None, argv: Optional[Sequence[str]] = None,
            progress: bool = True) -> dict:
    """``launch/run.py --stage=cascade`` / ``--stage=mopd``: the cascade (default dir
    ``runs/cascade``) or MOPD alone (bootstrapping the earlier stages into ``runs/cascade``, or
    with ``teachers_from`` a cascade dir, into ``runs/mopd``). Preset default ``tiny``. Bad input
    raises :class:`cascade_jax.config.ConfigError` naming it. Returns a JSON-able summary."""
    preset = preset or "tiny"
    if preset not in P.PRESET_DIRS:
        raise C.ConfigError(f"--preset: unknown cascade preset {preset!r}; valid: "
                            f"{', '.join(sorted(P.PRESET_DIRS))}")
    try:
        policy = parse_teacher_policy(teachers)
    except R.RegistryError as e:
        raise C.ConfigError(str(e)) from None
    if teachers_from is not None and stage != "mopd":
        raise C.ConfigError("--teachers-from applies to --stage=mopd only")
    base = None
    if init is not None:
        base = resolve_init(init)
    enable_compilation_cache()
    try:
        if stage == "cascade":
            cdir = run_dir or "runs/cascade"
            state = run_cascade(cdir, preset=preset, overrides=overrides, teacher_policy=policy,
                                base_checkpoint=base, argv=argv, progress=progress)
            return {"cascade_dir": str(cdir), "report": str(pathlib.Path(cdir) / "report.md"),
                    "stages": {n: s.get("status") for n, s in state["stages"].items()}}
        if stage == "mopd":
            if base is not None:
                raise C.ConfigError("--init does not apply to --stage=mopd (it starts from the "
                                    "multi-domain-RL checkpoint)")
            d = run_dir or ("runs/mopd" if teachers_from else "runs/cascade")
            return run_mopd(d, teachers_from=teachers_from, preset=preset, overrides=overrides,
                            teacher_policy=policy, argv=argv, progress=progress)
    except R.RegistryError as e:
        raise C.ConfigError(str(e)) from None
    raise C.ConfigError(f"cascade command: unknown stage {stage!r} (cascade, mopd)")
