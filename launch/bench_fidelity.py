"""Rollout fidelity on the tiny model: a GRPO demonstration and the cost of the two options,
for each response length of ``--response-lens`` (default 16, 256, 2048).

For each length, runs ``--steps`` GRPO steps three ways from the same initial weights, with bf16
rollouts whose router was perturbed (``--router-noise`` times its spread) relative to the
trainer's:

``routing_token_diff_frac``: rollout experts vs an unreplayed trainer forward;
``routing_used_token_diff_frac``: rollout experts vs the experts the trainer's forward used.

* ``default``          cached decode (``rollout.sampler.sample``) with the perturbed router; the
                       trainer recomputes log-probs with its own weights (batched forward);
* ``routing_replay``   the same rollouts plus their experts (decode path), replayed by the
                       trainer (``RLBatch.routed_experts``) -> routing mismatch 0;
* ``zero_mismatch``    unperturbed weights, tokens drawn from the trainer's own batch-invariant
                       log-probs (``rollout.exact.generate_exact``), trainer with ``row_len`` and
                       routing replay -> every ``mismatch_*`` metric is exactly 0 / 1.

Prints one JSON object: per response length and mode the train-step mismatch metrics of every
step, the routing mismatch (rollout experts vs an unreplayed trainer forward, and vs the experts
the trainer used), and the wall-clock of generation and of the train step (after compilation,
median of ``--repeats``) with their ratios to the default mode of the same length, measured in
the same run. Zero-mismatch generation runs a full row forward per token (cost quadratic in the
response length; the cached-decode engine does not have this mode yet), so 2048 is for a GPU.

    JAX_PLATFORMS=cpu .venv/bin/python launch/bench_fidelity.py --response-lens 16,256
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _timed(fn, *a, repeats: int = 1, **kw):
    """``(fn(*a, **kw), median seconds over repeats)`` after one warm-up (compile) call."""
    out = fn(*a, **kw)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--response-lens", default="16,256,2048",
                    help="comma-separated response lengths (max_new_tokens), one report each")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats after the warm-up call")
    ap.add_argument("--router-noise", type=float, default=0.3)
    args = ap.parse_args(argv)

    from cascade_jax import config as C
    from cascade_jax import rl
    from cascade_jax.rollout.exact import generate_exact
    from cascade_jax.rollout.sampler import sample
    from models import nemotron_h as nh

    cfg = nh.preset("tiny")
    specs = nh.param_specs(cfg)
    master0 = nh.init_params(cfg, jax.random.key(0), jnp.float32)
    opt = C.OptimizerConfig(lr=1e-3)
    stage = C.StageConfig(objective="grpo", is_correction="none")
    P, N = args.prompt_len, args.prompts * args.group

    def one_length(M):
        T = P + M
        chunk = 128
        rng = np.random.default_rng(0)
        prompts = rng.integers(1, cfg.vocab_size, (args.prompts, P)).astype(np.int32)
        prompts = np.repeat(prompts, args.group, 0)
        group_ids = np.repeat(np.arange(args.prompts), args.group).astype(np.int32)
        moe = [i for i, k in enumerate(cfg.pattern) if k == "E"]

        def perturb(params, seed):
            layers = list(params["layers"])
            key = jax.random.key(seed)
            for i in moe:
                key, sub = jax.random.split(key)
                g = layers[i]["mixer"]["gate"]
                noise = args.router_noise * jnp.std(g.astype(jnp.float32)) * jax.random.normal(sub, g.shape)
                layers[i] = dict(layers[i], mixer=dict(layers[i]["mixer"], gate=(g + noise).astype(g.dtype)))
            return dict(params, layers=layers)

        def reward(tokens):  # a toy reward: fraction of even response tokens
            return (np.asarray(tokens)[:, P:] % 2 == 0).mean(-1).astype(np.float32)

        fwd_rx = jax.jit(lambda p, t: nh.forward(p, t, cfg, return_routed_experts=True)[1])
        used_rx = jax.jit(lambda p, t, r: nh.forward(p, t, cfg, routed_experts=r, return_routed_experts=True)[1])
        steps = {
            "default": rl.make_train_step("grpo", model_cfg=cfg, stage=stage, opt_cfg=opt, vocab_chunk=chunk),
            "routing_replay": rl.make_train_step("grpo", model_cfg=cfg, stage=stage, opt_cfg=opt, vocab_chunk=chunk),
            "zero_mismatch": rl.make_train_step("grpo", model_cfg=cfg, stage=stage, opt_cfg=opt, vocab_chunk=chunk,
                                                row_len=T),
        }
        report = {"model": "tiny", "rows": N, "row_len": T, "new_tokens": M, "modes": {}}
        for mode, step in steps.items():
            state = rl.TrainState.from_config(master0, opt, specs)
            per_step, gen_s, train_s = [], [], []
            for it in range(args.steps):
                params = rl.compute_params(state.params, specs, jnp.bfloat16)
                key = jax.random.key(100 + it)
                if mode == "zero_mismatch":
                    (samples), dt = _timed(lambda: generate_exact(
                        params, cfg, [list(p) for p in prompts], row_len=T, num_slots=N,
                        max_new_tokens=M, seed=100 + it, return_routed_experts=True, vocab_chunk=chunk),
                        repeats=args.repeats)
                    tok = np.stack([np.concatenate([s.prompt_ids, s.response_ids]) for s in samples])
                    lp = np.zeros((N, T), np.float32)
                    lp[:, P:] = np.stack([s.logprobs for s in samples])
                    rollout_rx = rl.pack_routed_experts([s.routed_experts for s in samples], T,
                                                        num_experts=cfg.n_routed_experts)
                    mask = np.zeros((N, T), np.float32)
                    mask[:, P:] = 1
                    batch = rl.RLBatch(tokens=jnp.asarray(tok), positions=jnp.broadcast_to(jnp.arange(T), (N, T)),
                                       segment_ids=jnp.ones((N, T), jnp.int32), loss_mask=jnp.asarray(mask),
                                       rollout_logp=jnp.asarray(lp), rewards=jnp.asarray(reward(tok)),
                                       group_ids=jnp.asarray(group_ids), finish_reason=jnp.zeros((N,), jnp.int32),
                                       domain_ids=jnp.zeros((N,), jnp.int32))
                else:
                    roll_params = perturb(params, 7 + it)
                    (batch, _), dt = _timed(lambda: sample(roll_params, jnp.asarray(prompts), cfg, rng=key,
                                                           max_new_tokens=M, group_ids=group_ids), repeats=args.repeats)
                    # the engine's experts: its (perturbed) router over the sequence, last token unrouted
                    rollout_rx = np.asarray(fwd_rx(roll_params, batch.tokens)).copy()
                    rollout_rx[:, -1] = -1
                    batch = batch.replace(rewards=jnp.asarray(reward(batch.tokens)))
                gen_s.append(dt)
                trainer_rx = np.asarray(fwd_rx(params, batch.tokens))
                routing = rl.routing_mismatch(jnp.asarray(rollout_rx), jnp.asarray(trainer_rx), batch.loss_mask)
                if mode != "default":
                    batch = batch.replace(routed_experts=jnp.asarray(rollout_rx))
                    used = used_rx(params, batch.tokens, batch.routed_experts)
                else:
                    used = jnp.asarray(trainer_rx)
                used_diff = rl.routing_mismatch(jnp.asarray(rollout_rx), used, batch.loss_mask)
                routing["routing_used_token_diff_frac"] = used_diff["routing_token_diff_frac"]
                (new_state, metrics), ts = _timed(step, state, batch, repeats=args.repeats)
                train_s.append(ts)
                state = new_state
                per_step.append({k: float(metrics[k]) for k in sorted(metrics) if k.startswith(("mismatch_", "is_abs"))}
                                | {k: float(v) for k, v in routing.items()} | {"loss": float(metrics["loss"])})
            report["modes"][mode] = {"steps": per_step, "generate_s": float(np.median(gen_s)),
                                     "train_step_s": float(np.median(train_s))}
        base = report["modes"]["default"]
        for mode, r in report["modes"].items():
            r["generate_ratio_to_default"] = r["generate_s"] / base["generate_s"]
            r["train_step_ratio_to_default"] = r["train_step_s"] / base["train_step_s"]
        return report

    lens = [int(x) for x in args.response_lens.split(",") if x]
    out = {"model": "tiny", "backend": jax.default_backend(), "rows": N, "prompt_len": P,
           "repeats": args.repeats, "lengths": {}}
    for M in lens:
        out["lengths"][str(M)] = one_length(M)
        print(json.dumps({"done_length": M}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
