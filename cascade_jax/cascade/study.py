"""The MOPD-vs-GRPO study: claims declared before the runs, verdicts computed from eval curves.

From one start checkpoint, MOPD (teachers from the cascade's registry) and continuing GRPO run
for the same number of steps on the same domains, once per seed, evaluating every
``eval_every`` steps. The study's config declares its claims up front; :func:`declare` writes
them to ``<study_dir>/claims.json`` before any training and refuses to run a study dir whose
declared claims differ (no moving the goalposts after seeing results).

Claim kinds (``curves[method] = {"steps": [...], "scores": {domain: [mean over seeds]}}``):

- ``steps_to_teacher`` (``domain``, ``tolerance``, ``margin_steps``): let ``s_m`` be the first
  eval step at which method ``m``'s seed-mean score reaches ``teacher - tolerance`` (infinite if
  never). Held iff ``s_mopd + margin_steps <= s_grpo`` and ``s_mopd`` is finite -- "MOPD reaches
  the teacher's level in fewer steps than GRPO".
- ``final_gain`` (``domain``, ``margin``): held iff ``mean_mopd(last) - mean_grpo(last) >=
  margin`` -- "at matched steps MOPD scores at least ``margin`` higher".
- ``final_near_teacher`` (``domain``, ``tolerance``): held iff ``mean_mopd(last) >= teacher -
  tolerance`` -- "after MOPD the domain is within ``tolerance`` of its teacher or above it".

Regressions of other domains are reported (``regressions``), never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Mapping, Sequence

import numpy as np

from cascade_jax import config as C
from cascade_jax import domains as D
from cascade_jax.cascade import ledger as L
from cascade_jax.cascade import plan as P
from cascade_jax.cascade import registry as R
from cascade_jax.cascade.report import read_metrics, write_study_report
from cascade_jax.runner import run_stage
from cascade_jax.runner.evaluate import evaluate_checkpoint

__all__ = ["StudyError", "Claim", "StudySpec", "spec_from_dict", "load_spec", "declare",
           "first_reach", "seed_mean", "verdicts", "regressions", "method_config", "run_study"]


class StudyError(ValueError):
    """A bad study config or a study dir whose declared claims differ."""


_KINDS = {"steps_to_teacher": {"domain", "tolerance", "margin_steps"},
          "final_gain": {"domain", "margin"},
          "final_near_teacher": {"domain", "tolerance"}}


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    kind: str
    domain: str
    tolerance: float = 0.0
    margin_steps: int = 0
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """``start``: a stage of the cascade dir whose final export both methods start from;
    ``domains``: the MOPD stage's domains (GRPO trains on the same prompts); ``steps`` matched
    for both methods; ``eval_every``: eval cadence in steps; ``seeds``: >= 3;
    ``teacher_policy``: as in :func:`registry.assign_teachers`; ``overrides``: ``--set`` values
    for both methods' stage configs; ``grpo_overrides``: ``--set`` values for the GRPO runs only,
    applied after ``overrides`` (GRPO needs groups of several samples per prompt where MOPD,
    scoring every token against a teacher, spends the same samples on more prompts);
    ``name``: the study's name in the ledger (:mod:`~cascade_jax.cascade.ledger`; a study file's
    name is its stem), not part of its fingerprint."""

    claims: tuple
    start: str = "multi_domain_rl"
    domains: tuple = ()
    steps: int = 8
    eval_every: int = 2
    seeds: tuple = (0, 1, 2)
    teacher_policy: object = "paper"
    overrides: tuple = ()
    grpo_overrides: tuple = ()
    name: str = ""


def _claim(d: dict, i: int) -> Claim:
    where = f"claims[{i}]"
    if not isinstance(d, dict):
        raise StudyError(f"{where}: expected an object")
    for key in ("name", "kind", "domain"):
        if not isinstance(d.get(key), str):
            raise StudyError(f"{where}.{key}: required string")
    kind = d["kind"]
    if kind not in _KINDS:
        raise StudyError(f"{where}.kind: unknown claim kind {kind!r}; valid: {', '.join(_KINDS)}")
    allowed = _KINDS[kind] | {"name", "kind"}
    extra = set(d) - allowed
    if extra:
        raise StudyError(f"{where}: unknown key(s) {', '.join(sorted(extra))} for kind {kind!r}; "
                         f"valid: {', '.join(sorted(allowed))}")
    missing = _KINDS[kind] - set(d)
    if missing:
        raise StudyError(f"{where}: missing {', '.join(sorted(missing))} (kind {kind!r})")
    if d["domain"] not in D.DOMAINS:
        raise StudyError(f"{where}.domain: unknown domain {d['domain']!r}")
    for key in ("tolerance", "margin"):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, float))):
            raise StudyError(f"{where}.{key}: expected a number, got {d[key]!r}")
    if "margin_steps" in d and (isinstance(d["margin_steps"], bool) or not isinstance(d["margin_steps"], int)):
        raise StudyError(f"{where}.margin_steps: expected an int, got {d['margin_steps']!r}")
    return Claim(**d)


def spec_from_dict(d: dict, name: str = "") -> StudySpec:
    """A validated :class:`StudySpec`; ``name`` applies unless ``d`` names the study itself."""
    if not isinstance(d, dict):
        raise StudyError("study config: expected an object")
    fields = {f.name for f in dataclasses.fields(StudySpec)}
    extra = set(d) - fields
    if extra:
        raise StudyError(f"study config: unknown key(s) {', '.join(sorted(extra))}; valid: "
                         f"{', '.join(sorted(fields))}")
    if "name" in d and not isinstance(d["name"], str):
        raise StudyError(f"study config: name: expected a string, got {d['name']!r}")
    if not d.get("claims"):
        raise StudyError("study config: 'claims' must declare at least one claim before running")
    claims = tuple(_claim(c, i) for i, c in enumerate(d["claims"]))
    names = [c.name for c in claims]
    if len(set(names)) != len(names):
        raise StudyError("study config: claim names must be unique")
    spec = StudySpec(**{"name": name, **d, "claims": claims,
                        **{k: tuple(d[k]) for k in ("domains", "seeds", "overrides", "grpo_overrides")
                           if k in d}})
    if len(spec.seeds) < 3:
        raise StudyError(f"study config: seeds: at least 3 seeds, got {list(spec.seeds)}")
    if spec.steps < 1 or spec.eval_every < 1:
        raise StudyError("study config: steps and eval_every must be >= 1")
    for c in claims:
        if spec.domains and c.domain not in spec.domains:
            raise StudyError(f"claim {c.name!r}: domain {c.domain!r} is not among the study's "
                             f"domains {list(spec.domains)}")
    return spec


def load_spec(path) -> StudySpec:
    try:
        d = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    return spec_from_dict(d, name=pathlib.Path(path).stem)


def _run_seeds(spec: StudySpec, seeds) -> tuple:
    """The seeds a run uses: the declared ``spec.seeds``, or ``seeds`` (>= 3) for a run of the
    same claims on another seed set (a replication; the ledger records each run's seeds)."""
    if seeds is None:
        return tuple(spec.seeds)
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds: at least 3 distinct seeds, got {list(seeds)}")
    return seeds


def declare(study_dir, spec: StudySpec, seeds=None) -> dict:
    """Write ``claims.json`` (the claims and the settings they are judged under, with the seeds
    of this run: ``seeds`` or the declared ones) before any run; if it exists, it must be
    identical (else :class:`StudyError`). A study the repository's ledger declares must match its
    declaration there (:func:`ledger.check_declared`)."""
    study_dir = pathlib.Path(study_dir)
    try:
        L.check_declared(spec)
    except L.LedgerError as e:
        raise StudyError(str(e)) from None
    decl = {"claims": [dataclasses.asdict(c) for c in spec.claims], "start": spec.start,
            "steps": spec.steps, "eval_every": spec.eval_every,
            "seeds": list(_run_seeds(spec, seeds)), "domains": list(spec.domains)}
    path = study_dir / "claims.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != decl:
            raise StudyError(f"{path}: this study dir declared different claims/settings before; "
                             f"use a new study dir")
        return decl
    study_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(decl, indent=2) + "\n")
    return decl


