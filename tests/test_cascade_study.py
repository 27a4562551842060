"""Study claims: declared before running, validated, and judged from hand-made seed curves."""

import json
import math
import pathlib

import pytest

from cascade_jax.cascade import ledger as L
from cascade_jax.cascade import study as S

S_PATH = pathlib.Path(__file__).resolve().parents[1] / "launch" / "studies" / "mopd_vs_grpo.json"

SPEC = {"claims": [
    {"name": "mopd_reaches_teacher_faster_math", "kind": "steps_to_teacher", "domain": "math",
     "tolerance": 0.05, "margin_steps": 2},
    {"name": "mopd_higher_at_matched_steps_mcq", "kind": "final_gain", "domain": "mcq", "margin": 0.1}],
    "domains": ["math", "mcq"], "steps": 6, "eval_every": 2, "seeds": [0, 1, 2]}


def _curves(mopd_math, grpo_math, mopd_mcq, grpo_mcq):
    steps = [0, 2, 4, 6]
    mk = lambda m, q: {"steps": steps, "scores": {"math": m, "mcq": q}}
    return {"mopd": {str(s): mk([v + 0.01 * (s - 1) for v in mopd_math], mopd_mcq) for s in range(3)},
            "grpo": {str(s): mk(grpo_math, [v + 0.01 * (s - 1) for v in grpo_mcq]) for s in range(3)}}


def test_verdicts_hand_computed():
    spec = S.spec_from_dict(SPEC)
    curves = _curves([0.2, 0.6, 0.8, 0.8], [0.2, 0.3, 0.5, 0.76], [0.3, 0.4, 0.5, 0.6], [0.3, 0.35, 0.4, 0.45])
    v = {x["claim"]: x for x in S.verdicts(spec, curves, {"math": 0.8})}
    # level 0.75; MOPD seed-mean reaches it at step 4, GRPO at step 6; 4 + 2 <= 6 -> held
    a = v["mopd_reaches_teacher_faster_math"]
    assert a["held"] and a["mopd_step"] == 4 and a["grpo_step"] == 6 and math.isclose(a["level"], 0.75)
    b = v["mopd_higher_at_matched_steps_mcq"]
    assert b["held"] and math.isclose(b["gain"], 0.6 - 0.45)
    # a margin of 3 steps is not met; a mcq margin of 0.2 is not met
    spec2 = S.spec_from_dict({**SPEC, "claims": [dict(SPEC["claims"][0], margin_steps=3),
                                                  dict(SPEC["claims"][1], margin=0.2)]})
    assert [x["held"] for x in S.verdicts(spec2, curves, {"math": 0.8})] == [False, False]
    # never reaching the level is not held and says so
    slow = _curves([0.2] * 4, [0.2] * 4, [0.3] * 4, [0.3] * 4)
    x = S.verdicts(spec, slow, {"math": 0.8})[0]
    assert not x["held"] and "MOPD reaches it at never" in x["numbers"]


def test_final_near_teacher_verdict_hand_computed():
    """Held iff MOPD's last seed mean >= teacher - tolerance; GRPO's curve plays no part."""
    spec = S.spec_from_dict({**SPEC, "claims": [
        {"name": "math_near", "kind": "final_near_teacher", "domain": "math", "tolerance": 0.05},
        {"name": "mcq_near", "kind": "final_near_teacher", "domain": "mcq", "tolerance": 0.05}]})
    # MOPD math seeds end 0.79 / 0.80 / 0.81 (mean 0.80); mcq ends 0.6 on every seed
    curves = _curves([0.2, 0.6, 0.8, 0.8], [0.9] * 4, [0.3, 0.4, 0.5, 0.6], [0.9] * 4)
    v = {x["claim"]: x for x in S.verdicts(spec, curves, {"math": 0.84, "mcq": 0.66})}
    assert v["math_near"]["held"] and math.isclose(v["math_near"]["level"], 0.79)
    assert not v["mcq_near"]["held"] and math.isclose(v["mcq_near"]["level"], 0.61)
    assert "MOPD 0.600" in v["mcq_near"]["numbers"] and "teacher 0.660" in v["mcq_near"]["numbers"]
    with pytest.raises(S.StudyError, match="no teacher score for domain 'mcq'"):
        S.verdicts(spec, curves, {"math": 0.84})


def test_regressions_reported():
    curves = _curves([0.2, 0.6, 0.8, 0.8], [0.2] * 4, [0.5, 0.4, 0.3, 0.2], [0.5] * 4)
    r = {(x["method"], x["domain"]): x for x in S.regressions(curves, ["math", "mcq"])}
    assert math.isclose(r[("mopd", "mcq")]["change"], -0.3)


