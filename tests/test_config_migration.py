"""The rollout section split by reader (``rollout.sampling`` / ``batching`` / ``servers`` /
``sync`` / ``fidelity``): an old flat key is an error naming its new place, a run dir written in
the old layout resumes (migrated, with a logged line) or is refused naming the new key, and
``launch/migrate_config.py`` rewrites config files, run dirs and dotted keys in text.

The old layout is written out here by hand (:data:`OLD_FLAT`, the 31 flat fields the rollout
section had), independently of :data:`cascade_jax.config.ROLLOUT_MOVED`."""

import dataclasses
import json

import pytest

from cascade_jax import config as C
from cascade_jax.runner.errors import RunDirError
from cascade_jax.runner.loop import check_run_dir
from launch import migrate_config as M

#: the flat rollout section before the split: key -> (section, new leaf), written by hand
OLD_FLAT = {
    "n_samples": ("sampling", "n_samples"), "max_prompt_len": ("sampling", "max_prompt_len"),
    "max_response_len": ("sampling", "max_response_len"), "temperature": ("sampling", "temperature"),
    "top_p": ("sampling", "top_p"), "top_k": ("sampling", "top_k"), "thinking": ("sampling", "thinking"),
    "seed": ("sampling", "seed"),
    "num_slots": ("batching", "num_slots"), "steps_per_call": ("batching", "steps_per_call"),
    "prefill_sizes": ("batching", "prefill_sizes"), "prefill_chunk": ("batching", "prefill_chunk"),
    "server_url": ("servers", "url"), "server_urls": ("servers", "urls"),
    "router_url": ("servers", "router_url"), "api_key": ("servers", "api_key"),
    "max_concurrency": ("servers", "max_concurrency"), "request_timeout_s": ("servers", "request_timeout_s"),
    "max_retries": ("servers", "max_retries"),
    "weight_sync": ("sync", "method"), "weight_sync_dir": ("sync", "dir"),
    "keep_versions": ("sync", "keep_versions"), "sync_timeout_s": ("sync", "timeout_s"),
    "sync_tol": ("sync", "tol"), "nccl_backend": ("sync", "nccl_backend"),
    "nccl_master_address": ("sync", "nccl_master_address"), "nccl_master_port": ("sync", "nccl_master_port"),
    "nccl_bucket_mb": ("sync", "nccl_bucket_mb"),
    "routing_replay": ("fidelity", "routing_replay"), "zero_mismatch": ("fidelity", "zero_mismatch"),
}

#: a non-default value of every old flat key (a served run: every section is read)
OLD_VALUES = {
    "n_samples": 4, "max_prompt_len": 64, "max_response_len": 32, "temperature": 0.7, "top_p": 1.0,
    "top_k": -1, "thinking": False, "seed": 3, "num_slots": 8, "steps_per_call": 4, "prefill_sizes": [1],
    "prefill_chunk": 16, "server_url": "http://a:1", "server_urls": ["http://b:2"],
    "router_url": "http://r:3", "api_key": "k", "max_concurrency": 2, "request_timeout_s": 9.0,
    "max_retries": 1, "weight_sync": "nccl", "weight_sync_dir": "/w", "keep_versions": 3,
    "sync_timeout_s": 8.0, "sync_tol": 0.01, "nccl_backend": "gloo", "nccl_master_address": "10.0.0.1",
    "nccl_master_port": 1234, "nccl_bucket_mb": 64, "routing_replay": True, "zero_mismatch": True,
}


def _old_config_dict() -> dict:
    """A whole config dict as a run dir stored it before the split (flat rollout keys)."""
    d = C.to_dict(C.Config())
    d["rollout"] = {"engine": "jax_server", **OLD_VALUES, "max_policy_lag": 1}
    return d


def _new_config() -> C.Config:
    """The same config in today's layout, built section by section."""
    sec = {}
    for old, (section, leaf) in OLD_FLAT.items():
        sec.setdefault(section, {})[leaf] = OLD_VALUES[old]
    return C.from_dict(C.Config, {"rollout": {"engine": "jax_server", "max_policy_lag": 1, **sec}})


def test_the_table_moves_every_old_key_to_a_field_of_its_section():
    assert set(C.ROLLOUT_MOVED) == set(OLD_FLAT) and len(OLD_FLAT) == 30
    for old, (section, leaf) in OLD_FLAT.items():
        assert C.ROLLOUT_MOVED[old] == f"{section}.{leaf}", old
    # every field of every section is the target of exactly one old key; nothing else is left flat
    sections = {f.name: f.type for f in dataclasses.fields(C.RolloutConfig)}
    assert set(sections) == {"engine", "sampling", "batching", "servers", "sync", "fidelity", "max_policy_lag"}
    targets = sorted(C.ROLLOUT_MOVED.values())
    fields = sorted(f"{s}.{f.name}" for s in ("sampling", "batching", "servers", "sync", "fidelity")
                    for f in dataclasses.fields(getattr(C.RolloutConfig(), s)))
    assert targets == fields


