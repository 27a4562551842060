# %% [markdown]
# # GRPO and MOPD, step by step
#
# A notebook-style walk-through (jupytext `# %%` cells; run as a script too:
# `python launch/walkthrough_rl.py`). It builds a toy rollout batch by hand on a tiny
# NemotronH, then computes every intermediate of one GRPO step and one MOPD step with the
# pure functions of `cascade_jax.rl` (docs/algorithms.md §5–§7), and finally calls the train steps.

# %%
import jax
import jax.numpy as jnp
import numpy as np

import cascade_jax.rl as rl
from cascade_jax.config import OptimizerConfig, StageConfig
from models import nemotron_h as nh

np.set_printoptions(precision=3, suppress=True, linewidth=120)
cfg = nh.preset("tiny", vocab_size=32, hidden_size=32, pattern="M*E-", intermediate_size=48,
                chunk_size=8)
params = nh.init_params(cfg, jax.random.key(0), dtype=jnp.float32)
print(cfg.pattern, {k: v.shape for k, v in params.items() if k != "layers"})

# %% [markdown]
# ## A toy batch: 2 prompts × 3 responses, padded rows `[prompt | response | pad]`
# Every per-token array is aligned with `tokens`: entry `t` describes token `t` predicted from
# tokens `< t`. `loss_mask` marks the response; `segment_ids` is 0 on padding.

# %%
B, T = 6, 9
rng = np.random.default_rng(0)
prompt_len = np.array([3, 3, 3, 4, 4, 4])
resp_len = np.array([5, 2, 4, 3, 5, 1])
pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
seg = (pos < (prompt_len + resp_len)[:, None]).astype(np.int32)
loss_mask = ((pos >= prompt_len[:, None]) & (seg > 0)).astype(np.float32)
tokens = np.where(seg > 0, rng.integers(3, cfg.vocab_size, (B, T)), 0).astype(np.int32)
batch = rl.RLBatch(
    tokens=jnp.asarray(tokens), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg),
    loss_mask=jnp.asarray(loss_mask), rollout_logp=jnp.zeros((B, T)),  # filled below
    rewards=jnp.asarray([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]),  # prompt 2: every response correct
    group_ids=jnp.asarray([0, 0, 0, 1, 1, 1]),
    finish_reason=jnp.asarray([rl.FINISH_LENGTH, 0, 0, 0, 0, 0]),  # response 0 was truncated
    domain_ids=jnp.asarray([0, 0, 0, 1, 1, 1]))
print("tokens\n", tokens, "\nloss_mask\n", loss_mask, "\nsegment_ids\n", seg)

# %% [markdown]
# ## Per-token log-probs, chunked over the vocabulary
# `token_logprobs` runs the model to the final-normed hidden states once, then streams
# `lm_head` in vocab chunks (logsumexp in fp32). Compare with the full-vocab softmax.

# %%
logp, entropy = rl.token_logprobs(params, batch, cfg, vocab_chunk=8)
full = jax.nn.log_softmax(nh.forward(params, batch.tokens, cfg, segment_ids=batch.segment_ids), -1)
ref = jnp.take_along_axis(full[:, :-1], batch.tokens[:, 1:, None], -1)[..., 0]
print("logp (response tokens)\n", np.asarray(logp * batch.loss_mask))
print("entropy\n", np.asarray(entropy * batch.loss_mask))
print("max |chunked - full| =", float(jnp.abs((logp[:, 1:] - ref) * batch.loss_mask[:, 1:]).max()))

# %% [markdown]
# The inference engine's log-probs differ a little from the trainer's (different kernels);
# simulate that with noise, two tokens far off.

# %%
noise = rng.normal(0, 0.1, (B, T)).astype(np.float32)
noise[0, 4], noise[3, 5] = 1.0, -0.9
batch = batch.replace(rollout_logp=(logp - noise) * batch.loss_mask)

# %% [markdown]
# ## GRPO, piece by piece
# **Advantages.** Group statistics are population mean / std. Overlong filtering *off*: the
# truncated response gets reward 0 and is trained on. All-equal groups get Â = 0, and with
# dynamic filtering they leave the loss (and its token count).

# %%
stage = StageConfig(objective="grpo", overlong_filtering=False, dynamic_filtering=True,
                    is_correction="tis")