@pytest.mark.parametrize("patch,match", [
    ({"claims": []}, "at least one claim"),
    ({"seeds": [0, 1]}, "at least 3 seeds"),
    ({"claims": [{"name": "a", "kind": "vibes", "domain": "math"}]}, "unknown claim kind 'vibes'"),
    ({"claims": [{"name": "a", "kind": "final_gain", "domain": "math"}]}, "missing margin"),
    ({"claims": [{"name": "a", "kind": "final_gain", "domain": "math", "margin": 0, "tol": 1}]},
     "unknown key\\(s\\) tol"),
    ({"claims": [{"name": "a", "kind": "final_gain", "domain": "code", "margin": 0}]},
     "domain 'code' is not among"),
    ({"stepz": 3}, "unknown key\\(s\\) stepz"),
    ({"claims": [{"name": "a", "kind": "final_near_teacher", "domain": "math", "margin": 0.1}]},
     "unknown key\\(s\\) margin"),
])
def test_bad_study_configs(patch, match):
    with pytest.raises(S.StudyError, match=match):
        S.spec_from_dict({**SPEC, **patch})


def test_claims_declared_before_and_frozen(tmp_path):
    spec = S.spec_from_dict(SPEC)
    S.declare(tmp_path, spec)
    decl = json.loads((tmp_path / "claims.json").read_text())
    assert decl["claims"][0]["margin_steps"] == 2
    S.declare(tmp_path, spec)  # same claims: fine (a resumed study)
    moved = S.spec_from_dict({**SPEC, "claims": [dict(SPEC["claims"][0], margin_steps=0)]})
    with pytest.raises(S.StudyError, match="declared different claims"):
        S.declare(tmp_path, moved)


