"""Rollout config -> engine: make_engine builds the embedded engine with the config's slots,
lengths and seed; sampling settings validated with errors naming the field."""

import pytest

from cascade_jax import config as C
from cascade_jax.rollout import JaxEngine, RolloutEngine
from cascade_jax.rollout.factory import make_engine, sampling_params


def test_make_jax_engine_and_sampling_params(tiny_cfg, tiny_params):
    rc = C.from_dict(C.RolloutConfig, {"batching": {"num_slots": 3, "steps_per_call": 2},
                                       "sampling": {"max_prompt_len": 8, "max_response_len": 24, "n_samples": 4,
                                                    "top_k": 5, "top_p": 0.9}})
    cfg = tiny_cfg(pattern="M*", vocab_size=32)
    params = tiny_params(cfg)
    eng = make_engine(rc, model_cfg=cfg, params=params, weight_version="2", prompt_buckets=(8,))
    assert isinstance(eng, JaxEngine) and isinstance(eng, RolloutEngine)
    assert (eng.num_slots, eng.max_len, eng.steps_per_call, eng.weight_version()) == (3, 32, 2, "2")
    sp = sampling_params(rc.sampling, stop_token_ids=[2], seed=7)
    assert (sp.n, sp.max_new_tokens, sp.top_k, sp.top_p, sp.stop_token_ids, sp.seed) == (4, 24, 5, 0.9, (2,), 7)
    greedy = sampling_params(C.from_dict(C.SamplingSection, {"temperature": 0.0}))
    assert greedy.temperature == 0.0 and greedy.greedy and greedy.logprob_temperature == 1.0
    with pytest.raises(ValueError, match="model_cfg"):
        make_engine(rc)


@pytest.mark.parametrize("over,field", [
    ({"sampling": {"temperature": -0.5}}, "rollout.sampling.temperature: must be >= 0"),
    ({"sampling": {"top_p": 0.0}}, r"rollout.sampling.top_p: must be in \(0, 1\]"),
    ({"sampling": {"top_p": 1.5}}, r"rollout.sampling.top_p: must be in \(0, 1\]"),
    ({"sampling": {"top_k": 0}}, "rollout.sampling.top_k: must be -1"),
    ({"batching": {"num_slots": 0}}, "rollout.batching.num_slots: must be >= 1"),
    ({"batching": {"steps_per_call": 0}}, "rollout.batching.steps_per_call: must be >= 1"),
    ({"sampling": {"seed": -1}}, "rollout.sampling.seed: must be >= 0"),
    ({"engine": "jax_server"}, "rollout.servers.url: required"),
    ({"engine": "vllm"}, "engine: must be one of"),  # no section path above a bare RolloutConfig
])
def test_bad_rollout_config_names_the_field(over, field):
    with pytest.raises(C.ConfigError, match=f"^{field}"):
        C.from_dict(C.RolloutConfig, over)
