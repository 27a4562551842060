"""Rollout fidelity reached through the stage runner: ``rollout.fidelity.zero_mismatch`` and
``rollout.fidelity.routing_replay`` on a tiny GRPO stage (``run_stage`` in process).

With both on, every token is drawn from the trainer's own batch-invariant log-probs and the
rollout's experts are replayed, so the logged step metrics must show ``mismatch_abs_max == 0``
exactly (every IS ratio 1) and no routing difference against an unreplayed trainer forward.
With routing replay alone (cached decode in bf16) the log-prob mismatch is nonzero, so the check
can fail; the routing metrics are logged whenever the batch carries experts."""

from __future__ import annotations

import json

import pytest

from cascade_jax import config as C
from cascade_jax.runner import run_stage


def _config(run_dir, *, on: bool, dtype: str = "float32") -> C.Config:
    return C.from_dict(C.Config, {
        "model": {"preset": "tiny", "dtype": dtype},
        "optimizer": {"lr": 2e-3},
        "rollout": {"sampling": {"n_samples": 2, "max_prompt_len": 64, "max_response_len": 6},
                    "batching": {"num_slots": 4, "steps_per_call": 6},
                    "fidelity": {"zero_mismatch": on, "routing_replay": on}},
        "data": {"domains": ["structured_output"], "batch_prompts": 2, "tiny_rows_per_domain": 32},
        "stage": {"name": "fidelity", "objective": "grpo", "steps": 2},
        "eval": {"every": -1},
        "run": {"out_dir": str(run_dir)},
    })


def _steps(run_dir) -> list:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "mismatch_abs_max" in r]


@pytest.mark.integration
def test_both_options_give_zero_mismatch_and_replayed_routing(tmp_path):
    run_stage(_config(tmp_path / "on", on=True), progress=False, log=lambda m: None)
    steps = _steps(tmp_path / "on")
    assert len(steps) == 2
    for m in steps:
        assert m["mismatch_abs_max"] == 0.0 and m["mismatch_abs_mean"] == 0.0
        assert m["mismatch_exact_frac"] == 1.0 and m["mismatch_out_of_band"] == 0.0
        assert m["routing_token_diff_frac"] == 0.0 and m["routing_layer_diff_frac"] == 0.0


@pytest.mark.integration
def test_routing_replay_alone_logs_routing_and_keeps_the_decode_mismatch(tmp_path):
    """Routing replay with the cached decode in bf16: the engine's experts reach the batch (the
    routing metrics are logged) and, without zero-mismatch, the log-probs still differ."""
    cfg = C.replace_path(_config(tmp_path / "rr", on=False, dtype="bfloat16"),
                         "rollout.fidelity.routing_replay", True)
    run_stage(cfg, progress=False, log=lambda m: None)
    steps = _steps(tmp_path / "rr")
    assert len(steps) == 2
    assert max(m["mismatch_abs_max"] for m in steps) > 0.0
    assert max(m["mismatch_exact_frac"] for m in steps) < 1.0
    for m in steps:
        assert 0.0 <= m["routing_token_diff_frac"] <= 1.0


@pytest.mark.parametrize("field,value", [("top_p", 0.9), ("top_k", 5), ("engine", "sglang")])
def test_zero_mismatch_rejects_unsupported_settings(field, value):
    r = {"fidelity": {"zero_mismatch": True}}
    if field == "engine":
        r.update(engine=value, servers={"url": "http://127.0.0.1:1"})
    else:
        r["sampling"] = {field: value}
    with pytest.raises(C.ConfigError, match=f"rollout.fidelity.zero_mismatch.*{field}"):
        C.from_dict(C.Config, {"rollout": r})


def test_routing_replay_and_zero_mismatch_accept_served_engines():
    """Served engines return routed experts (the client asks for them and decodes SGLang's
    layout) and ``launch/serve.py --zero-mismatch`` samples as the trainer recomputes."""
    from cascade_jax.rollout.factory import make_engine
    from models import nemotron_h as nh

    for engine in ("sglang", "jax_server"):
        cfg = C.from_dict(C.Config, {"rollout": {"fidelity": {"routing_replay": True}, "engine": engine,
                                                 "servers": {"url": "http://127.0.0.1:1"}}})
        client = make_engine(cfg.rollout, model_cfg=nh.preset("tiny"))
        try:
            assert client.routed_layout.moe_layers == tuple(i for i, c in enumerate(nh.preset("tiny").pattern)
                                                            if c == "E")
        finally:
            client.close()
    C.from_dict(C.Config, {"rollout": {"fidelity": {"zero_mismatch": True}, "engine": "jax_server",
                                       "servers": {"url": "http://127.0.0.1:1"}}})