def test_an_old_flat_key_is_an_error_naming_its_new_key():
    for old, (section, leaf) in OLD_FLAT.items():
        want = f"rollout.{old} moved to rollout.{section}.{leaf} "
        value = OLD_VALUES[old]
        with pytest.raises(C.ConfigError, match=want.replace(".", r"\.")):
            C.from_dict(C.Config, {"rollout": {old: value}})
        with pytest.raises(C.ConfigError, match=want.replace(".", r"\.")):
            C.apply_overrides(C.Config(), [f"rollout.{old}={json.dumps(value)}"])
        with pytest.raises(C.ConfigError, match=want.replace(".", r"\.")):
            C.replace_path(C.Config(), f"rollout.{old}", value)
    with pytest.raises(C.ConfigError, match="launch/migrate_config.py"):  # and says how to migrate
        C.from_dict(C.RolloutConfig, {"temperature": 0.5})
    with pytest.raises(C.ConfigError, match=r"unknown key 'rollout\.sampling\.temprature'; valid keys of "
                                            r"rollout\.sampling: max_prompt_len"):
        C.apply_overrides(C.Config(), ["rollout.sampling.temprature=0.6"])
    with pytest.raises(C.ConfigError, match=r"unknown key 'rollout\.temprature'"):
        C.from_dict(C.Config, {"rollout": {"temprature": 0.6}})


def test_new_keys_load_from_overrides_and_files(tmp_path):
    cfg = C.apply_overrides(C.Config(), ["rollout.sampling.temperature=0.6", "rollout.batching.num_slots=8",
                                         "rollout.sync.method=nccl", "rollout.fidelity.routing_replay=true"])
    r = cfg.rollout
    assert (r.sampling.temperature, r.batching.num_slots, r.sync.method, r.fidelity.routing_replay) == (
        0.6, 8, "nccl", True)
    assert C.replace_path(cfg, "rollout.servers.max_retries", 0).rollout.servers.max_retries == 0
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rollout": {"sampling": {"top_k": 5}, "servers": {"urls": ["http://h:1"]}}}))
    loaded = C.load(str(path))
    assert loaded.rollout.sampling.top_k == 5 and loaded.rollout.servers.urls == ("http://h:1",)


@pytest.mark.parametrize("override, match", [
    ("rollout.sampling.top_p=0", r"^rollout\.sampling\.top_p: must be in \(0, 1\], got 0"),
    ("rollout.sampling.n_samples=0", r"^rollout\.sampling\.n_samples: must be >= 1"),
    ("rollout.batching.prefill_sizes=[128]", r"^rollout\.batching\.prefill_sizes\[0\]: must be an integer in "
                                             r"\[1, rollout\.batching\.num_slots=64\]"),
    ("rollout.servers.router_url=ftp://x", r"^rollout\.servers\.router_url: expected an http\(s\):// URL"),
    ("rollout.sync.tol=0", r"^rollout\.sync\.tol: must be > 0"),
    ("rollout.sync.method=rdma", r"^rollout\.sync\.method: must be one of \['disk', 'nccl'\]"),
    ("rollout.fidelity.zero_mismatch=1", r"^rollout\.fidelity\.zero_mismatch: expected bool"),
])
def test_validation_names_the_full_dotted_path(override, match):
    with pytest.raises(C.ConfigError, match=match):
        C.apply_overrides(C.Config(), [override])
    key, value = override.split("=")
    with pytest.raises(C.ConfigError, match=match):
        C.replace_path(C.Config(), key, C.parse_value(value))


def test_cross_section_checks_name_the_new_keys():
    with pytest.raises(C.ConfigError, match=r"^rollout\.servers\.url: required \(or rollout\.servers\.urls\)"):
        C.from_dict(C.Config, {"rollout": {"engine": "sglang"}})
    with pytest.raises(C.ConfigError, match=r"^rollout\.fidelity\.zero_mismatch: .* needs rollout\.sampling\.top_p 1"):
        C.apply_overrides(C.Config(), ["rollout.fidelity.zero_mismatch=true", "rollout.sampling.top_p=0.9"])


