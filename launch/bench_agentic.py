"""Agentic rollouts on the tiny model: episodes per second and where the wall time goes.

Runs ``--episodes`` episodes of the tiny agentic SWE domain (``--env swe``: generated
repositories, OpenHands-style tools in the bubblewrap sandbox, reward by the tests) or of the
lookup tool domain (``--env lookup``) through the embedded JAX engine
(:func:`cascade_jax.agentic.driver.run_episodes`: re-prefill per turn, environment steps on a
thread pool) twice, after a compile warm-up:

* ``concurrent``: all episodes at once (``--slots`` decode slots, ``--tool-workers`` threads);
* ``sequential`` (the baseline, same run): one episode at a time, one tool worker.

Prints one JSON object: per mode ``episodes_per_s``, ``gen_share`` / ``tool_share`` (the share
of wall time during which at least one generation / one environment call was running; they sum
to more than 1 when the two overlap), turns, sampled tokens, mean reward, and the concurrent /
sequential throughput ratio, and the engine's throughput on the multi-turn rows (sampled tokens
per second of generation busy time) against the same number of tokens generated as single-turn
rows (each episode's first prompt, its sampled-token count as ``max_new_tokens``, one
``generate`` call) — the price of re-prefilling the conversation every turn (``--keep-cache``:
only the new tokens are prefilled). The model is random unless ``--checkpoint`` names a Hub
export (with its tokenizer): a random model rarely calls a tool, so its episodes are mostly one
turn (``--continue-on-length`` lets a cut turn continue into the environment); a model SFT'd on
``lookup_sft_rows(declare_tools=False)`` calls the tool and answers (two turns per episode):
``--env lookup --no-tool-spec --checkpoint <its hub/>`` (docs/agentic.md §8).

    JAX_PLATFORMS=cpu .venv/bin/python launch/bench_agentic.py --episodes 8
"""

from __future__ import annotations

import argparse
import json
import time

