"""Rollout config -> engine: make_engine builds the embedded engine with the config's slots,
lengths and seed; sampling settings validated with errors naming the field."""

import pytest

from cascade_jax import config as C
from cascade_jax.rollout import JaxEngine, RolloutEngine
from cascade_jax.rollout.factory import make_engine, sampling_params


def test_make_jax_engine_and_sampling_params(tiny_cfg, tiny_params):
    rc = C.from_dict(C.RolloutConfig, {"num_slots": 3, "max_prompt_len": 8, "max_response_len": 24,
                                       "steps_per_call": 2, "n_samples": 4, "top_k": 5, "top_p": 0.9})
    cfg = tiny_cfg(pattern="M*", vocab_size=32)
    params = tiny_params(cfg)
    eng = make_engine(rc, model_cfg=cfg, params=params, weight_version="2", prompt_buckets=(8,))
    assert isinstance(eng, JaxEngine) and isinstance(eng, RolloutEngine)
    assert (eng.num_slots, eng.max_len, eng.steps_per_call, eng.weight_version()) == (3, 32, 2, "2")
    sp = sampling_params(rc, stop_token_ids=[2], seed=7)
    assert (sp.n, sp.max_new_tokens, sp.top_k, sp.top_p, sp.stop_token_ids, sp.seed) == (4, 24, 5, 0.9, (2,), 7)
    greedy = sampling_params(C.from_dict(C.RolloutConfig, {"temperature": 0.0}))
    assert greedy.temperature == 0.0 and greedy.greedy and greedy.logprob_temperature == 1.0
    with pytest.raises(ValueError, match="model_cfg"):
        make_engine(rc)


@pytest.mark.parametrize("over,field", [
    ({"temperature": -0.5}, "rollout.temperature"),
    ({"top_p": 0.0}, "rollout.top_p"),
    ({"top_p": 1.5}, "rollout.top_p"),
    ({"top_k": 0}, "rollout.top_k"),
    ({"num_slots": 0}, "rollout.num_slots"),
    ({"steps_per_call": 0}, "rollout.steps_per_call"),
    ({"seed": -1}, "rollout.seed"),
    ({"engine": "jax_server"}, "rollout.server_url"),
    ({"engine": "vllm"}, "engine"),
])
def test_bad_rollout_config_names_the_field(over, field):
    with pytest.raises(C.ConfigError, match=field):
        C.from_dict(C.RolloutConfig, over)
