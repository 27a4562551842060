"""``report.md`` and its PNG plots (matplotlib) from a cascade dir and, optionally, a study dir.

Inputs (all written by the runner, the cascade and the study; nothing is recomputed here):

- ``<cascade_dir>/cascade_state.json`` -- stage order, wall-clock seconds, the stage's domains;
- ``<cascade_dir>/teachers.json`` -- eval score per checkpoint per domain (the score matrix);
- ``<cascade_dir>/<stage>/metrics.jsonl`` -- one ``{"step": s, name: value, ...}`` per step;
- ``<study_dir>/study_result.json`` -- the study's per-seed eval curves and its verdicts.

Plots: ``reward_per_domain.png`` (training reward per domain along the cascade; eval score per
domain after each stage), ``score_matrix.png`` (rows = checkpoints, columns = domains),
``mopd_vs_grpo.png`` (eval score vs step, mean over seeds with a min--max band, teacher level
dashed), ``response_lengths.png``, ``is_mismatch.png`` (train/rollout log-prob mismatch and IS
weights), ``time_split.png`` (wall-clock per stage, split into the phases the runner logs).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Optional

import numpy as np

from cascade_jax import domains as D
from cascade_jax.cascade import ledger as L
from cascade_jax.cascade import plan as P
from cascade_jax.cascade import registry as R

__all__ = ["read_metrics", "domain_series", "write_report", "write_study_report", "own_domain_gains"]

#: Training-reward keys per domain in ``metrics.jsonl``: ``reward/<domain>`` (also accepted:
#: ``reward_<domain>``, ``reward_mean/<domain>``).
_DOMAIN_KEY = re.compile(r"^(?:train/)?reward(?:_mean)?[/_](?P<dom>[a-z_]+)$")
_LEN_KEYS = ("resp_len_mean", "resp_len_max")
_IS_KEYS = ("is_abs_delta_mean", "is_abs_delta_max", "is_frac_corrected", "is_weight_mean")
#: Per-phase seconds logged each step (``time/<phase>``, e.g. rollout, reward, update).
_TIME_KEY = re.compile(r"^time[/_](?P<phase>[a-z_]+?)(?:_s)?$")
_TIME_TOTALS = ("step", "rollout_reward")  # totals of other phases, not phases


def read_metrics(run_dir) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (a line cut by a kill is skipped)."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    rows.sort(key=lambda r: r["step"])
    return rows


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def domain_series(rows) -> dict:
    """``{domain: (steps, rewards)}`` of the per-domain training reward keys present."""
    keys = {}
    for r in rows:
        for k in r:
            m = _DOMAIN_KEY.match(k)
            if m and m["dom"] in D.DOMAINS:
                keys.setdefault(m["dom"], k)
    return {dom: _series(rows, k) for dom, k in keys.items()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stages(cascade_dir) -> list[str]:
    state = P.load_state(cascade_dir)["stages"]
    return [n for n in P.STAGE_NAMES if n in state]


def own_domain_gains(cascade_dir) -> list[dict]:
    """Per finished stage and each of its own domains: the eval score at its start checkpoint
    and after it, and the gain. The start is the stage named in :data:`plan.CASCADE` (the first
    stage's start is the registry's ``base`` entry when present)."""
    reg = R.load_registry(pathlib.Path(cascade_dir) / R.REGISTRY_FILE)["checkpoints"]
    state = P.load_state(cascade_dir)["stages"]
    out = []
    for spec in P.CASCADE:
        st = state.get(spec.name, {})
        if st.get("status") != "done" or spec.name not in reg:
            continue
        start = spec.start or "base"
        for dom in st.get("domains", []):
            after = reg[spec.name]["scores"].get(dom)
            before = reg.get(start, {}).get("scores", {}).get(dom)
            out.append({"stage": spec.name, "domain": dom, "start": start, "before": before,
                        "after": after,
                        "gain": None if before is None or after is None else after - before})
    return out


# --------------------------------------------------------------------------------------------
# Plots


def _plot_reward_per_domain(plt, cascade_dir, stages, reg, out):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    offset, colors = 0, {d: f"C{i}" for i, d in enumerate(D.DOMAINS)}
    labelled = set()
    for name in stages:
        rows = read_metrics(pathlib.Path(cascade_dir) / name)
        n = max([r["step"] for r in rows], default=0)
        for dom, (s, v) in domain_series(rows).items():
            ax1.plot(s + offset, v, color=colors[dom], label=None if dom in labelled else dom)
            labelled.add(dom)
        ax1.axvline(offset, color="0.8", lw=0.8)
        ax1.text(offset, 0.98, f" {name}", rotation=90, fontsize=7, va="top", color="0.4",
                 transform=ax1.get_xaxis_transform())
        offset += n
    ax1.set(xlabel="cumulative step", ylabel="training reward (batch mean)",
            title="training reward per domain along the cascade")
    if labelled:
        ax1.legend(fontsize=7)
    names, doms, rows = R.score_matrix(reg)
    on_line = [n for n in names if n in stages or n == "base"]
    for j, dom in enumerate(doms):
        ys = [rows[names.index(n)][j] for n in on_line]
        ax2.plot(range(len(on_line)), [np.nan if y is None else y for y in ys], "o-",
                 color=colors[dom], label=dom)
    ax2.set_xticks(range(len(on_line)), on_line, rotation=45, ha="right", fontsize=8)
    ax2.set(ylabel="eval score", title="eval score per domain after each stage")
    if doms:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_score_matrix(plt, reg, out):
    names, doms, rows = R.score_matrix(reg)
    m = np.array([[np.nan if v is None else v for v in r] for r in rows], float).reshape(len(names), len(doms))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(doms), 1), 1.0 + 0.45 * max(len(names), 1)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(doms)), doms, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(doms)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if m[i, j] < 0.6 else "k")
    ax.set_title("eval score per checkpoint (rows) and domain (columns)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_lines(plt, cascade_dir, stages, keys, ylabel, title, out):
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    any_data = False
    for ax, key in zip(axes[0], keys):
        offset = 0
        for i, name in enumerate(stages):
            rows = read_metrics(pathlib.Path(cascade_dir) / name)
            s, v = _series(rows, key)
            if len(s):
                ax.plot(s + offset, v, color=f"C{i % 10}", label=name)
                any_data = True
            offset += max([r["step"] for r in rows], default=0)
        ax.set(xlabel="cumulative step", ylabel=ylabel if key == keys[0] else None, title=key)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return any_data


def _time_split(cascade_dir, stages):
    """``{stage: {phase: seconds}}``: summed ``time/<phase>`` metrics, plus ``other`` = the
    stage's wall clock not covered by them (compile, checkpoints, eval)."""
    state = P.load_state(cascade_dir)["stages"]
    out = {}
    for name in stages:
        phases = {}
        for r in read_metrics(pathlib.Path(cascade_dir) / name):
            for k, v in r.items():
                m = _TIME_KEY.match(k)
                if m and v is not None and m["phase"] not in _TIME_TOTALS:
                    phases[m["phase"]] = phases.get(m["phase"], 0.0) + float(v)
        wall = state.get(name, {}).get("wall_s")
        if wall is not None:
            phases["other"] = max(float(wall) - sum(phases.values()), 0.0)
        if state.get(name, {}).get("eval_s") is not None:  # the cascade's all-domain eval
            phases["registry_eval"] = float(state[name]["eval_s"])
        out[name] = phases
    return out


