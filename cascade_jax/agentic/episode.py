"""The episode loop: environment + renderer + limits -> one RL row.

:class:`EpisodeRun` is the loop as a state machine, so a driver can interleave many episodes
(:mod:`cascade_jax.agentic.driver`: generation on the engine, environment steps on a thread
pool); :func:`run_episode` runs one episode with a synchronous :class:`Policy` (a scripted
policy in tests, or any callable). Per assistant turn::

    prompt = row.tokens                      # the whole conversation so far (re-prefilled)
    budget = min(limits.max_new_tokens, limits.max_tokens - len(row))
    response, logprobs, finish = policy(prompt, budget)
    row += response (loss 1, log-probs)      # render.EpisodeRow
    turn = renderer.parse(response)
    finish == "length"   -> end ("length"): env.truncate  (or, limits.end_on_length=False:
                            row += stop token (loss 0) and the environment acts on the turn)
    step = env.step(turn)
    step.done            -> end ("env"): step.reward
    row += continuation(observations)      (loss 0)
    limits: turns / tokens / time -> end: env.truncate(reason)

The row's ``finish_reason`` (for the batch) is ``stop`` when the environment ended the episode
and ``length`` when a limit did (so overlong filtering applies to truncated episodes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

from .env import Environment, Step
from .render import AssistantTurn, ChatRenderer, EpisodeRow

__all__ = ["EpisodeLimits", "Episode", "EpisodeRun", "Policy", "PolicyOutput", "ScriptedPolicy",
           "run_episode", "ENDINGS"]

#: why an episode ended: the environment, or a limit (turns, row tokens, wall time, a turn cut
#: by max_new_tokens), or an exception in environment code (a bug, recorded in ``info``)
ENDINGS = ("env", "turns", "tokens", "time", "length", "error")


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
    """``max_turns`` assistant turns; ``max_tokens`` tokens in the row (prompt, turns and
    observations); ``max_new_tokens`` per assistant turn; ``wall_s`` seconds per episode
    (checked between turns: a running generation or tool call is bounded by its own limits).
    ``end_on_length``: a turn cut by ``max_new_tokens`` ends the episode (``length``); when
    false the turn is closed with the stop token as context (no loss) and the environment acts
    on it like on any other turn."""

    max_turns: int = 8
    max_tokens: int = 2048
    max_new_tokens: int = 256
    wall_s: float = 600.0
    end_on_length: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name == "end_on_length":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"EpisodeLimits.{f.name}: must be positive, got {v!r}")


@dataclasses.dataclass
class Episode:
    """A finished episode.

    tokens / loss_mask / logprobs   ``[L]`` int32 / float32 / float32 (``rl.batch`` layout)
    reward          the episode's scalar reward
    ended_by        one of :data:`ENDINGS`
    finish_reason   ``stop`` (ended by the environment) or ``length`` (by a limit)
    messages        the conversation (OpenAI-style dicts)
    turns           parsed assistant turns
    canonical       every turn's text is its message's canonical rendering (then the row equals
                    the tokenised full conversation)
    info            the environment's final info (e.g. the scorer's reason), errors
    gen_s / tool_s  seconds spent generating / in environment steps (incl. the final reward)
    weight_versions the engine's weight version per turn
    routed_experts  ``[L - 1, L_moe, K]`` int32 when the engine returned them: the last turn's
                    (its prefill re-routes the whole row before it, decode the turn), -1 for
                    context appended after it (no sampled token follows), else None
    """

    task: Mapping[str, Any]
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    reward: float
    ended_by: str
    messages: list
    turns: list
    canonical: bool
    info: dict
    gen_s: float = 0.0
    tool_s: float = 0.0
    weight_versions: list = dataclasses.field(default_factory=list)
    routed_experts: Optional[np.ndarray] = None
    domain: Optional[str] = None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.ended_by == "env" else "length"


class EpisodeRun:
    """One episode as a state machine (module doc). Call :meth:`start`, then alternate
    :meth:`request` (``None`` once ended) / :meth:`on_generation` / :meth:`on_step`, then
    :meth:`result`. ``on_step`` and ``start`` may block (tools): run them off the decode loop."""

    def __init__(self, env: Environment, task: Mapping[str, Any], renderer: ChatRenderer,
                 limits: EpisodeLimits = EpisodeLimits(), *, domain: Optional[str] = None):
        self.env, self.task, self.renderer, self.limits = env, task, renderer, limits
        self.domain = domain
        self.row = EpisodeRow()
        self.messages: list = []
        self.tools = None
        self.turns: list = []
        self.canonical = True
        self.ended_by: Optional[str] = None
        self.reward: Optional[float] = None
        self.info: dict = {}
        self.gen_s = self.tool_s = 0.0
        self.versions: list = []
        self.routed_experts = None
        self._t0 = None
        self._pending: Optional[AssistantTurn] = None
        self._before: list = []

    @property
    def done(self) -> bool:
        return self.ended_by is not None

    def _end(self, how: str, reward: Optional[float] = None) -> None:
        if self.done:
            return
        self.ended_by = how
        t = time.monotonic()
        try:
            if reward is None:
                self.reward = float(self.env.truncate(how))
                self.info.update(getattr(self.env, "final_info", None) or {})
            else:
                self.reward = float(reward)
        except Exception as e:  # a bug in environment code: recorded, the rollout goes on
            self.ended_by, self.reward = "error", 0.0
            self.info["error"] = f"{type(e).__name__}: {e}"
        finally:
            self.tool_s += time.monotonic() - t
            self.env.close()

    def start(self) -> None:
        self._t0 = time.monotonic()
        try:
            reset = self.env.reset(self.task)
            self.messages = list(reset.messages)
            self.tools = None if reset.tools is None else list(reset.tools)
            self.row.add_context(self.renderer.prompt_ids(self.messages, self.tools))
        except Exception as e:
            self.info["error"] = f"reset: {type(e).__name__}: {e}"
            self._end("error", 0.0)
            return
        finally:
            self.tool_s += time.monotonic() - self._t0
        if len(self.row) >= self.limits.max_tokens:
            self._end("tokens")

    def request(self) -> Optional[tuple[list, int]]:
        """``(prompt ids, max_new_tokens)`` of the next turn, or None when the episode ended
        (a limit checked here ends it)."""
        if self.done:
            return None
        if time.monotonic() - self._t0 > self.limits.wall_s:
            self._end("time")
            return None
        budget = min(self.limits.max_new_tokens, self.limits.max_tokens - len(self.row))
        if budget <= 0:
            self._end("tokens")
            return None
        return list(self.row.tokens), int(budget)

    def on_generation(self, response_ids, logprobs, finish_reason: str, *, gen_s: float = 0.0,
                      weight_version: Optional[str] = None, routed_experts=None) -> bool:
        """Record a generated turn; True when :meth:`on_step` must run next."""
        self.gen_s += gen_s
        self.versions.append(weight_version)
        self.row.add_model(response_ids, logprobs)
        if routed_experts is not None:
            self.routed_experts = np.asarray(routed_experts)
        turn = self.renderer.parse(response_ids, finish_reason)
        self._before = list(self.messages)  # the canonical check runs off the driver thread
        self.turns.append(turn)
        self.messages.append(turn.message)
        if finish_reason != "stop":
            if self.limits.end_on_length or len(self.row) + 1 >= self.limits.max_tokens:
                self._check_canonical(turn)
                self._end("length")
                return False
            self.row.add_context([self.renderer.stop_id])  # close the cut turn (no loss)
        self._pending = turn
        return True

    def _check_canonical(self, turn: AssistantTurn) -> None:
        self.canonical &= self.renderer.is_canonical(self._before, turn, self.tools)

    def on_step(self) -> None:
        """Run the environment on the pending turn and append its observations."""
        turn, self._pending = self._pending, None
        self._check_canonical(turn)
        t = time.monotonic()
        try:
            step: Step = self.env.step(turn)
        except Exception as e:
            self.tool_s += time.monotonic() - t
            self.info["error"] = f"step: {type(e).__name__}: {e}"
            self._end("error", 0.0)
            return
        self.tool_s += time.monotonic() - t
        if step.done:
            self.info.update(step.info)
            self._end("env", step.reward)
            return
        if len(self.turns) >= self.limits.max_turns:
            self._end("turns")
            return
        obs = [{"role": "tool", "content": o} for o in step.observations]
        try:
            ids = self.renderer.continuation_ids(self.messages, obs, self.tools)
        except ValueError as e:  # RenderError, ChatTemplateError: recorded, the rollout goes on
            self.info["error"] = f"render: {type(e).__name__}: {e}"
            self._end("error", 0.0)
            return
        self.messages += obs
        if len(self.row) + len(ids) >= self.limits.max_tokens:
            self._end("tokens")
            return
        self.row.add_context(ids)

    def result(self) -> Episode:
        if not self.done:
            raise RuntimeError("result: the episode has not ended")
        tokens, mask, logp = self.row.arrays()
        rx = self.routed_experts
        if rx is not None:
            n = len(tokens) - 1  # fed tokens of the row
            if rx.shape[0] > n:
                rx = None
            elif rx.shape[0] < n:  # context after the last turn (no loss follows): routed freely
                rx = np.concatenate([rx, np.full((n - rx.shape[0],) + rx.shape[1:], -1, rx.dtype)])
        return Episode(self.task, tokens, mask, logp, float(self.reward), self.ended_by,
                       self.messages, self.turns, self.canonical, self.info, self.gen_s,
                       self.tool_s, self.versions, rx, self.domain)


@dataclasses.dataclass(frozen=True)
class PolicyOutput:
    response_ids: Sequence[int]
    logprobs: Sequence[float]
    finish_reason: str = "stop"


class Policy(Protocol):
    def __call__(self, prompt_ids: Sequence[int], max_new_tokens: int) -> PolicyOutput:
        """The next assistant turn (ending with the stop token when ``finish_reason`` is
        ``stop``)."""


class ScriptedPolicy:
    """Emits a fixed sequence of assistant texts (turn ``k`` gets ``texts[k]``; past the end the
    last one repeats), tokenised with the renderer's tokenizer plus the stop token; log-probs 0.
    A text longer than the turn's budget is cut (finish ``length``)."""

    def __init__(self, renderer: ChatRenderer, texts: Sequence[str]):
        if not texts:
            raise ValueError("texts: a scripted policy needs at least one turn")
        self.renderer = renderer
        self.texts = list(texts)
        self.k = 0

    def __call__(self, prompt_ids, max_new_tokens: int) -> PolicyOutput:
        text = self.texts[min(self.k, len(self.texts) - 1)]
        self.k += 1
        ids = list(self.renderer.tokenizer.encode(text)) + [self.renderer.stop_id]
        if len(ids) > max_new_tokens:
            ids = ids[:max_new_tokens]
            return PolicyOutput(ids, [0.0] * len(ids), "length")
        return PolicyOutput(ids, [0.0] * len(ids), "stop")


def run_episode(env: Environment, task: Mapping[str, Any], policy: Callable[..., PolicyOutput],
                renderer: ChatRenderer, limits: EpisodeLimits = EpisodeLimits(), *,
                domain: Optional[str] = None) -> Episode:
    """Run one episode synchronously with ``policy`` (module doc)."""
    run = EpisodeRun(env, task, renderer, limits, domain=domain)
    run.start()
    while True:
        req = run.request()
        if req is None:
            return run.result()
        t = time.monotonic()
        out = policy(req[0], req[1])
        if run.on_generation(out.response_ids, out.logprobs, out.finish_reason,
                             gen_s=time.monotonic() - t):
            run.on_step()