def first_reach(steps: Sequence[float], scores: Sequence[float], level: float) -> float:
    """First step whose score is >= ``level`` (``inf`` if none)."""
    for s, v in zip(steps, scores):
        if v is not None and not math.isnan(v) and v >= level:
            return float(s)
    return math.inf


def seed_mean(per_seed: Mapping[str, dict], domain: str):
    """``(steps, mean, per_seed_matrix)`` over seeds on the first seed's steps."""
    curves = list(per_seed.values())
    steps = np.asarray(curves[0]["steps"], float)
    mat = np.stack([np.interp(steps, np.asarray(c["steps"], float), np.asarray(c["scores"][domain], float))
                    for c in curves])
    return steps, mat.mean(0), mat


def verdicts(spec: StudySpec, curves: Mapping[str, Mapping[str, dict]],
             teacher_scores: Mapping[str, float]) -> list[dict]:
    """One verdict per claim: ``{"claim", "kind", "held", "numbers", ...values}``.
    ``curves[method][seed] = {"steps": [...], "scores": {domain: [...]}}`` for methods
    ``mopd`` and ``grpo``."""
    out = []
    for c in spec.claims:
        sm, mm, mat_m = seed_mean(curves["mopd"], c.domain)
        sg, mg, mat_g = seed_mean(curves["grpo"], c.domain)
        if c.kind in ("steps_to_teacher", "final_near_teacher") and c.domain not in teacher_scores:
            raise StudyError(f"claim {c.name!r}: no teacher score for domain {c.domain!r}")
        if c.kind == "final_near_teacher":
            level = teacher_scores[c.domain] - c.tolerance
            held = bool(mm[-1] >= level)
            nums = (f"at step {int(sm[-1])}: MOPD {mm[-1]:.3f} (seeds {np.round(mat_m[:, -1], 3).tolist()}) "
                    f"vs teacher {teacher_scores[c.domain]:.3f} - tol {c.tolerance:g} = {level:.3f}")
            out.append({"claim": c.name, "kind": c.kind, "domain": c.domain, "held": held,
                        "numbers": nums, "level": level})
        elif c.kind == "steps_to_teacher":
            level = teacher_scores[c.domain] - c.tolerance
            rm, rg = first_reach(sm, mm, level), first_reach(sg, mg, level)
            held = math.isfinite(rm) and rm + c.margin_steps <= rg
            fmt = lambda s: "never" if math.isinf(s) else f"step {int(s)}"
            nums = (f"teacher {teacher_scores[c.domain]:.3f} - tol {c.tolerance:g} = {level:.3f}: "
                    f"MOPD reaches it at {fmt(rm)}, GRPO at {fmt(rg)} (margin {c.margin_steps} steps; "
                    f"final MOPD {mm[-1]:.3f} vs GRPO {mg[-1]:.3f})")
            out.append({"claim": c.name, "kind": c.kind, "domain": c.domain, "held": bool(held),
                        "numbers": nums, "mopd_step": None if math.isinf(rm) else rm,
                        "grpo_step": None if math.isinf(rg) else rg, "level": level})
        else:
            gain = float(mm[-1] - mg[-1])
            held = gain >= c.margin
            nums = (f"at step {int(sm[-1])}: MOPD {mm[-1]:.3f} (seeds {np.round(mat_m[:, -1], 3).tolist()}) "
                    f"vs GRPO {mg[-1]:.3f} (seeds {np.round(mat_g[:, -1], 3).tolist()}); gain "
                    f"{gain:+.3f}, margin {c.margin:g}")
            out.append({"claim": c.name, "kind": c.kind, "domain": c.domain, "held": bool(held),
                        "numbers": nums, "gain": gain})
    return out


