"""The environment protocol of multi-turn episodes.

An environment is one episode's world. The rollout loop (:mod:`cascade_jax.agentic.episode`)
drives it::

    reset = env.reset(task)              # -> Reset(messages, tools): the conversation's start
    while True:
        turn = <the policy's parsed assistant turn>      # render.AssistantTurn
        step = env.step(turn)            # -> Step(observations, done, reward, info)
        if step.done: break              # step.reward is the episode's reward
        <observations go back to the policy as tool messages>
    # or the loop stops the episode at a limit (turns, tokens, wall time, a turn cut by
    # max_new_tokens): reward = env.truncate(reason)
    env.close()

Rules: ``reset`` is called once, then ``step`` once per assistant turn until it returns
``done``; exactly one of the final ``step`` (``done=True``, ``reward`` set) or ``truncate`` gives
the reward; ``close`` is always called (it frees the episode's sandbox copy). Observations are
strings, rendered as ``tool`` role messages (the template's tool role: ``<tool_response>`` blocks
in a user turn). Environments never raise for anything the model wrote: malformed markup,
unknown tools, bad arguments and contained sandbox failures are observations (see
:class:`ToolEnvironment`).

:class:`ToolEnvironment` implements the common shape: a table of tools (JSON-schema spec +
function of the string arguments); a turn without a tool call is the final answer (scored by
:meth:`ToolEnvironment.score_answer`), a call of the ``finish`` tool (if declared) ends the
episode too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

from .render import AssistantTurn

__all__ = ["Reset", "Step", "Environment", "Tool", "ToolEnvironment", "tool_spec"]


@dataclasses.dataclass(frozen=True)
class Reset:
    """``messages``: the conversation's first messages (system / user); ``tools``: JSON-schema
    function specs the template declares (``None``: none)."""

    messages: tuple
    tools: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class Step:
    """``observations``: one string per tool result (``tool`` messages); ``done``: the episode
    ended, ``reward`` then holds its reward; ``info``: anything for logs (e.g. the scorer's
    reason)."""

    observations: tuple = ()
    done: bool = False
    reward: Optional[float] = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.done and self.reward is None:
            raise ValueError("Step.reward: a finished step needs a reward")
        if not self.done and not self.observations:
            raise ValueError("Step.observations: a step that does not end the episode needs at "
                             "least one observation")


@runtime_checkable
class Environment(Protocol):
    """One episode's environment (module doc)."""

    def reset(self, task: Mapping[str, Any]) -> Reset:
        """Start the episode for ``task`` (a task row: ``prompt``, ``metadata``, ...)."""

    def step(self, turn: AssistantTurn) -> Step:
        """Act on one assistant turn: run its tool calls, or end the episode."""

    def truncate(self, reason: str) -> float:
        """The loop stopped the episode (``reason``: ``turns``, ``tokens``, ``time``,
        ``length``); the reward of the state as it is."""

    def close(self) -> None:
        """Free the episode's resources (idempotent)."""


def tool_spec(name: str, description: str, params: Mapping[str, tuple[str, str]],
              required: Sequence[str] = ()) -> dict:
    """An OpenAI-style function spec: ``params`` maps argument name to ``(type, description)``."""
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object",
                       "properties": {k: {"type": t, "description": d} for k, (t, d) in params.items()},
                       "required": list(required)}}}


@dataclasses.dataclass(frozen=True)
class Tool:
    """``spec`` (:func:`tool_spec`) and ``fn(**string_arguments) -> str`` (the observation)."""

    spec: dict
    fn: Callable[..., str]

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


class ToolEnvironment:
    """Base for tool-using environments (module doc). Subclasses set ``self.tools`` (name ->
    :class:`Tool`) and ``self.messages`` in :meth:`reset` and implement :meth:`score_answer`.

    ``finish_tool``: name of a tool that ends the episode (its reward is
    :meth:`score_answer` of the turn); ``max_calls_per_turn``: more calls in one turn are an
    error observation (none run)."""

    finish_tool: Optional[str] = None
    max_calls_per_turn: int = 4

    def __init__(self):
        self.tools: dict = {}
        self.final_info: dict = {}  # extra info of the final score (e.g. per-test outcomes)

    # ---- to implement
    def reset(self, task: Mapping[str, Any]) -> Reset:
        raise NotImplementedError

    def score_answer(self, turn: Optional[AssistantTurn]) -> tuple[float, str]:
        """``(reward, reason)`` for the final turn (``None``: the episode was truncated)."""
        raise NotImplementedError

    # ---- protocol
    def step(self, turn: AssistantTurn) -> Step:
        if turn.parse_error is not None:
            return Step((f"error: {turn.parse_error}; no tool was run",))
        if not turn.calls or any(c.name == self.finish_tool for c in turn.calls):
            reward, reason = self.score_answer(turn)
            return Step(done=True, reward=float(reward), info={**self.final_info, "reason": reason})
        if len(turn.calls) > self.max_calls_per_turn:
            return Step((f"error: {len(turn.calls)} tool calls in one turn; at most "
                         f"{self.max_calls_per_turn} are run",))
        return Step(tuple(self.call(c.name, c.arguments) for c in turn.calls))

    def call(self, name: str, arguments: Mapping[str, str]) -> str:
        """Run one tool call; any problem becomes an ``error: ...`` observation."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; available: {', '.join(sorted(self.tools))}"
        props = tool.spec["function"]["parameters"]["properties"]
        required = tool.spec["function"]["parameters"].get("required", [])
        unknown = [a for a in arguments if a not in props]
        missing = [a for a in required if a not in arguments]
        if unknown or missing:
            return (f"error: tool {name!r}: " + (f"unknown argument(s) {unknown} " if unknown else "")
                    + (f"missing argument(s) {missing}" if missing else "")).rstrip()
        try:
            return str(tool.fn(**arguments))
        except (ValueError, TypeError, KeyError, OSError) as e:
            return f"error: tool {name!r}: {type(e).__name__}: {e}"

    def truncate(self, reason: str) -> float:
        return float(self.score_answer(None)[0])

    def close(self) -> None:
        pass
