"""Cascade plan: stage order, per-stage config wiring, the state file, and every 30B stage config
building and validating without allocating (abstract params + optimizer state via eval_shape)."""

import json

import jax
import pytest

from cascade_jax import config as C
from cascade_jax.cascade import plan as P


def test_order_is_the_papers_with_the_side_branch_before_mopd():
    main = [s.name for s in P.CASCADE if not s.branch]
    assert main == ["sft", "if_rl", "multi_domain_rl", "mopd", "rlhf", "long_context_rl",
                    "code_rl", "swe_rl"]
    spec = {s.name: s for s in P.CASCADE}
    assert spec["rlhf_teacher"].start == "sft" and spec["rlhf_teacher"].branch
    # each main-line stage starts from the previous main-line stage
    assert [spec[n].start for n in main] == [None] + main[:-1]
    names = list(P.STAGE_NAMES)
    assert names.index("rlhf_teacher") < names.index("mopd")


def test_stage_config_wiring(tmp_path):
    cfg = P.stage_config("mopd", preset="nano-30b-a3b", cascade_dir=tmp_path,
                         start_checkpoint="/ck/mdrl", teachers={"math": "/ck/sft"},
                         overrides=["stage.steps=3"])
    assert cfg.run.out_dir == str(tmp_path / "mopd") and cfg.model.checkpoint == "/ck/mdrl"
    assert cfg.stage.teachers == {"math": "/ck/sft"} and cfg.stage.steps == 3
    assert cfg.optimizer.lr == 2e-6  # from configs/mopd.json
    with pytest.raises(C.ConfigError, match="unknown cascade stage 'ppo'"):
        P.stage_config("ppo", cascade_dir=tmp_path)
    with pytest.raises(C.ConfigError, match="unknown cascade preset 'huge'"):
        P.stage_config("sft", preset="huge", cascade_dir=tmp_path)
    with pytest.raises(C.ConfigError, match="stage.stepz"):
        P.stage_config("sft", preset="nano-30b-a3b", cascade_dir=tmp_path, overrides=["stage.stepz=1"])


def test_state_file_round_trip_and_errors(tmp_path):
    assert P.load_state(tmp_path) == {"version": 1, "stages": {}}
    P.update_stage_state(tmp_path, "sft", status="running")
    P.update_stage_state(tmp_path, "sft", status="done", hub="sft/hub")
    assert P.load_state(tmp_path)["stages"]["sft"] == {"status": "done", "hub": "sft/hub"}
    (tmp_path / P.STATE_FILE).write_text("{")
    with pytest.raises(C.ConfigError, match="not valid JSON"):
        P.load_state(tmp_path)
    (tmp_path / P.STATE_FILE).write_text(json.dumps({"version": 1, "stages": {"ppo": {}}}))
    with pytest.raises(C.ConfigError, match="unknown stage\\(s\\) ppo"):
        P.load_state(tmp_path)


@pytest.mark.parametrize("name", P.STAGE_NAMES)
def test_30b_stage_config_builds_without_allocating(name):
    """Config validates, the model builds abstractly, the optimizer state has a shape."""
    from models import nemotron_h as nh
    from cascade_jax import rl

    from cascade_jax.runner.build import validate

    cfg = P.load_stage_config(name, "nano-30b-a3b")
    assert cfg.stage.name == name and cfg.model.preset == "nano-30b-a3b"
    # the runner's cross-field validation (lengths vs the model's context, domains, sampling);
    # MOPD's teacher dirs are filled in by the cascade from teachers.json, so not checked here
    validate(C.replace_path(cfg, "stage.teachers", {}))
    mcfg = nh.with_overrides(nh.preset(cfg.model.preset), **cfg.model.overrides)
    params = nh.abstract_params(mcfg, jax.numpy.float32)
    specs = nh.param_specs(mcfg)
    tx = rl.make_optimizer(cfg.optimizer, specs)
    opt_state = jax.eval_shape(tx.init, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 31e9 < n < 33e9  # Nemotron-3-Nano-30B-A3B: ~31.6B total
    assert jax.tree.leaves(opt_state)


def test_tiny_stage_configs_share_shapes():
    """The tiny RL stages generate and train on two row shapes only, so the compiled programs are
    shared across stages (persistent compilation cache): stages with the tool_call domain need
    prompts of 384 tokens (its tool-declaring system prompt is ~354 tiny tokens), the others
    128 (padding every stage to 384 would cost ~2.5x the train-step time). Every stage trains
    on 64 rows per step except if_rl, which draws 16 prompts per step (128 rows; at 8 it
    learned on some seeds only: docs/mopd.md §2) and so compiles its own train step."""
    shapes = set()
    for name in P.STAGE_NAMES:
        cfg = P.load_stage_config(name, "tiny")
        assert cfg.stage.name == name and cfg.model.preset == "tiny"
        ref = P.load_stage_config(name, "nano-30b-a3b")
        assert cfg.stage.objective == ref.stage.objective
        assert cfg.data.domains == ref.data.domains  # same domains as the 30B stage
        assert cfg.stage.kl_coef == ref.stage.kl_coef and cfg.stage.is_correction == ref.stage.is_correction
        if cfg.stage.objective != "sft":
            r = cfg.rollout.sampling
            shapes.add((r.max_prompt_len, r.max_response_len, cfg.data.batch_prompts * r.n_samples))
            assert r.max_prompt_len == (384 if "tool_call" in cfg.data.domains else 128), name
    assert shapes == {(128, 48, 64), (384, 48, 64), (128, 48, 128)}, shapes  # (prompt, response, rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", P.STAGE_NAMES)
def test_30b_stage_config_plans(name):
    """The sharding planner compiles the stage's train step for the 30B model ahead of time on 8
    simulated devices (fsdp) at the stage's sequence length, without allocating weights.

    The SFT stage's 262144-token rows run the blockwise XLA attention
    (``kernels.XLA_BLOCKWISE_MIN_KEYS``; the full-score form cannot be compiled by XLA:CPU from
    ``cascade_jax.sharding.plan.XLA_CPU_MAX_KEYS`` = 131072 keys), so they plan too (measured:
    38 s compile CPU; 5.2 TiB temporaries per device without remat, so ``fits`` is false there)."""
    import os

    import kernels
    from tests.multidevice import REPO, run_on_cpu_devices

    cfg = P.load_stage_config(name, "nano-30b-a3b")
    obj = cfg.stage.objective
    seq = cfg.data.seq_len if obj == "sft" else cfg.rollout.sampling.max_prompt_len + cfg.rollout.sampling.max_response_len
    args = (os.path.join(REPO, "launch", "plan.py"), "--preset=nano-30b-a3b", "--mesh=fsdp:8",
            f"--objective={obj}", f"--seq-len={seq}", "--json")
    if name == "sft":
        assert seq == 262144 and kernels.xla_attention_form(seq) == "blockwise", seq
    out = run_on_cpu_devices(*args, devices=None, timeout=3000)
    assert out["seq_len"] == seq
    assert out["devices"] == 8 and out["flops_per_step"] > 0