stats = rl.group_stats(jnp.asarray([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), batch.group_ids)
print({k: np.asarray(v) for k, v in stats.items()})
adv, keep, adv_metrics = rl.grpo_advantages(
    batch.rewards, batch.group_ids, batch.finish_reason,
    overlong_filtering=stage.overlong_filtering, dynamic_filtering=stage.dynamic_filtering)
print("advantages", np.asarray(adv), "keep", np.asarray(keep))
print({k: round(float(v), 4) for k, v in adv_metrics.items()})

# %% [markdown]
# **Mask and the token count.** The loss is normalised by the valid response tokens of the
# *whole optimiser batch* — pass it in, so micro-batches add up to the batch.

# %%
mask = batch.loss_mask * keep[:, None]
num_tokens = mask.sum()
print("mask\n", np.asarray(mask), "\nnum_tokens", float(num_tokens))

# %% [markdown]
# **Train/inference mismatch.** `δ = lp_train − lp_rollout`; token TIS weight `min(e^δ, 2)`;
# icepop would zero tokens with `e^δ ∉ [0.5, 2]`.

# %%
for mode in ("tis", "icepop"):
    w, is_metrics = rl.is_weights(logp, batch.rollout_logp, mask, mode=mode)
    print(mode, "weights\n", np.asarray(w))
    print({k: round(float(v), 4) for k, v in is_metrics.items()})

# %% [markdown]
# **The loss.** `ℓ_t = −w_t · min(ρ_t Â, clip(ρ_t) Â)` with `ρ_t = exp(lp − sg(lp)) = 1` on
# policy; its gradient w.r.t. `lp` is REINFORCE's `−w Â / num_tokens`.

# %%
loss_fn = lambda lp: rl.grpo_loss(lp, None, adv, mask, rollout_logp=batch.rollout_logp,
                                  num_tokens=num_tokens, is_correction="tis")
loss, grpo_metrics = loss_fn(logp)
g = jax.grad(lambda lp: loss_fn(lp)[0])(logp)
w, _ = rl.is_weights(logp, batch.rollout_logp, mask, mode="tis")
print("loss", float(loss), {k: round(float(v), 4) for k, v in grpo_metrics.items()})
print("dL/dlp\n", np.asarray(g))
print("REINFORCE −w·Â/n matches:", bool(jnp.allclose(g, -w * adv[:, None] / num_tokens, atol=1e-7)))

# %% [markdown]
# **One optimiser step.** fp32 master weights, bf16 compute inside the step, AdamW,
# global-norm clipping, two micro-batches.

# %%
state = rl.TrainState.from_config(params, OptimizerConfig(lr=1e-3, warmup_steps=10,
                                                          warmup_init_lr=1e-4),
                                  nh.param_specs(cfg))  # roles: decay / trainable / fp32
grpo_step = rl.make_train_step("grpo", model_cfg=cfg, settings=rl.loss_settings(stage),
                               grad_accum=2)
new_state, metrics = grpo_step(state, batch)
print({k: round(float(v), 5) for k, v in sorted(metrics.items())})
delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, state.params)
print("max |Δ lm_head| =", delta["lm_head"], " step", int(new_state.step))

# %% [markdown]
# ## MOPD, piece by piece
# Each sequence is scored by the teacher of its domain (here: domain 0 → teacher A, domain 1
# → teacher B). Token advantage `a_t = sg(lp_teacher − lp)`; weight `r_t = e^{sg(lp) − lp_inf}`
# kept only inside [0.5, 2] (masked, not clamped); per-sequence mean over the original mask.

# %%
teacher_a = nh.init_params(cfg, jax.random.key(1), dtype=jnp.float32)
teacher_b = nh.init_params(cfg, jax.random.key(2), dtype=jnp.float32)
# (a run scores its rollouts with rollout.teachers.Teachers: the same log-probs, routed by domain)
seq_domain = batch.domain_ids[rl.sequence_index(batch)]  # [B, T] the domain of each token's row
teacher_logp = jnp.where(seq_domain == 0, rl.token_logprobs(teacher_a, batch, cfg)[0],
                         rl.token_logprobs(teacher_b, batch, cfg)[0])
batch = batch.replace(teacher_logp=teacher_logp)
m = batch.loss_mask
a_t = (teacher_logp - logp) * m
r_t = jnp.exp(logp - batch.rollout_logp) * m
w_t = jnp.where((r_t >= 0.5) & (r_t <= 2.0), r_t, 0.0) * m
print("a_t\n", np.asarray(a_t), "\nr_t\n", np.asarray(r_t), "\nw_t\n", np.asarray(w_t))
per_seq = (w_t * a_t * logp).sum(1) / m.sum(1)
print("per-sequence terms", np.asarray(per_seq), " loss by hand", float(-per_seq.mean()))
loss, mopd_metrics = rl.mopd_loss(logp, teacher_logp, batch.rollout_logp, m)
print("mopd_loss", float(loss), {k: round(float(v), 4) for k, v in mopd_metrics.items()})

# %% [markdown]
# **One MOPD step** with the recipe's optimiser: AdamW(0.9, 0.95), lr 2e-7 → 2e-6 over 30 steps.

# %%
state = rl.TrainState.from_config(params, rl.mopd_optimizer_config(), nh.param_specs(cfg))
mopd_step = rl.make_train_step("mopd", model_cfg=cfg, settings=rl.MOPDSettings())
for i in range(3):
    state, metrics = mopd_step(state, batch)
    print(i, {k: round(float(metrics[k]), 8) for k in ("loss", "reverse_kl", "grad_norm", "lr",
                                                       "is_frac_corrected", "entropy")})

# %% [markdown]
# ## SFT on packed rows
# Two documents per row; the first token of each segment has no prediction.

# %%
sft_batch = rl.SFTBatch(
    tokens=jnp.asarray(tokens[:2]), positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2),
    segment_ids=jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2]] * 2),
    loss_mask=jnp.asarray([[0, 0, 1, 1, 0, 0, 1, 1, 1]] * 2, jnp.float32))
state = rl.TrainState.from_config(params, OptimizerConfig(lr=1e-3), nh.param_specs(cfg))
state, metrics = rl.make_train_step("sft", model_cfg=cfg)(state, sft_batch)
print({k: round(float(v), 4) for k, v in sorted(metrics.items())})