def test_a_replication_on_other_seeds_declares_its_seeds(tmp_path):
    """``seeds=`` runs the same claims on another seed set: its ``claims.json`` names those seeds
    (so a study dir never mixes seed sets) and fewer than 3 or repeated seeds are refused."""
    spec = S.spec_from_dict(SPEC)
    S.declare(tmp_path / "a", spec, seeds=[3, 4, 5])
    decl = json.loads((tmp_path / "a" / "claims.json").read_text())
    assert decl["seeds"] == [3, 4, 5] and decl["claims"] == S.declare(tmp_path / "b", spec)["claims"]
    assert json.loads((tmp_path / "b" / "claims.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(S.StudyError, match="declared different claims"):
        S.declare(tmp_path / "a", spec)  # the declared seeds in a dir that ran 3, 4, 5
    for bad in ([3, 4], [3, 3, 4]):
        with pytest.raises(S.StudyError, match="at least 3 distinct seeds"):
            S.declare(tmp_path / "c", spec, seeds=bad)


def test_shipped_study_config_declares_claims():
    spec = S.load_spec(S_PATH)
    assert len(spec.seeds) >= 3 and {c.domain for c in spec.claims} <= set(spec.domains)
    assert any(c.kind == "steps_to_teacher" for c in spec.claims)


def test_eval_curve_from_runner_metrics(tmp_path):
    rows = [{"step": 1, "loss": 0.1}, {"step": 3, "eval/math/avg@4": 0.5, "eval/math/pass@4": 0.75,
                                       "eval/rlhf/avg@4": 0.25, "eval/score": 0.4},
            {"step": 6, "eval/math/avg@4": 0.75, "eval/rlhf/avg@4": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = S._eval_curve(tmp_path, ["math", "rlhf"], {"math": 0.1, "rlhf": 0.2})
    assert c == {"steps": [0, 3, 6], "scores": {"math": [0.1, 0.5, 0.75], "rlhf": [0.2, 0.25, 0.5]}}


def test_method_configs_differ_only_in_the_objective():
    from cascade_jax.cascade import plan as P

    base = P.load_stage_config("mopd", "tiny")
    t = {d: "/t/" + d for d in base.data.domains}
    m = S.method_config(base, "mopd", teachers=t, steps=6, eval_every=3, seed=1)
    g = S.method_config(base, "grpo", teachers=t, steps=6, eval_every=3, seed=1)
    assert m.stage.objective == "mopd" and m.stage.teachers == t and m.stage.is_correction == "icepop"
    assert g.stage.objective == "grpo" and g.stage.teachers == {} and g.stage.is_correction == "tis"
    for c in (m, g):
        assert c.stage.steps == 6 and c.eval.every == 3 and c.run.seed == 1 and c.data.shuffle_seed == 1
    assert m.optimizer == g.optimizer and m.rollout == g.rollout and m.data == g.data
    with pytest.raises(S.StudyError, match="unknown method 'ppo'"):
        S.method_config(base, "ppo", teachers=t, steps=1, eval_every=1, seed=0)


def test_grpo_overrides_apply_to_grpo_runs_only():
    """The shipped study gives GRPO its own cascade settings (groups of 8, its learning rate)
    while MOPD keeps the MOPD stage's; both spend 64 samples per step."""
    from cascade_jax.cascade import plan as P

    spec = S.load_spec(S_PATH)
    base = P.load_stage_config("mopd", "tiny")
    t = {d: "/t/" + d for d in base.data.domains}
    kw = dict(teachers=t, steps=4, eval_every=2, seed=0, overrides=spec.overrides,
              grpo_overrides=spec.grpo_overrides)
    m, g = S.method_config(base, "mopd", **kw), S.method_config(base, "grpo", **kw)
    assert (g.rollout.sampling.n_samples, g.data.batch_prompts, g.optimizer.lr) == (8, 8, 5e-4)
    assert (m.rollout.sampling.n_samples, m.data.batch_prompts) == (base.rollout.sampling.n_samples, base.data.batch_prompts)
    assert m.optimizer == base.optimizer
    assert m.rollout.sampling.n_samples * m.data.batch_prompts == g.rollout.sampling.n_samples * g.data.batch_prompts
    # the MOPD-only forward-KL term: the MOPD arm keeps the stage's, the GRPO arm has none
    assert (m.stage.forward_kl_coef, m.stage.teacher_topk) == (base.stage.forward_kl_coef,
                                                               base.stage.teacher_topk)
    assert (g.stage.forward_kl_coef, g.stage.teacher_topk) == (0.0, 0)


# --------------------------------------------------------------------------------------------
# The ledger: declared claims never move; every study and verdict stays on record.

STUDIES = S_PATH.parent


def test_every_shipped_study_is_declared_in_the_ledger_unchanged():
    ledger = L.load_ledger()
    files = sorted(p for p in STUDIES.glob("*.json") if p.name != L.LEDGER_PATH.name)
    assert files, "no shipped study"
    for path in files:
        spec = S.load_spec(path)
        entry = L.check_declared(spec, ledger)
        assert entry is not None, f"{path.name}: not in the ledger"
        assert entry["status"] == "active" and entry["file"] == path.name
        assert S.spec_from_dict(entry["spec"], name=spec.name) == spec
    active = {e["file"] for e in ledger.values() if e["status"] == "active"}
    assert active == {p.name for p in files}


def test_ledger_entries_are_consistent():
    """Each entry's recorded fingerprint is that of its stored spec, every run judges exactly the
    study's claims, and a superseded study names a study of the ledger."""
    ledger = L.load_ledger()
    for name, e in ledger.items():
        spec = S.spec_from_dict(e["spec"], name=name)
        assert L.fingerprint(spec) == e["fingerprint"], name
        claims = {c.name for c in spec.claims}
        for r in e["runs"]:
            assert set(r["verdicts"]) == claims, (name, r["date"])
            assert all(v["held"] in (True, False, None) for v in r["verdicts"].values())
        if e["status"] == "superseded":
            assert e["superseded_by"] in ledger


def test_a_moved_claim_is_refused_before_anything_runs(tmp_path):
    """The shipped study with one margin changed (or the steps it is judged at) keeps its name:
    refused, and nothing is written; under a new name it is a new study and runs."""
    d = json.loads(S_PATH.read_text())
    moved = dict(d, claims=[dict(d["claims"][0], margin_steps=d["claims"][0]["margin_steps"] - 1)]
                 + d["claims"][1:])
    for variant in (moved, dict(d, steps=d["steps"] + 4)):
        path = tmp_path / S_PATH.name
        path.write_text(json.dumps(variant))
        with pytest.raises(S.StudyError, match="mopd_vs_grpo.*differ from those declared in the study ledger"):
            S.declare(tmp_path / "run", S.load_spec(path))
        assert not (tmp_path / "run").exists()
    renamed = tmp_path / "mopd_vs_grpo_fewer_steps.json"
    renamed.write_text(json.dumps(moved))
    S.declare(tmp_path / "run", S.load_spec(renamed))
    assert (tmp_path / "run" / "claims.json").exists()
    # formatting and key order do not change the fingerprint
    path = tmp_path / S_PATH.name
    path.write_text(json.dumps(dict(reversed(list(d.items()))), indent=None))
    assert L.fingerprint(S.load_spec(path)) == L.fingerprint(S.load_spec(S_PATH))


def test_report_lists_every_declared_study_with_failed_verdicts():
    text = "\n".join(L.ledger_lines())
    for name, e in L.load_ledger().items():
        assert f"### `{name}` ({e['status']}" in text
        for c in e["spec"]["claims"]:
            assert f"`{c['name']}`" in text
    assert "No run recorded." in text  # the first declaration, never run
    assert text.count("NOT held") >= 5  # the failed verdicts stay in the report


def test_malformed_ledger_is_an_error_naming_the_entry(tmp_path):
    bad = tmp_path / "ledger.json"
    bad.write_text(json.dumps({"studies": [{"name": "x", "status": "active"}]}))
    with pytest.raises(L.LedgerError, match=r"studies\[0\]: missing 'spec'"):
        L.load_ledger(bad)
    bad.write_text(json.dumps({"studies": [{"name": "x", "status": "draft", "spec": {}, "fingerprint": "",
                                            "runs": [], "declared": {}}]}))
    with pytest.raises(L.LedgerError, match=r"studies\[0\]\.status: 'draft'"):
        L.load_ledger(bad)
