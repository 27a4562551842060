"""report.md and its plots from synthetic run dirs in the runner's format (metrics.jsonl rows
``{"step": s, ...}``, the cascade state file, teachers.json, a study result)."""

import json

import numpy as np

from cascade_jax.cascade import plan as P
from cascade_jax.cascade import registry as R
from cascade_jax.cascade import report as Rep


def _synthetic_cascade(tmp_path, stages=("sft", "rlhf_teacher", "if_rl", "multi_domain_rl")):
    doms = {"sft": ["math", "mcq"], "rlhf_teacher": ["rlhf"], "if_rl": ["instruction_following"],
            "multi_domain_rl": ["mcq", "tool_call"]}
    rng = np.random.default_rng(0)
    R.register_checkpoint(tmp_path / R.REGISTRY_FILE, "base", str(tmp_path / "base"),
                          {d: 0.05 for d in ["math", "mcq", "rlhf", "instruction_following", "tool_call"]})
    for k, name in enumerate(stages):
        run = tmp_path / name
        run.mkdir()
        with open(run / "metrics.jsonl", "w") as f:
            for s in range(1, 6):
                row = {"step": s, "reward_mean": 0.1 * s, "resp_len_mean": 10 + s, "resp_len_max": 20 + s,
                       "is_abs_delta_mean": 1e-3, "is_abs_delta_max": 1e-2, "is_frac_corrected": 0.0,
                       "is_weight_mean": 1.0, "time/rollout_s": 0.5, "time/update_s": 0.25,
                       "time/step_s": 0.75}
                row.update({f"reward/{d}": float(rng.uniform()) for d in doms[name]})
                f.write(json.dumps(row) + "\n")
            f.write('{"step": 6, "rew')  # a line cut by a kill
        scores = {d: 0.1 + 0.1 * k + (0.3 if d in doms[name] else 0.0)
                  for d in ["math", "mcq", "rlhf", "instruction_following", "tool_call"]}
        R.register_checkpoint(tmp_path / R.REGISTRY_FILE, name, str(run / "hub"), scores)
        P.update_stage_state(tmp_path, name, status="done", steps=5, wall_s=10.0 + k,
                             domains=doms[name])
    return tmp_path


def test_read_metrics_skips_cut_lines_and_finds_domain_keys(tmp_path):
    d = _synthetic_cascade(tmp_path)
    rows = Rep.read_metrics(d / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    series = Rep.domain_series(rows)
    assert set(series) == {"math", "mcq"} and list(series["math"][0]) == [1, 2, 3, 4, 5]


def test_own_domain_gains(tmp_path):
    d = _synthetic_cascade(tmp_path)
    g = {(x["stage"], x["domain"]): x for x in Rep.own_domain_gains(d)}
    # if_rl (k=2) starts from sft (k=0): IF 0.1+0.2+0.3=0.6 vs sft's 0.1 -> +0.5
    assert g[("if_rl", "instruction_following")]["start"] == "sft"
    np.testing.assert_allclose(g[("if_rl", "instruction_following")]["gain"], 0.5, atol=1e-12)
    # sft starts from the base entry
    np.testing.assert_allclose(g[("sft", "math")]["gain"], 0.4 - 0.05, atol=1e-12)


def test_write_report_with_study(tmp_path):
    d = _synthetic_cascade(tmp_path / "c")
    study = tmp_path / "study"
    study.mkdir()
    curves = {m: {str(s): {"steps": [0, 2, 4], "scores": {"math": [0.2, 0.3 + 0.01 * s, 0.4]}}
                  for s in range(3)} for m in ("mopd", "grpo")}
    (study / "study_result.json").write_text(json.dumps({
        "seeds": [0, 1, 2], "steps": 4, "domains": ["math"], "curves": curves,
        "teacher_scores": {"math": 0.45},
        "verdicts": [{"claim": "mopd_faster_math", "held": True, "numbers": "2 vs 4 steps"}]}))
    path = Rep.write_report(d, study)
    text = path.read_text()
    for png in ["score_matrix", "reward_per_domain", "response_lengths", "is_mismatch",
                "time_split", "mopd_vs_grpo"]:
        assert f"({png}.png)" in text
        data = (d / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "| if_rl | instruction_following | sft | 0.100 | 0.600 | 0.500 |" in text
    assert "| mopd_faster_math | held | 2 vs 4 steps |" in text
    sp = Rep.write_study_report(study)
    assert "| mopd_faster_math | held | 2 vs 4 steps |" in sp.read_text() and (study / "mopd_vs_grpo.png").exists()
    assert "| rlhf_teacher (side branch) | sft | done | 5 | 11.0 |" in text
    # time split: 5 steps x 0.75 s logged, the rest of the 10 s wall clock is "other"
    split = Rep._time_split(d, ["sft"])
    assert "registry_eval" not in split["sft"]  # no eval_s recorded in this synthetic state
    np.testing.assert_allclose([split["sft"]["rollout"], split["sft"]["update"], split["sft"]["other"]],
                               [2.5, 1.25, 6.25])