def _plot_time_split(plt, split, out):
    phases = sorted({p for v in split.values() for p in v}, key=lambda p: (p in ("other", "registry_eval"), p))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bottom = np.zeros(len(split))
    for i, ph in enumerate(phases):
        vals = np.array([split[s].get(ph, 0.0) for s in split])
        ax.bar(list(split), vals, bottom=bottom, label=ph, color=f"C{i}")
        bottom += vals
    ax.set(ylabel="seconds", title="wall-clock per stage (train phases, other, registry eval)")
    ax.tick_params(axis="x", rotation=45)
    if phases:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_study(plt, study: dict, out):
    """``study['curves'][method][seed] = {"steps": [...], "scores": {domain: [...]}}``."""
    doms = study.get("domains") or sorted({d for m in study["curves"].values() for c in m.values()
                                           for d in c["scores"]})
    fig, axes = plt.subplots(1, len(doms), figsize=(4.2 * len(doms), 3.6), squeeze=False)
    for ax, dom in zip(axes[0], doms):
        for i, (method, seeds) in enumerate(sorted(study["curves"].items())):
            curves = [(np.array(c["steps"], float), np.array(c["scores"][dom], float))
                      for c in seeds.values() if dom in c["scores"]]
            if not curves:
                continue
            steps = curves[0][0]
            ys = np.stack([np.interp(steps, s, y) for s, y in curves])
            ax.plot(steps, ys.mean(0), color=f"C{i}", label=f"{method} (n={len(curves)})")
            ax.fill_between(steps, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.25)
        level = study.get("teacher_scores", {}).get(dom)
        if level is not None:
            ax.axhline(level, color="k", ls="--", lw=0.8, label="teacher")
        ax.set(xlabel="step", title=dom, ylabel="eval score" if dom == doms[0] else None)
        ax.legend(fontsize=7)
    fig.suptitle("MOPD vs GRPO from the same start (mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def _study_section(plt, sres: dict, png: pathlib.Path) -> list[str]:
    _plot_study(plt, sres, png)
    lines = ["## MOPD vs GRPO (study)", "",
             f"From `{sres.get('start', '?')}`, both methods for {sres.get('steps')} matched steps, "
             f"seeds {sres.get('seeds')}; claims declared in `claims.json` before the runs.", "",
             "| claim | verdict | numbers |", "|---|---|---|"]
    for v in sres.get("verdicts", []):
        lines.append(f"| {v['claim']} | {'held' if v['held'] else 'NOT held'} | {v['numbers']} |")
    if sres.get("regressions"):
        lines += ["", "Score change per domain from the start to the last step (seed mean; reported, "
                  "not asserted):", "", "| method | domain | start | end | change |", "|---|---|---|---|---|"]
        for r in sres["regressions"]:
            lines.append(f"| {r['method']} | {r['domain']} | {r['start']:.3f} | {r['end']:.3f} | "
                         f"{r['change']:+.3f} |")
    lines += ["", f"![MOPD vs GRPO]({png.name})", ""]
    return lines + L.ledger_lines()


def write_study_report(study_dir) -> pathlib.Path:
    """``<study_dir>/report.md`` with ``mopd_vs_grpo.png`` from ``study_result.json``."""
    sdir = pathlib.Path(study_dir)
    lines = ["# MOPD vs GRPO study", ""] + _study_section(
        _plt(), json.loads((sdir / "study_result.json").read_text()), sdir / "mopd_vs_grpo.png")
    path = sdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_report(cascade_dir, study_dir: Optional[str] = None, *, title: str = "Cascade report") -> pathlib.Path:
    """Write ``<cascade_dir>/report.md`` and its PNGs; returns the report's path."""
    plt = _plt()
    cdir = pathlib.Path(cascade_dir)
    stages = _stages(cdir)
    state = P.load_state(cdir)
    reg = R.load_registry(cdir / R.REGISTRY_FILE)
    lines = [f"# {title}", ""]
    if state.get("preset"):
        lines += [f"Preset `{state['preset']}`; cascade dir `{cdir.name}`; "
                  f"stage overrides: {', '.join(f'`{o}`' for o in state.get('overrides', [])) or 'none'}.", ""]

    lines += ["## Stages", "", "| stage | starts from | status | steps | wall s |", "|---|---|---|---|---|"]
    spec = {s.name: s for s in P.CASCADE}
    for name in stages:
        st = state["stages"][name]
        lines.append(f"| {name}{' (side branch)' if spec[name].branch else ''} | "
                     f"{spec[name].start or st.get('init', 'base')} | {st.get('status', '?')} | "
                     f"{st.get('steps', '–')} | {_fmt(st.get('wall_s'), 1)} |")
    total = sum(float(state["stages"][n].get("wall_s") or 0) for n in stages)
    lines += ["", f"Total wall-clock of the stages: {total:.1f} s.", ""]

    gains = own_domain_gains(cdir)
    if gains:
        lines += ["## Does each stage raise its own domains?", "",
                  "Eval score on the stage's own domains at its start checkpoint and after it.", "",
                  "| stage | domain | start | before | after | gain |", "|---|---|---|---|---|---|"]
        for g in gains:
            lines.append(f"| {g['stage']} | {g['domain']} | {g['start']} | {_fmt(g['before'])} | "
                         f"{_fmt(g['after'])} | {_fmt(g['gain'])} |")
        lines.append("")

    names, doms, rows = R.score_matrix(reg)
    if names:
        lines += ["## Score matrix (teachers.json)", "", "| checkpoint | " + " | ".join(doms) + " |",
                  "|---|" + "---|" * len(doms)]
        for n, r in zip(names, rows):
            lines.append(f"| {n} | " + " | ".join(_fmt(v) for v in r) + " |")
        if "assignment" in reg:
            a = reg["assignment"]
            lines += ["", f"MOPD teachers (policy `{a['policy'] if isinstance(a['policy'], str) else 'explicit'}`): "
                      + ", ".join(f"{d} → `{pathlib.Path(p).parent.name if pathlib.Path(p).name == 'hub' else p}`"
                                  for d, p in a["teachers"].items()) + "."]
        lines += ["", "![score matrix](score_matrix.png)", ""]
        _plot_score_matrix(plt, reg, cdir / "score_matrix.png")

    _plot_reward_per_domain(plt, cdir, stages, reg, cdir / "reward_per_domain.png")
    lines += ["## Reward per domain across stages", "", "![reward per domain](reward_per_domain.png)", ""]
    _plot_lines(plt, cdir, stages, list(_LEN_KEYS), "tokens", "response lengths", cdir / "response_lengths.png")
    lines += ["## Response lengths", "", "![response lengths](response_lengths.png)", ""]
    has_is = _plot_lines(plt, cdir, stages, list(_IS_KEYS), "", "train / rollout log-prob mismatch and IS weights",
                         cdir / "is_mismatch.png")
    lines += ["## Importance-sampling / mismatch statistics", "",
              "δ = log π_train − log π_rollout per token; weights and the corrected fraction follow the "
              "stage's `stage.is_correction`." + ("" if has_is else " (no IS metrics were logged)"), "",
              "![IS statistics](is_mismatch.png)", ""]
    has_kl = _plot_lines(plt, cdir, stages, ["reverse_kl", "kl_ref"], "nats / token",
                         "MOPD reverse KL to the teachers; RLHF KL to the stage start", cdir / "kl.png")
    if has_kl:
        lines += ["## KL terms", "", "![KL](kl.png)", ""]
    split = _time_split(cdir, stages)
    _plot_time_split(plt, split, cdir / "time_split.png")
    lines += ["## Time split per stage", "", "![time split](time_split.png)", ""]

    if study_dir is not None:
        lines += _study_section(plt, json.loads((pathlib.Path(study_dir) / "study_result.json").read_text()),
                                cdir / "mopd_vs_grpo.png")
    path = cdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
