"""RL and SFT update steps as pure functions (docs/algorithms.md §5–§8).

Pure array functions (no model needed): :func:`group_advantages`, :func:`grpo_advantages`,
:func:`grpo_loss`, :func:`mopd_loss`, :func:`sft_loss`, :func:`is_weights`,
:func:`chunked_logprobs`, :func:`chunked_topk_logprobs`. Model-level: :func:`token_logprobs`,
:func:`token_topk_logprobs`,
:class:`TrainState`, :func:`make_optimizer`, the train steps. Generation (the token sampler, the
rollout engine, the packer) lives in :mod:`cascade_jax.rollout`.

A GRPO loop (see ``launch/walkthrough_rl.py`` for every intermediate)::

    specs = nh.param_specs(model_cfg)   # parameter roles: trainable / decay / fp32
    state = rl.TrainState.from_config(params, opt_cfg, specs)
    step = rl.make_train_step("grpo", model_cfg=model_cfg, settings=rl.loss_settings(stage_cfg),
                              opt_cfg=opt_cfg)
    engine = JaxEngine(model_cfg, rl.compute_params(state.params, specs))  # cascade_jax.rollout
    for it in range(stage_cfg.steps):
        rollouts = engine.generate(requests)   # Request(prompt_ids, SamplingParams(n=G, seed=...))
        batch = pack_rollouts(rollouts, verify(rollouts))   # rewards [N] -> RLBatch
        state, metrics = step(state, batch)
        engine.update_weights(rl.compute_params(state.params, specs), str(it + 1))
"""

from .advantages import flat_groups, group_advantages, group_stats, grpo_advantages
from .batch import (FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, RLBatch, SFTBatch, num_sequences,
                    pack_routed_experts, response_lengths, sequence_index)
from .is_correction import is_weights, masked_mean, masked_quantile
from .expert_load import expert_counts, load_metrics
from .logprobs import (DEFAULT_VOCAB_CHUNK, chunked_logprobs, chunked_topk_logprobs,
                       inverse_temperature, next_token_logprobs, token_logprobs,
                       token_topk_logprobs)
from .mismatch import logprob_mismatch, routing_mismatch
from .losses import grpo_loss, k3_kl, mopd_loss, segment_start_mask, sft_loss
from .optim import (TrainState, compute_params, decay_mask, lr_schedule, make_optimizer,
                    mopd_optimizer_config, param_labels, sft_optimizer_config, trainable_mask)
from .settings import GRPOSettings, LossSettings, MOPDSettings, loss_settings
from .steps import (accumulate_gradients, domain_metrics, grpo_train_step, make_train_step,
                    mopd_train_step, sft_train_step)

__all__ = [
    "flat_groups", "group_advantages", "group_stats", "grpo_advantages",
    "FINISH_ABORT", "FINISH_LENGTH", "FINISH_STOP", "RLBatch", "SFTBatch", "num_sequences",
    "response_lengths", "sequence_index",
    "is_weights", "masked_mean", "masked_quantile",
    "DEFAULT_VOCAB_CHUNK", "chunked_logprobs", "chunked_topk_logprobs", "token_logprobs",
    "token_topk_logprobs",
    "next_token_logprobs", "inverse_temperature", "logprob_mismatch", "routing_mismatch",
    "pack_routed_experts", "expert_counts", "load_metrics",
    "grpo_loss", "k3_kl", "mopd_loss", "segment_start_mask", "sft_loss",
    "TrainState", "compute_params", "decay_mask", "lr_schedule", "make_optimizer",
    "mopd_optimizer_config", "param_labels", "sft_optimizer_config", "trainable_mask",
    "GRPOSettings", "LossSettings", "MOPDSettings", "loss_settings",
    "accumulate_gradients", "domain_metrics", "grpo_train_step", "make_train_step", "mopd_train_step",
    "sft_train_step",
]
