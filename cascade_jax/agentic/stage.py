"""An agentic GRPO stage's rollouts: episodes of the configured environment as one RLBatch.

With ``agentic.env`` set (docs/agentic.md §8) the runner's RL step draws, instead of one-shot
prompt → response rollouts, ``G = data.batch_prompts`` tasks of the environment (generated from
the step's key: :func:`step_tasks`) × ``n = rollout.sampling.n_samples`` episodes each through
:func:`~cascade_jax.agentic.driver.run_episodes` on the stage's engine (the embedded engine, or
served engines through :class:`~cascade_jax.agentic.driver.BlockingEngine`), then packs them
(:func:`~cascade_jax.agentic.driver.pack_episodes`) into the padded ``[G·n, T]`` RLBatch the GRPO
step consumes, ``T = rollout.sampling.max_prompt_len + rollout.sampling.max_response_len`` (one program):

* ``loss_mask`` 1 only on the model's own sampled tokens of every turn (prompt, template
  context and tool results 0), ``rollout_logp`` the engine's sampling log-probs there;
* ``rewards [G·n]`` the episodes' rewards, ``group_ids`` the task index (GRPO's groups are the
  ``n`` episodes of one task), ``finish_reason`` ``stop`` (the environment ended it) or
  ``length`` (a limit did), ``policy_version`` per row the oldest weight version of its turns;
* ``sampling``: the run's sampling contract (the episodes sample with its temperature,
  ``top_p``, ``top_k``).

:func:`evaluate_episodes` is the domain's evaluation: ``eval.prompts`` held-out tasks (seed
``eval.seed``) × ``eval.k`` episodes, the mean reward (``avg@k``) and its standard error.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from cascade_jax.config import AGENTIC_DOMAINS, Config
from cascade_jax.rl.batch import RLBatch
from cascade_jax.rollout.types import SamplingParams

from .driver import BlockingEngine, DriverStats, pack_episodes, run_episodes
from .episode import Episode, EpisodeLimits
from .lookup import LookupEnv, lookup_tasks
from .render import ChatRenderer
from .swe import SWEEnv
from .swe_tasks import swe_tasks

__all__ = ["ENVIRONMENTS", "step_tasks", "episode_limits", "draw_episodes", "agentic_batch",
           "evaluate_episodes"]

#: ``agentic.env`` -> (environment factory, task generator ``(n, seed, **task_args)``)
ENVIRONMENTS: dict = {"lookup": (LookupEnv, lookup_tasks), "swe": (SWEEnv, swe_tasks)}


def step_tasks(config: Config, n: int, seed: int) -> list:
    """``n`` tasks of ``config.agentic.env`` drawn with ``seed`` (``agentic.task_args`` passed
    on; a bad argument is a one-line error naming it)."""
    a = config.agentic
    gen = ENVIRONMENTS[a.env][1]
    try:
        return gen(n, seed=seed, **a.task_args)
    except TypeError as e:
        raise ValueError(f"agentic.task_args: {e}") from None


def episode_limits(config: Config) -> EpisodeLimits:
    """The episode limits of the stage (:class:`AgenticConfig` doc)."""
    a, r = config.agentic, config.rollout.sampling
    return EpisodeLimits(max_turns=a.max_turns, max_tokens=r.max_prompt_len + r.max_response_len,
                         max_new_tokens=a.max_new_tokens or r.max_response_len,
                         end_on_length=a.end_on_length)


def draw_episodes(config: Config, engine, renderer: ChatRenderer, tasks: list, *, n: int,
                  seed: int, sampling: SamplingParams,
                  stats: Optional[DriverStats] = None) -> list[Episode]:
    """``n`` episodes of every task (task-major: episode ``i·n + j`` is sample ``j`` of task
    ``i``), sampled with ``sampling``'s temperature / top-p / top-k and seeds derived from
    ``seed``. An engine without ``submit`` (a served engine's client) runs through
    :class:`BlockingEngine`."""
    a = config.agentic
    blocking = None if hasattr(engine, "submit") else BlockingEngine(engine, a.tool_workers * 2)
    try:
        return run_episodes(blocking or engine, [t for t in tasks for _ in range(n)],
                            ENVIRONMENTS[a.env][0], renderer, limits=episode_limits(config),
                            temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, seed=seed, tool_workers=a.tool_workers,
                            domain=AGENTIC_DOMAINS[a.env], stats=stats, keep_cache=a.keep_cache,
                            timeout_s=config.rollout.servers.request_timeout_s * a.max_turns)
    finally:
        if blocking is not None:
            blocking.close()


def agentic_batch(config: Config, engine, renderer: ChatRenderer, sampling: SamplingParams, *,
                  seed: int, num_experts: Optional[int],
                  version_of: Callable[[str], int]) -> tuple[RLBatch, dict]:
    """One GRPO step's ``(RLBatch, info)`` (module doc): tasks and sampling seeds from ``seed``;
    ``version_of`` maps an engine weight-version label to its trainer step. ``info``: the
    domain's mean reward, groups with reward variance, turns per episode, sampled tokens per
    episode (p50), the share of truncated episodes, and the generation / tool share of the
    rollout's wall time."""
    r = config.rollout.sampling
    G, n = config.data.batch_prompts, r.n_samples
    tasks = step_tasks(config, G, seed)
    stats = DriverStats()
    eps = draw_episodes(config, engine, renderer, tasks, n=n, seed=seed, sampling=sampling,
                        stats=stats)
    batch = pack_episodes(eps, group_ids=np.repeat(np.arange(G), n),
                          seq_len=r.max_prompt_len + r.max_response_len, num_experts=num_experts)
    oldest = [min((version_of(v) for v in e.weight_versions if v is not None), default=None)
              for e in eps]
    known = [v for v in oldest if v is not None]
    if not known:
        raise ValueError("agentic rollouts: no episode sampled a turn (every one ended at its "
                         "start: see the environment's reset)")
    versions = np.asarray([min(known) if v is None else v for v in oldest], np.int32)
    batch = batch.replace(policy_version=jnp.asarray(versions), sampling=sampling.unseeded())
    rewards = np.asarray([e.reward for e in eps], np.float64).reshape(G, n)
    d = stats.as_dict()
    dom = AGENTIC_DOMAINS[config.agentic.env]
    info = {"prompts_drawn": float(G),
            "groups_with_variance": float(np.sum(rewards.std(axis=1) > 0)),
            "response_len_p50": float(np.median([e.loss_mask.sum() for e in eps])),
            "truncated_frac": float(np.mean([e.finish_reason == "length" for e in eps])),
            f"reward/{dom}": float(rewards.mean()),
            "agentic/turns_per_episode": stats.turns / len(eps),
            "agentic/gen_share": d["gen_share"], "agentic/tool_share": d["tool_share"]}
    return batch, info


def evaluate_episodes(config: Config, engine, renderer: ChatRenderer,
                      sampling: SamplingParams) -> dict:
    """The agentic domain's held-out score (module doc): ``{"domains": {domain: {"avg@k",
    "se", "n_episodes"}}, "score": avg@k, "flat": {...}, "rewards": [per episode]}``, with
    ``se = std(rewards, ddof=1) / sqrt(N)`` over the ``N = eval.prompts × eval.k`` episodes."""
    e = config.eval
    tasks = step_tasks(config, e.prompts, e.seed)
    sp = dataclasses.replace(sampling, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k)
    eps = draw_episodes(config, engine, renderer, tasks, n=e.k, seed=e.seed, sampling=sp)
    rewards = np.asarray([ep.reward for ep in eps], np.float64)
    mean = float(rewards.mean())
    se = float(rewards.std(ddof=1) / np.sqrt(len(rewards))) if len(rewards) > 1 else float("nan")
    dom = AGENTIC_DOMAINS[config.agentic.env]
    k = e.k
    return {"domains": {dom: {f"avg@{k}": mean, "se": se, "n_episodes": len(rewards)}},
            "score": mean, "flat": {f"{dom}/avg@{k}": mean, f"{dom}/se": se, "score": mean},
            "rewards": rewards.tolist()}
