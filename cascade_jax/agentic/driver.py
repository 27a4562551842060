"""Episodes through the engine: many episodes at once, tools concurrent with decoding.

:func:`run_episodes` drives ``N`` :class:`~cascade_jax.agentic.episode.EpisodeRun` state machines
against a continuous-batching engine with the low-level API of
:class:`~cascade_jax.rollout.engine.JaxEngine` (``start`` / ``submit(request, on_done)``):

* every turn of every episode is one ``Request`` whose ``prompt_ids`` is the episode's whole row
  so far (re-prefilled each turn; with ``keep_cache=True`` and an engine built with
  ``keep_sessions=True`` each turn is submitted under the episode's session, so the engine keeps
  the slot's cache between turns and prefills only the new observation tokens), ``n = 1``, stop token = the renderer's, ``max_new_tokens``
  = the episode's remaining budget, ``seed = sample_seed(episode seed, turn)`` (so an episode's
  samples do not depend on the other episodes or on timing);
* a finished turn's callback (engine thread) only queues an event; the driver thread hands the
  environment step (tool calls in the sandbox, the final reward) to a thread pool of
  ``tool_workers`` and submits the next turn when it returns, so one episode's tools run while
  the engine decodes the others;
* the result is one :class:`~cascade_jax.agentic.episode.Episode` per task, in task order.

Served engines: :class:`BlockingEngine` gives any blocking ``RolloutEngine`` (the HTTP
``ServerClient`` in front of JAX rollout servers or SGLang, which send ``input_ids`` to
``/generate``) the ``start`` / ``submit`` interface, one ``generate`` call per turn on a thread
pool; log-probs come back per token as from the in-process engine.

:func:`pack_episodes` turns episodes into the padded :class:`~cascade_jax.rl.batch.RLBatch` the
GRPO step consumes (``loss_mask`` 1 only on sampled tokens, ``rollout_logp`` their sampling
log-probs).

Timing (:class:`DriverStats`): the driver records every generation and every environment call
as an interval; ``gen_busy_s`` / ``tool_busy_s`` are the lengths of the unions of those
intervals (wall time during which at least one generation / one tool call was running);
``overlap_s`` is the time during which both were (``gen + tool - |gen ∪ tool|``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from cascade_jax.rl.batch import RLBatch, pack_routed_experts
from cascade_jax.rollout.packing import domain_code, finish_code, version_code
from cascade_jax.rollout.types import Request, RolloutError, SamplingParams, sample_seed

from .env import Environment
from .episode import Episode, EpisodeLimits, EpisodeRun
from .render import ChatRenderer

__all__ = ["BlockingEngine", "DriverStats", "run_episodes", "pack_episodes", "union_length"]


class _Handle:
    """What :class:`BlockingEngine` hands to ``on_done``: ``result(timeout)`` -> the group."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def result(self, timeout: Optional[float] = None) -> tuple:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RolloutError(f"request not finished within {timeout} s") from None


