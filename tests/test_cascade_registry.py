"""Teacher registry: teachers.json round trip, the paper / best / explicit policies, clear errors."""

import json

import pytest

from cascade_jax.cascade import registry as R


def _mk(tmp_path):
    path = tmp_path / R.REGISTRY_FILE
    scores = {
        "sft": {"math": 0.70, "instruction_following": 0.20, "mcq": 0.30, "rlhf": 0.40},
        "if_rl": {"math": 0.60, "instruction_following": 0.80, "mcq": 0.30, "rlhf": 0.30},
        "rlhf_teacher": {"math": 0.65, "instruction_following": 0.20, "rlhf": 0.90},
        "multi_domain_rl": {"math": 0.55, "instruction_following": 0.75, "mcq": 0.85,
                            "tool_call": 0.5, "structured_output": 0.6, "rlhf": 0.3},
    }
    for name, s in scores.items():
        (tmp_path / name / "hub").mkdir(parents=True)
        R.register_checkpoint(path, name, str(tmp_path / name / "hub"), s)
    return path


def test_round_trip_relative_paths_and_matrix(tmp_path):
    path = _mk(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["checkpoints"]["sft"]["checkpoint"] == "sft/hub"  # relative to the cascade dir
    reg = R.load_registry(path)
    names, doms, rows = R.score_matrix(reg)
    assert names == ["sft", "if_rl", "rlhf_teacher", "multi_domain_rl"]
    # canonical domain order, only scored domains
    assert doms == ["instruction_following", "mcq", "tool_call", "structured_output", "math", "rlhf"]
    assert rows[0] == [0.20, 0.30, None, None, 0.70, 0.40]
    assert rows[3][doms.index("mcq")] == 0.85


def test_paper_assignment(tmp_path):
    reg = R.load_registry(_mk(tmp_path))
    doms = ["math", "instruction_following", "tool_call", "mcq", "structured_output", "rlhf"]
    t = R.assign_teachers(reg, doms, "paper", reg_dir=tmp_path)
    assert t == {"math": str(tmp_path / "sft/hub"), "rlhf": str(tmp_path / "rlhf_teacher/hub"),
                 **{d: str(tmp_path / "multi_domain_rl/hub")
                    for d in ["instruction_following", "tool_call", "mcq", "structured_output"]}}


def test_best_assignment_and_tie_goes_to_earlier(tmp_path):
    path = _mk(tmp_path)
    reg = R.load_registry(path)
    t = R.assign_teachers(reg, ["math", "instruction_following", "mcq", "rlhf"], "best",
                          reg_dir=tmp_path)
    assert t["math"].endswith("sft/hub")
    assert t["instruction_following"].endswith("if_rl/hub")
    assert t["mcq"].endswith("multi_domain_rl/hub")
    assert t["rlhf"].endswith("rlhf_teacher/hub")
    # tie on mcq between sft and if_rl (both 0.30) if multi_domain_rl is dropped: earlier wins
    del reg["checkpoints"]["multi_domain_rl"]
    assert R.assign_teachers(reg, ["mcq"], "best", reg_dir=tmp_path)["mcq"].endswith("sft/hub")


def test_explicit_map(tmp_path):
    reg = R.load_registry(_mk(tmp_path))
    t = R.assign_teachers(reg, ["math", "rlhf"], {"math": "if_rl", "rlhf": "sft"}, reg_dir=tmp_path)
    assert t == {"math": str(tmp_path / "if_rl/hub"), "rlhf": str(tmp_path / "sft/hub")}


@pytest.mark.parametrize("domains,policy,match", [
    (["maths"], "paper", "unknown domain 'maths'"),
    (["code"], "paper", "domain 'code' has no teacher in the paper"),
    (["tool_call"], "best", ""),  # scored by multi_domain_rl only -> fine
    (["swe"], "best", "no registered checkpoint has a score for domain 'swe'"),
    (["math"], {"math": "nope"}, "checkpoint 'nope' is not in the registry"),
    (["math", "mcq"], {"math": "sft"}, "no teacher for domain\\(s\\) mcq"),
    (["math"], {"mathh": "sft", "math": "sft"}, "unknown domain 'mathh'"),
    (["math"], "median", "unknown teacher policy"),
])
def test_bad_requests_name_the_problem(tmp_path, domains, policy, match):
    reg = R.load_registry(_mk(tmp_path))
    if not match:
        R.assign_teachers(reg, domains, policy, reg_dir=tmp_path)
        return
    with pytest.raises(R.RegistryError, match=match):
        R.assign_teachers(reg, domains, policy, reg_dir=tmp_path)


def test_missing_checkpoint_dir_is_an_error(tmp_path):
    path = _mk(tmp_path)
    (tmp_path / "sft/hub").rmdir()
    reg = R.load_registry(path)
    with pytest.raises(R.RegistryError, match="checkpoint directory .*sft/hub \\(sft\\) does not exist"):
        R.assign_teachers(reg, ["math"], "paper", reg_dir=tmp_path)
    # paper policy needs the side branch: a registry without it names the missing checkpoint
    del reg["checkpoints"]["rlhf_teacher"]
    with pytest.raises(R.RegistryError, match="'rlhf_teacher' is not in the registry"):
        R.assign_teachers(reg, ["rlhf"], "paper", reg_dir=tmp_path)


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"version": 2, "checkpoints": {}}', "version"),
    ('{"version": 1, "checkpoints": {"a": {"checkpoint": "x", "scores": {"chess": 1}}}}',
     "checkpoints.a.scores: unknown domain 'chess'"),
    ('{"version": 1, "checkpoints": {"a": {"checkpoint": "x", "scores": {"math": "hi"}}}}',
     "checkpoints.a.scores.math: expected a number"),
    ('{"version": 1, "checkpoints": {"a": {"scores": {}}}}', "checkpoints.a.checkpoint"),
])
def test_bad_registry_file(tmp_path, content, match):
    p = tmp_path / "teachers.json"
    p.write_text(content)
    with pytest.raises(R.RegistryError, match=match):
        R.load_registry(p)


def test_record_assignment(tmp_path):
    path = _mk(tmp_path)
    R.record_assignment(path, "paper", {"math": "sft/hub"})
    assert R.load_registry(path)["assignment"] == {"policy": "paper", "teachers": {"math": "sft/hub"}}
    assert "sft" in R.load_registry(path)["checkpoints"]  # checkpoints kept