def regressions(curves: Mapping[str, Mapping[str, dict]], domains: Sequence[str]) -> list[dict]:
    """Per method and domain: seed-mean score at the start and the end (reported, not asserted)."""
    out = []
    for method, per_seed in sorted(curves.items()):
        for dom in domains:
            steps, mean, _ = seed_mean(per_seed, dom)
            out.append({"method": method, "domain": dom, "start": float(mean[0]),
                        "end": float(mean[-1]), "change": float(mean[-1] - mean[0])})
    return out


# --------------------------------------------------------------------------------------------
# Running the study


def _eval_curve(run_dir, domains, start_scores: Mapping[str, float]) -> dict:
    """``{"steps": [0, ...], "scores": {domain: [...]}}`` from the start scores and the run's
    ``eval/<domain>/avg@k`` rows in ``metrics.jsonl``."""
    steps, scores = [0], {d: [start_scores[d]] for d in domains}
    for row in read_metrics(run_dir):
        vals = {}
        for d in domains:
            key = next((k for k in row if k.startswith(f"eval/{d}/avg@")), None)
            if key is not None and row[key] is not None:
                vals[d] = row[key]
        if len(vals) == len(domains) and row["step"] not in steps:
            steps.append(row["step"])
            for d in domains:
                scores[d].append(vals[d])
    return {"steps": steps, "scores": scores}