#: default engine context (= the episode row limit) per environment: the SWE prompt (task, tool
#: specs) alone is ~1,260 tiny-tokenizer tokens
DEFAULT_MAX_LEN = {"swe": 2048, "lookup": 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", choices=("swe", "lookup"), default="swe")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--tool-workers", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=None,
                    help=f"engine context = row limit (default: {DEFAULT_MAX_LEN})")
    ap.add_argument("--continue-on-length", action="store_true")
    ap.add_argument("--keep-cache", action="store_true",
                    help="keep each episode's slot cache between turns (prefill only new tokens)")
    ap.add_argument("--checkpoint", default=None, help="Hub export dir (weights + tokenizer)")
    ap.add_argument("--no-tool-spec", action="store_true",
                    help="lookup: prompts without the tool spec (a model SFT'd on lookup_sft_rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cascade_jax.agentic.driver import DriverStats, run_episodes
    from cascade_jax.agentic.episode import EpisodeLimits
    from cascade_jax.agentic.lookup import LookupEnv, lookup_tasks
    from cascade_jax.agentic.render import ChatRenderer
    from cascade_jax.agentic.swe import SWEEnv
    from cascade_jax.agentic.swe_tasks import swe_tasks
    from cascade_jax.data.tokenizer import load_tokenizer, tiny_tokenizer
    from cascade_jax.rollout.engine import JaxEngine
    from cascade_jax.rollout.types import Request, SamplingParams
    from models import nemotron_h as nh

    if args.checkpoint:
        cfg, params = nh.load_checkpoint(args.checkpoint, dtype=jnp.float32)
        tok = load_tokenizer(args.checkpoint)
    else:
        cfg = nh.preset("tiny")
        params = nh.init_params(cfg, jax.random.key(args.seed), dtype=jnp.float32)
        tok = tiny_tokenizer()
    renderer = ChatRenderer(tok)
    if args.env == "swe":
        tasks, make_env, domain = swe_tasks(args.episodes, seed=args.seed), SWEEnv, "swe"
    else:
        tasks = lookup_tasks(args.episodes, seed=args.seed, declare_tools=not args.no_tool_spec)
        make_env, domain = LookupEnv, "tool_call"
    if args.max_len is None:
        args.max_len = DEFAULT_MAX_LEN[args.env]
    longest = max(first_prompt_len(make_env, t, renderer) for t in tasks)
    if longest + args.max_new_tokens > args.max_len:
        raise SystemExit(f"--max-len: {args.max_len} tokens leave no room for a first turn "
                         f"(longest first prompt {longest} + --max-new-tokens "
                         f"{args.max_new_tokens}); raise --max-len")
    limits = EpisodeLimits(max_turns=args.max_turns, max_tokens=args.max_len,
                           max_new_tokens=args.max_new_tokens,
                           end_on_length=not args.continue_on_length)
    eng = JaxEngine(cfg, params, num_slots=args.slots, max_len=args.max_len,
                    prompt_buckets=(args.max_len // 2, args.max_len), steps_per_call=8,
                    keep_sessions=args.keep_cache)
    t0 = time.perf_counter()
    eng.warmup()
    compile_s = time.perf_counter() - t0

    def measure(batches, workers):
        total = DriverStats()
        eps = []
        for i, batch in enumerate(batches):
            st = DriverStats()
            eps += run_episodes(eng, batch, make_env, renderer, limits=limits, seed=args.seed + i,
                                tool_workers=workers, domain=domain, timeout_s=1800, stats=st,
                                keep_cache=args.keep_cache)
            for k in ("wall_s", "gen_busy_s", "tool_busy_s", "overlap_s", "episodes", "turns",
                      "sampled_tokens"):
                setattr(total, k, getattr(total, k) + getattr(st, k))
        out = total.as_dict()
        out["reward_mean"] = sum(e.reward for e in eps) / len(eps)
        out["turns_per_episode"] = total.turns / len(eps)
        out["ended_by"] = {k: sum(e.ended_by == k for e in eps) for k in {e.ended_by for e in eps}}
        return out

    concurrent = measure([tasks], args.tool_workers)
    sequential = measure([[t] for t in tasks], 1)
    # single-turn baseline: per episode of the concurrent run, its first prompt and as many
    # sampled tokens as the episode had, in one request (no stop token), all at once
    multi = DriverStats()
    episodes = run_episodes(eng, tasks, make_env, renderer, limits=limits, seed=args.seed,
                            tool_workers=args.tool_workers, domain=domain, timeout_s=1800,
                            stats=multi, keep_cache=args.keep_cache)
    if not any(e.loss_mask.sum() for e in episodes):
        raise SystemExit("no episode sampled a token (ended by: "
                         f"{sorted({e.ended_by for e in episodes})}); nothing to compare")
    reqs = []
    for i, e in enumerate(episodes):
        if e.loss_mask.sum() == 0:
            continue
        p0 = int(np.argmax(e.loss_mask == 1))
        reqs.append(Request(prompt_ids=tuple(int(t) for t in e.tokens[:p0]),
                            sampling=SamplingParams(max_new_tokens=int(e.loss_mask.sum()),
                                                    temperature=1.0, seed=i)))
    t0 = time.perf_counter()
    single = eng.generate(reqs)
    single_s = time.perf_counter() - t0
    single_tokens = sum(len(s.response_ids) for s in single.samples())
    multi_tps = multi.sampled_tokens / max(multi.gen_busy_s, 1e-9)
    single_tps = single_tokens / max(single_s, 1e-9)
    out = {
        "env": args.env, "episodes": args.episodes, "slots": args.slots,
        "tool_workers": args.tool_workers, "max_new_tokens": args.max_new_tokens,
        "keep_cache": args.keep_cache,
        "model": args.checkpoint or "random tiny", "compile_s": compile_s,
        "concurrent": concurrent, "sequential": sequential,
        "speedup_vs_sequential": concurrent["episodes_per_s"] / sequential["episodes_per_s"],
        "multi_turn_tokens_per_s": multi_tps, "single_turn_tokens_per_s": single_tps,
        "multi_vs_single_turn_throughput": multi_tps / single_tps,
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(out, indent=1))
    eng.stop()
    return out


def first_prompt_len(make_env, task, renderer) -> int:
    """Tokens of ``task``'s first prompt (system, user, tool specs) as the episode renders it."""
    env = make_env()
    try:
        reset = env.reset(task)
        return len(renderer.prompt_ids(list(reset.messages),
                                       None if reset.tools is None else list(reset.tools)))
    finally:
        env.close()


if __name__ == "__main__":
    main()
