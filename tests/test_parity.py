"""Parity with transformers' ``NemotronHForCausalLM`` (the numerical oracle, run by subprocess in
its own environment): random-weight tiny models are built and saved by transformers, loaded with
our ``load_checkpoint``, and our fp32 ``forward`` logits must match transformers' fp32 logits.

Tolerance: max-abs 1e-4 on the logits (values of magnitude ~1-10; fp32 on both sides).
transformers 5 clamps dt at ``time_step_min`` in the full-sequence path, so our configs set
``dt_floor = time_step_min`` (docs/model.md §13).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from models.nemotron_h import ModelConfig, forward, hidden_states, load_checkpoint
from tests.oracle_util import run_oracle

pytestmark = pytest.mark.oracle

ATOL = 1e-4  # max-abs on fp32 logits
B, T = 2, 21  # T divisible by none of the chunk sizes below

_BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             mamba_num_heads=8, mamba_head_dim=4, ssm_state_size=8, n_groups=2, conv_kernel=4,
             intermediate_size=40, moe_intermediate_size=12, moe_shared_expert_intermediate_size=24,
             max_position_embeddings=256)

CONFIGS = {
    # all four kinds; group-limited routing (2 groups, 1 kept); normalised top-k; scale 2.5
    "groups2_top1_norm": ModelConfig(**_BASE, pattern="ME*-ME*E", chunk_size=8, n_routed_experts=8,
                                     num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
                                     routed_scaling_factor=2.5),
    # 4 groups, 2 kept; top-3 without normalisation; scale 1.7; MQA; one B/C group; chunk 5
    "groups4_top2_nonorm": ModelConfig(**{**_BASE, "num_key_value_heads": 1, "n_groups": 1},
                                       pattern="*EM-EMM", chunk_size=5, n_routed_experts=8,
                                       num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=False,
                                       routed_scaling_factor=1.7),
    # no group limit; scale 0.75; MHA; K=3 conv without bias; 3 B/C groups; chunk 16 (T = 16 + 5)
    "nogroup_convk3_nobias": ModelConfig(**{**_BASE, "num_key_value_heads": 4, "mamba_num_heads": 6,
                                            "n_groups": 3, "ssm_state_size": 4, "conv_kernel": 3},
                                         pattern="M-E*MEM", chunk_size=16, use_conv_bias=False,
                                         n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
                                         norm_topk_prob=True, routed_scaling_factor=0.75),
}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Builds every config in transformers (one subprocess) and returns, per config name,
    (model dir, tokens, transformers logits)."""
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    jobs, out = [], {}
    for k, (name, cfg) in enumerate(CONFIGS.items()):
        d = root / name
        tokens = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int32)
        np.save(root / f"{name}-tokens.npy", tokens)
        jobs += [{"op": "build", "config": cfg.to_hf_dict(), "seed": 100 + k, "out": str(d)},
                 {"op": "logits", "model": str(d), "tokens": str(root / f"{name}-tokens.npy"),
                  "out": str(root / f"{name}-logits.npy"), "hidden_out": str(root / f"{name}-hidden.npz")}]
        out[name] = (d, tokens, root / f"{name}-logits.npy", root / f"{name}-hidden.npz")
    run_oracle(jobs, root)
    return {name: (d, tokens, np.load(lp), hp) for name, (d, tokens, lp, hp) in out.items()}


def _divergence_report(params, tokens, cfg, hidden_file) -> str:
    """Per layer: max-abs between our and transformers' residual stream after that layer (both
    passed through norm_f, since our public API returns normed hidden states). Failure-only."""
    theirs = np.load(hidden_file)
    lines = []
    for i, kind in enumerate(cfg.pattern):
        c = dataclasses.replace(cfg, pattern=cfg.pattern[:i + 1])
        p = dict(params, layers=params["layers"][:i + 1])
        ours = np.asarray(hidden_states(p, tokens, c), np.float32)
        h = theirs[f"layer_{i}"].astype(np.float32)
        h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
        h = h * np.asarray(params["norm_f"], np.float32)
        lines.append(f"  layer {i} ({kind}): max-abs {np.abs(ours - h).max():.3g}")
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(oracle, name):
    model_dir, tokens, want, hidden_file = oracle[name]
    cfg, params = load_checkpoint(model_dir)
    expect_cfg = CONFIGS[name]
    assert cfg == expect_cfg, "config.json written by transformers does not parse back to the same config"
    cfg = dataclasses.replace(cfg, dt_floor=cfg.time_step_min)
    got = np.asarray(jax.jit(forward, static_argnums=2)(params, tokens, cfg))
    assert got.shape == want.shape == (B, T, cfg.vocab_size)
    assert got.dtype == np.float32
    assert np.abs(want).max() > 0.5  # non-degenerate logits
    err = float(np.abs(got - want).max())
    print(f"parity {name}: max-abs {err:.3g} (logits max-abs {np.abs(want).max():.3g})")
    if err > ATOL:
        pytest.fail(f"{name}: our logits differ from transformers' by max-abs {err:.3g} > {ATOL}; per layer "
                    f"(normed residual stream):\n{_divergence_report(params, tokens, cfg, hidden_file)}")