def method_config(base, method: str, *, teachers, steps: int, eval_every: int, seed: int,
                  overrides: Sequence[str] = (), grpo_overrides: Sequence[str] = ()):
    """The stage config of ``method`` (``mopd`` or ``grpo``) from the MOPD stage config ``base``:
    same start, domains, optimizer and sampling; GRPO swaps the objective (outcome rewards,
    token TIS correction, no teachers, no forward-KL term) after ``overrides`` and
    ``grpo_overrides``."""
    if method not in ("mopd", "grpo"):
        raise StudyError(f"unknown method {method!r}; valid: mopd, grpo")
    given = list(overrides) + (list(grpo_overrides) if method == "grpo" else [])
    cfg = C.apply_overrides(base, [C.migrate_override(s) for s in given])  # declarations keep old keys
    sets = [("stage.steps", steps), ("eval.every", eval_every), ("run.seed", seed),
            ("data.shuffle_seed", seed)]
    if method == "mopd":
        sets += [("stage.teachers", dict(teachers))]
    elif method == "grpo":  # MOPD-only terms off first (they are refused with objective grpo)
        sets += [("stage.forward_kl_coef", 0.0), ("stage.teacher_topk", 0),
                 ("stage.objective", "grpo"), ("stage.name", "grpo_continue"),
                 ("stage.is_correction", "tis"), ("stage.teachers", {})]
    for k, v in sets:
        cfg = C.replace_path(cfg, k, v)
    return cfg


def run_study(study_dir, spec: StudySpec, *, cascade_dir, preset: str = "tiny",
              progress: bool = False, log=None, seeds=None) -> dict:
    """Declare the claims, run MOPD and GRPO for ``spec.steps`` from the cascade's ``spec.start``
    export over ``spec.seeds`` (or ``seeds``: the same claims on another seed set; each run
    resumable), evaluate, and write ``study_result.json`` (curves, teacher scores, verdicts,
    regressions) plus ``report.md``."""
    import os
    import sys

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    study_dir, cdir = pathlib.Path(study_dir), pathlib.Path(cascade_dir)
    declare(study_dir, spec, seeds)
    seeds = _run_seeds(spec, seeds)
    state = P.load_state(cdir)["stages"]
    if state.get(spec.start, {}).get("status") != "done":
        raise StudyError(f"start stage {spec.start!r} has not finished in {cdir}; run the cascade "
                         f"up to it first")
    start_ck = str(cdir / state[spec.start]["hub"])
    base = P.load_stage_config("mopd", preset)
    domains = list(spec.domains or base.data.domains)
    base = C.replace_path(base, "data.domains", domains)
    base = C.replace_path(base, "model.checkpoint", start_ck)
    reg = R.load_registry(cdir / R.REGISTRY_FILE)
    teachers = R.assign_teachers(reg, domains, spec.teacher_policy, reg_dir=cdir)

    cache = study_dir / "evals.json"
    evals = json.loads(cache.read_text()) if cache.exists() else {}
    for ck in sorted({start_ck, *teachers.values()}):
        if ck not in evals:
            doms = domains if ck == start_ck else sorted(d for d, p in teachers.items() if p == ck)
            res = evaluate_checkpoint(base, checkpoint=ck, domains=doms)
            evals[ck] = {d: next(v for k, v in m.items() if k.startswith("avg@"))
                         for d, m in res["domains"].items()}
            cache.write_text(json.dumps(evals, indent=2) + "\n")
    teacher_scores = {d: evals[p][d] for d, p in teachers.items()}
    start_scores = evals[start_ck]
    log(f"[study] start {spec.start}: {start_scores}; teachers: {teacher_scores}")

    curves = {"mopd": {}, "grpo": {}}
    for method in ("mopd", "grpo"):
        for seed in seeds:
            run_dir = study_dir / f"{method}_seed{seed}"
            cfg = method_config(base, method, teachers=teachers, steps=spec.steps,
                                eval_every=spec.eval_every, seed=seed, overrides=spec.overrides,
                                grpo_overrides=spec.grpo_overrides)
            cfg = C.replace_path(cfg, "run.out_dir", str(run_dir))
            if not (run_dir / "summary.json").exists():
                log(f"[study] {method} seed {seed}: {spec.steps} steps")
                run_stage(cfg, run_dir, progress=progress, log=log)
            curves[method][str(seed)] = _eval_curve(run_dir, domains, start_scores)
    result = {"start": spec.start, "start_checkpoint": os.path.relpath(start_ck, study_dir),
              "domains": domains, "seeds": list(seeds), "steps": spec.steps,
              "teachers": {d: os.path.relpath(p, study_dir) for d, p in teachers.items()},
              "teacher_scores": teacher_scores, "start_scores": start_scores, "curves": curves,
              "verdicts": verdicts(spec, curves, teacher_scores),
              "regressions": regressions(curves, domains)}
    (study_dir / "study_result.json").write_text(json.dumps(result, indent=2) + "\n")
    write_study_report(study_dir)
    return result
