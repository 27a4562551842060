"""Rollout fidelity on the tiny model: a GRPO demonstration and the cost of the two options,
for each response length of ``--response-lens`` (default 16, 256, 2048).

For each length, runs ``--steps`` GRPO steps three ways from the same initial weights, with bf16
rollouts whose router was perturbed (``--router-noise`` times its spread) relative to the
trainer's:

``routing_token_diff_frac``: rollout experts vs an unreplayed trainer forward;
``routing_used_token_diff_frac``: rollout experts vs the experts the trainer's forward used.

* ``default``          the continuous-batching engine (``rollout.engine.JaxEngine``, cached
                       decode) with the perturbed router; the trainer recomputes log-probs with
                       its own weights (batched forward);
* ``routing_replay``   the same rollouts plus their experts, replayed by the trainer
                       (``RLBatch.routed_experts``) -> routing mismatch 0;
* ``zero_mismatch``    unperturbed weights, the zero-mismatch engine (``rollout.exact.
                       ExactEngine``: continuous batching, cached decode by the kernel-invariant
                       model, its recorded experts), trainer with ``model=models.nemotron_h.
                       invariant`` and routing replay -> every ``mismatch_*`` metric is exactly
                       0 / 1.

Both engines get the same requests (``--prompts`` prompts x ``--group`` samples, every
``--stop-every``-th token id a stop token: mixed response lengths). Prints one JSON object: per
response length and mode the train-step mismatch metrics of every step, the routing mismatch
(rollout experts vs an unreplayed trainer forward, and vs the experts the trainer used), and the
wall-clock and process CPU time of generation and of the train step of the last step (after
compilation, medians of ``--repeats`` rounds that run the three modes in turn, so load on a
shared machine hits them alike) with their ratios to the default mode of the same length,
measured in the same run (``*_ratio_to_default``: wall; ``*_cpu_ratio_to_default``: CPU time,
the steadier one on a loaded CPU host; on an accelerator read the wall ratios). A
default decode step attends over the whole cache (``max_len``), a zero-mismatch one over the key
blocks up to the slot's position. On 2 CPU cores the default lengths take about 10 min (2048
alone about 6.5 min); ``--response-lens 16,256`` about 4 min.

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


def _seconds(fn):
    """``(wall-clock, process CPU)`` seconds of ``fn()`` (its outputs ready)."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def _interleaved(fns: dict, repeats: int) -> dict:
    """``{name: (median wall seconds, median CPU seconds)}`` of the compiled ``fns``, timed in
    ``repeats`` rounds that each run every function once in turn (a shared machine's load hits
    every mode alike; on the CPU backend the process's CPU time, all threads, is the steadier
    measure of the work under load)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_seconds(fn))
    return {k: tuple(float(x) for x in np.median(np.asarray(v), axis=0)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--response-lens", default="16,256,2048",
                    help="comma-separated response lengths (max_new_tokens), one report each")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timing rounds after the warm-up call (each runs every mode once, in turn)")
    ap.add_argument("--router-noise", type=float, default=0.3)
    ap.add_argument("--stop-every", type=int, default=64,
                    help="every k-th token id is a stop token (mixed response lengths; 0: none)")
    args = ap.parse_args(argv)

    from cascade_jax import config as C
    from cascade_jax import rl
    from cascade_jax.contract.batch import FINISH_REASONS
    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.exact import ExactEngine
    from cascade_jax.rollout.types import Request, SamplingParams
    from models import nemotron_h as nh
    from models.nemotron_h import invariant

    cfg = nh.preset("tiny")
    specs = nh.param_specs(cfg)
    master0 = nh.init_params(cfg, jax.random.key(0), jnp.float32)
    opt = C.OptimizerConfig(lr=1e-3)
    settings = rl.GRPOSettings(is_correction="none")
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
        fwd_rx_inv = jax.jit(lambda p, t: invariant.hidden_states(p, t, cfg, return_routed_experts=True)[1])
        used_rx = jax.jit(lambda p, t, r: nh.forward(p, t, cfg, routed_experts=r, return_routed_experts=True)[1])
        steps = {
            "default": rl.make_train_step("grpo", model_cfg=cfg, settings=settings, opt_cfg=opt, vocab_chunk=chunk),
            "routing_replay": rl.make_train_step("grpo", model_cfg=cfg, settings=settings, opt_cfg=opt, vocab_chunk=chunk),
            "zero_mismatch": rl.make_train_step("grpo", model_cfg=cfg, settings=settings, opt_cfg=opt, vocab_chunk=chunk,
                                                model=invariant),
        }
        max_len = -(-T // invariant.KV_BLOCK) * invariant.KV_BLOCK
        engine_kw = dict(num_slots=N, max_len=max_len, prompt_buckets=(max(16, P),), steps_per_call=16)
        stops = tuple(range(0, cfg.vocab_size, args.stop_every)) if args.stop_every else ()

        def requests(it):
            return [Request(prompt_ids=tuple(int(t) for t in prompts[g * args.group]), rid=f"{it}-{g}",
                            sampling=SamplingParams(n=args.group, max_new_tokens=M, seed=100 + it + 7 * g,
                                                    stop_token_ids=stops))
                    for g in range(args.prompts)]

        def rows(rollouts):
            """The rollouts in the padded layout ``[N, T]``: tokens, mask, log-probs, finish."""
            samples = [s for g in rollouts.groups for s in g]
            tok, mask, lp = (np.zeros((N, T), np.int32), np.zeros((N, T), np.float32),
                             np.zeros((N, T), np.float32))
            for i, smp in enumerate(samples):
                r = len(smp.response_ids)
                tok[i, :P], tok[i, P:P + r], mask[i, P:P + r], lp[i, P:P + r] = (
                    smp.prompt_ids, smp.response_ids, 1, smp.logprobs)
            fin = np.asarray([FINISH_REASONS.index(smp.finish_reason) for smp in samples], np.int32)
            return samples, tok, mask, lp, fin

        report = {"model": "tiny", "rows": N, "row_len": T, "new_tokens": M, "stop_every": args.stop_every,
                  "modes": {}}
        timed = {}
        for mode, step in steps.items():
            state = rl.TrainState.from_config(master0, opt, specs)
            per_step = []
            for it in range(args.steps):
                params = rl.compute_params(state.params, specs, jnp.bfloat16)
                if mode == "zero_mismatch":  # the trainer's own weights, the invariant engine
                    eng = ExactEngine(cfg, params, vocab_chunk=chunk, return_routed_experts=True, **engine_kw)
                else:  # the default engine, with the perturbed router
                    roll_params = perturb(params, 7 + it)
                    eng = JaxEngine(cfg, roll_params, **engine_kw)
                ro = eng.generate(requests(it))  # compiles; timed below
                samples, tok, mask, lp, fin = rows(ro)
                seg = (np.arange(T)[None] < (mask.sum(1, keepdims=True) + P)).astype(np.int32)
                batch = rl.RLBatch(tokens=jnp.asarray(tok), positions=jnp.broadcast_to(jnp.arange(T), (N, T)),
                                   segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask),
                                   rollout_logp=jnp.asarray(lp), rewards=jnp.asarray(reward(tok)),
                                   group_ids=jnp.asarray(group_ids), finish_reason=jnp.asarray(fin),
                                   domain_ids=jnp.zeros((N,), jnp.int32))
                if mode == "zero_mismatch":
                    rollout_rx = rl.pack_routed_experts([smp.routed_experts for smp in samples], T,
                                                        num_experts=cfg.n_routed_experts)
                else:  # the engine's experts: its (perturbed) router over the sequence, last token unrouted
                    rollout_rx = np.asarray(fwd_rx(roll_params, batch.tokens)).copy()
                    rollout_rx[:, -1] = -1
                    rollout_rx[np.asarray(seg) == 0] = -1
                # the trainer's own unreplayed routing (the invariant model in zero-mismatch mode)
                trainer_rx = np.asarray((fwd_rx_inv if mode == "zero_mismatch" else fwd_rx)(params, batch.tokens))
                routing = rl.routing_mismatch(jnp.asarray(rollout_rx), jnp.asarray(trainer_rx), batch.loss_mask)
                if mode != "default":
                    batch = batch.replace(routed_experts=jnp.asarray(rollout_rx))
                    used = used_rx(params, batch.tokens, batch.routed_experts)
                else:
                    used = jnp.asarray(trainer_rx)
                used_diff = rl.routing_mismatch(jnp.asarray(rollout_rx), used, batch.loss_mask)
                routing["routing_used_token_diff_frac"] = used_diff["routing_token_diff_frac"]
                timed[mode] = (lambda e=eng, r=requests(it): e.generate(r),
                               lambda s=step, st=state, b=batch: s(st, b))  # the last step's
                new_state, metrics = step(state, batch)
                state = new_state
                per_step.append({k: float(metrics[k]) for k in sorted(metrics) if k.startswith(("mismatch_", "is_abs"))}
                                | {k: float(v) for k, v in routing.items()} | {"loss": float(metrics["loss"])})
            report["modes"][mode] = {"steps": per_step}
        gen = _interleaved({m: g for m, (g, _) in timed.items()}, args.repeats)
        train = _interleaved({m: t for m, (_, t) in timed.items()}, args.repeats)
        for mode, r in report["modes"].items():
            (r["generate_s"], r["generate_cpu_s"]), (r["train_step_s"], r["train_step_cpu_s"]) = (
                gen[mode], train[mode])
        base = report["modes"]["default"]
        for mode, r in report["modes"].items():
            for k in ("generate", "train_step"):
                r[f"{k}_ratio_to_default"] = r[f"{k}_s"] / base[f"{k}_s"]
                r[f"{k}_cpu_ratio_to_default"] = r[f"{k}_cpu_s"] / base[f"{k}_cpu_s"]
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