class BlockingEngine:
    """``start`` / ``submit(request, on_done)`` over any blocking
    :class:`~cascade_jax.rollout.types.RolloutEngine` (e.g. the HTTP
    :class:`~cascade_jax.rollout.client.ServerClient` of served engines): each request is one
    ``engine.generate([request])`` call on a pool of ``max_inflight`` threads, so episodes run
    concurrently against servers as they do against the in-process engine."""

    def __init__(self, engine, max_inflight: int = 8):
        if max_inflight < 1:
            raise ValueError(f"max_inflight: must be >= 1, got {max_inflight}")
        self.engine = engine
        self._pool = concurrent.futures.ThreadPoolExecutor(max_inflight,
                                                           thread_name_prefix="agentic-generate")

    def start(self) -> None:
        pass

    def submit(self, request: Request, on_done: Callable, session=None) -> _Handle:
        """``session``: sent as the request's ``session_params.id`` (``str(session)``), so a JAX
        server with ``--keep-sessions`` prefills only the turn's new tokens."""
        kw = {} if session is None else {"sessions": [str(session)]}
        fut = self._pool.submit(lambda: self.engine.generate([request], **kw).groups[0])
        handle = _Handle(fut)
        fut.add_done_callback(lambda _: on_done(handle))
        return handle

    def health(self) -> bool:
        return self.engine.health()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length of the union of ``[(start, end)]`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


@dataclasses.dataclass
class DriverStats:
    """Wall time of a :func:`run_episodes` call and the busy time of each kind of work."""

    wall_s: float = 0.0
    gen_busy_s: float = 0.0
    tool_busy_s: float = 0.0
    overlap_s: float = 0.0  # |gen ∩ tool| = gen_busy + tool_busy - |gen ∪ tool|
    episodes: int = 0
    turns: int = 0
    sampled_tokens: int = 0

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        w = self.wall_s or 1.0
        return {"episodes": self.episodes, "turns": self.turns, "wall_s": self.wall_s,
                "episodes_per_s": self.episodes_per_s, "gen_share": self.gen_busy_s / w,
                "tool_share": self.tool_busy_s / w, "overlap_share": self.overlap_s / w,
                "sampled_tokens": self.sampled_tokens}


def run_episodes(engine, tasks: Sequence[Mapping[str, Any]], make_env: Callable[[], Environment],
                 renderer: ChatRenderer, *, limits: EpisodeLimits = EpisodeLimits(),
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, seed: int = 0,
                 tool_workers: int = 4, domain: Optional[str] = None,
                 timeout_s: Optional[float] = None, stats: Optional[DriverStats] = None,
                 keep_cache: bool = False) -> list[Episode]:
    """Run one episode per task concurrently on ``engine`` (module doc). Episode ``i`` is seeded
    ``sample_seed(seed, i)``. ``engine.start()`` is called (idempotent) and left running.
    ``stats``: filled with the timing. Raises :class:`RolloutError` when the engine fails or
    ``timeout_s`` passes."""
    if tool_workers < 1:
        raise ValueError(f"tool_workers: must be >= 1, got {tool_workers}")
    runs = [EpisodeRun(make_env(), t, renderer, limits, domain=domain) for t in tasks]
    seeds = [sample_seed(seed, i) for i in range(len(runs))]
    events: queue.Queue = queue.Queue()
    gen_iv, tool_iv = [], []
    iv_lock = threading.Lock()
    submitted: dict = {}
    t_start = time.monotonic()
    deadline = None if timeout_s is None else t_start + timeout_s

    def env_work(i: int, fn):
        t = time.monotonic()
        try:
            fn()
            events.put(("ready", i, None))
        except BaseException as e:  # EpisodeRun already turns environment errors into endings
            events.put(("fail", i, e))
        finally:
            with iv_lock:
                tool_iv.append((t, time.monotonic()))

    def submit(i: int) -> bool:
        req = runs[i].request()
        if req is None:
            return False
        prompt, budget = req
        sp = SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop_token_ids=(renderer.stop_id,),
                            seed=sample_seed(seeds[i], len(runs[i].turns)))
        submitted[i] = time.monotonic()
        engine.submit(Request(prompt_ids=tuple(prompt), sampling=sp, rid=f"ep{i}-t{len(runs[i].turns)}-{id(runs)}"),
                      on_done=lambda h, i=i: events.put(("gen", i, h)),
                      **({"session": (id(runs), i)} if keep_cache else {}))
        return True

    engine.start()
    open_eps = len(runs)
    with concurrent.futures.ThreadPoolExecutor(tool_workers, thread_name_prefix="agentic-tools") as pool:
        for i, r in enumerate(runs):
            pool.submit(env_work, i, r.start)
        while open_eps:
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            try:
                kind, i, payload = events.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    raise RolloutError(f"run_episodes: not finished within {timeout_s} s")
                if hasattr(engine, "health") and not engine.health():
                    raise RolloutError("run_episodes: the engine failed")
                continue
            if kind == "fail":
                raise RolloutError(f"episode {i}: {type(payload).__name__}: {payload}") from payload
            if kind == "ready":
                if not submit(i):
                    open_eps -= 1
                continue
            # kind == "gen": the turn's sample
            now = time.monotonic()
            with iv_lock:
                gen_iv.append((submitted[i], now))
            sample = payload.result(timeout=0)[0]
            more = runs[i].on_generation(sample.response_ids, sample.logprobs, sample.finish_reason,
                                         gen_s=now - submitted[i],
                                         weight_version=sample.weight_version,
                                         routed_experts=sample.routed_experts)
            if more:
                pool.submit(env_work, i, runs[i].on_step)
            else:
                open_eps -= 1
    episodes = [r.result() for r in runs]
    if stats is not None:
        stats.wall_s = time.monotonic() - t_start
        stats.gen_busy_s = union_length(gen_iv)
        stats.tool_busy_s = union_length(tool_iv)
        stats.overlap_s = stats.gen_busy_s + stats.tool_busy_s - union_length(gen_iv + tool_iv)
        stats.episodes = len(episodes)
        stats.turns = sum(len(e.turns) for e in episodes)
        stats.sampled_tokens = int(sum(e.loss_mask.sum() for e in episodes))
    return episodes


def pack_episodes(episodes: Sequence[Episode], *, group_ids: Optional[Sequence[int]] = None,
                  pad_multiple: int = 8, seq_len: Optional[int] = None,
                  num_experts: Optional[int] = None) -> RLBatch:
    """Padded :class:`RLBatch` of episodes: row ``n`` = episode ``n``'s token row; ``loss_mask``
    / ``rollout_logp`` from the row (1 / the sampling log-prob on sampled tokens only);
    ``rewards``; ``group_ids`` (default: each episode its own group — pass the task index so
    the ``n`` episodes of a task form one GRPO group); ``finish_reason`` (``stop`` when the
    environment ended the episode, ``length`` for a limit); ``domain_ids`` from
    ``Episode.domain`` (``-1`` for none); ``policy_version`` when every turn's weight version is
    the same decimal integer; ``routed_experts`` when every episode carries them
    (``num_experts`` required). ``T`` = ``seq_len`` or the longest row rounded up to
    ``pad_multiple``. An episode without tokens (ended at its start, e.g. by an error in the
    environment's reset) is an all-padding row with its reward (no loss tokens)."""
    N = len(episodes)
    if N == 0:
        raise ValueError("episodes: nothing to pack")
    lens = [len(e.tokens) for e in episodes]
    T = seq_len if seq_len is not None else -(-max(max(lens), 1) // pad_multiple) * pad_multiple
    if max(lens) > T:
        raise ValueError(f"seq_len: {T} is shorter than the longest episode ({max(lens)} tokens)")
    tokens = np.zeros((N, T), np.int32)
    positions = np.zeros((N, T), np.int32)
    segments = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.float32)
    logp = np.zeros((N, T), np.float32)
    for n, e in enumerate(episodes):
        L = len(e.tokens)
        if L and e.loss_mask[0] != 0:
            raise ValueError(f"episodes[{n}]: the first token cannot carry loss")
        tokens[n, :L], positions[n, :L], segments[n, :L] = e.tokens, np.arange(L), 1
        mask[n, :L], logp[n, :L] = e.loss_mask, e.logprobs * e.loss_mask
    gids = np.arange(N, dtype=np.int32) if group_ids is None else np.asarray(group_ids, np.int32)
    if gids.shape != (N,):
        raise ValueError(f"group_ids: {gids.shape[0] if gids.ndim else 0} ids for {N} episodes")
    versions = []
    for e in episodes:
        vs = set(v for v in e.weight_versions if v is not None)
        versions.append(vs.pop() if len(vs) == 1 else "")
    rx = None
    if all(e.routed_experts is not None for e in episodes):
        if num_experts is None:
            raise ValueError("num_experts: required to pack routed_experts")
        known = []  # drop the trailing -1 rows (context after the last turn): packed as -1
        for e in episodes:
            r = np.asarray(e.routed_experts)
            free = (r < 0).all(axis=tuple(range(1, r.ndim)))
            n = r.shape[0] - int(np.argmin(free[::-1])) if not free.all() else 0
            known.append(r[:n])
        rx = pack_routed_experts(known, T, num_experts=num_experts)
    return RLBatch(
        tokens=jnp.asarray(tokens), positions=jnp.asarray(positions),
        segment_ids=jnp.asarray(segments), loss_mask=jnp.asarray(mask),
        rollout_logp=jnp.asarray(logp),
        rewards=jnp.asarray(np.asarray([e.reward for e in episodes], np.float32)),
        group_ids=jnp.asarray(gids),
        finish_reason=jnp.asarray(np.asarray([finish_code(e.finish_reason) for e in episodes], np.int32)),
        domain_ids=jnp.asarray(np.asarray([domain_code(e.domain) for e in episodes], np.int32)),
        policy_version=None if version_code(versions) is None else jnp.asarray(version_code(versions)),
        routed_experts=None if rx is None else jnp.asarray(rx))