def test_migrate_dict_moves_every_old_key():
    old = _old_config_dict()
    assert C.migrate_dict(old) == C.to_dict(_new_config())
    assert old["rollout"]["temperature"] == 0.7  # the input is kept
    assert sorted(C.moved_keys(old)) == sorted(
        (f"rollout.{k}", f"rollout.{s}.{f}") for k, (s, f) in OLD_FLAT.items())
    assert C.moved_keys(C.to_dict(_new_config())) == []
    assert C.migrate_dict(C.to_dict(_new_config())) == C.to_dict(_new_config())  # idempotent
    both = {"rollout": {"temperature": 0.5, "sampling": {"temperature": 0.6}}}
    with pytest.raises(C.ConfigError, match=r"rollout\.temperature: cannot move to rollout\.sampling\.temperature"):
        C.migrate_dict(both)


def test_migrate_override_for_stored_declarations():
    """A study's declared overrides never change once run (the ledger fingerprints them); they are
    applied at the new keys."""
    assert C.migrate_override("rollout.n_samples=8") == "rollout.sampling.n_samples=8"
    assert C.migrate_override("rollout.weight_sync=nccl") == "rollout.sync.method=nccl"
    for same in ("rollout.engine=jax", "rollout.sampling.top_p=0.9", "optimizer.lr=1e-3", "rollout.x=1"):
        assert C.migrate_override(same) == same
    cfg = C.apply_overrides(C.Config(), [C.migrate_override("rollout.n_samples=8")])
    assert cfg.rollout.sampling.n_samples == 8


def _old_run_dir(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "run_config.json").write_text(json.dumps(_old_config_dict(), indent=2))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a started run (runner.loop.started)
    return tmp_path


def test_run_dir_in_the_old_layout_resumes_with_a_logged_line(tmp_path):
    run_dir, lines = _old_run_dir(tmp_path), []
    assert check_run_dir(_new_config(), run_dir, log=lines.append) is True
    assert len(lines) == 1 and "layout before the rollout sections; migrated (30 key(s): " in lines[0]
    assert "rollout.n_samples -> rollout.sampling.n_samples" in lines[0]
    # a real difference is still refused, named by its new key
    other = C.replace_path(_new_config(), "rollout.sampling.temperature", 0.5)
    with pytest.raises(RunDirError, match=r"differs in rollout\.sampling\.temperature\)"):
        check_run_dir(other, run_dir)
    broken = _old_config_dict()
    broken["rollout"]["sampling"] = {"temperature": 0.1}
    (run_dir / "run_config.json").write_text(json.dumps(broken))
    with pytest.raises(RunDirError, match=r"rollout\.temperature: cannot move to rollout\.sampling\.temperature"):
        check_run_dir(_new_config(), run_dir)
    (run_dir / "checkpoints" / "1").rmdir()  # a run that never checkpointed is started over
    assert check_run_dir(_new_config(), run_dir) is False


def test_migrate_config_rewrites_run_dirs_config_files_and_text(tmp_path, capsys):
    run_dir = _old_run_dir(tmp_path / "run")
    assert M.main(["--check", str(run_dir)]) == 1
    assert M.main([str(run_dir)]) == 0 and "migrated" in capsys.readouterr().out
    assert C.from_dict(C.Config, json.loads((run_dir / "run_config.json").read_text())) == _new_config()
    assert M.main(["--check", str(run_dir)]) == 0
    lines = []
    assert check_run_dir(_new_config(), run_dir, log=lines.append) is True and lines == []
    # a config file extending a base: both migrated, composed to the same config
    (tmp_path / "base.json").write_text(json.dumps({"rollout": {"n_samples": 2, "top_p": 0.9}}, indent=2) + "\n")
    (tmp_path / "stage.json").write_text(json.dumps({"base": "base.json", "rollout": {"server_url": "http://a:1"},
                                                     "stage": {"steps": 3}}, indent=2) + "\n")
    assert M.main([str(tmp_path / "base.json"), str(tmp_path / "stage.json")]) == 0
    cfg = C.load(str(tmp_path / "stage.json"))
    assert (cfg.rollout.sampling.n_samples, cfg.rollout.sampling.top_p, cfg.rollout.servers.url) == (
        2, 0.9, "http://a:1")
    assert json.loads((tmp_path / "stage.json").read_text())["base"] == "base.json"


def test_migrate_text_rewrites_dotted_keys_but_not_modules():
    text = ("--set rollout.temperature=0.6 cfg.rollout.server_urls rollout.weight_sync_dir "
            "rollout.weight_sync (cascade_jax.rollout.weight_sync) rollout/weight_sync.py rollout.engine "
            "rollout.max_policy_lag rollout.top_p_x")
    assert M.migrate_text(text) == (
        "--set rollout.sampling.temperature=0.6 cfg.rollout.servers.urls rollout.sync.dir "
        "rollout.sync.method (cascade_jax.rollout.weight_sync) rollout/weight_sync.py rollout.engine "
        "rollout.max_policy_lag rollout.top_p_x")
    assert M.migrate_text(M.migrate_text(text)) == M.migrate_text(text)
