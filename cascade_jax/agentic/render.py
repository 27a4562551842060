"""One episode = one token row: the policy's tokens as sampled, the context as the template renders it.

A multi-turn episode is trained as a single sequence ``prompt ++ turn_1 ++ obs_1 ++ turn_2 ++ ...``
(token-in, token-out): the tokens of an assistant turn are exactly the ones the engine sampled
(loss mask 1, their sampling log-probs kept), everything else is context the template renders
(loss mask 0). Context tokens come from the checkpoint's chat template
(:func:`cascade_jax.data.chat.render_text`):

* the first prompt is ``render(messages, add_generation_prompt=True)``;
* after assistant turn ``k`` and the environment's observations ``obs_k`` (tool results, role
  ``tool``), the context appended is the text the template puts *after* the turn's stop token
  (the assistant turn's closing ``<|im_end|>``) up to the next generation prompt::

      base = render(messages + [turn_k], add_generation_prompt=False)
      full = render(messages + [turn_k] + obs_k, add_generation_prompt=True)
      between = base[after the last stop-token text:] + full[len(base):]

  which requires ``full`` to extend ``base`` (prefix stability; templates that rewrite earlier
  turns when a message is added, e.g. dropping reasoning before a new *user* turn, raise
  :class:`RenderError` — observations are tool messages, which the tiny and Nemotron templates
  render without touching earlier turns).

Because the stop token is a special token, tokenisation never merges across it, so when the
model's text is the template's canonical rendering of its parsed message (``AssistantTurn.
canonical``), the row equals ``encode(render(whole conversation))`` cut after the last stop
token, token for token (no drift between incremental and full rendering); otherwise the row
keeps the model's own tokens (what was sampled is what is trained on).

Parsing an assistant turn: the text is the decoded response without the stop token; in thinking
mode (the generation prompt opens ``<think>\\n``) the reasoning is the text before ``</think>``
(one ``\\n`` padding removed on each side); tool calls are parsed from the rest with the
tool-call scorer's parser (:func:`cascade_jax.rewards.tool_call.parse_tool_calls`); the message
is OpenAI-style (``content`` = the text before the first ``<tool_call>``, ``tool_calls`` with
string arguments, ``reasoning_content``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from cascade_jax.data.chat import render_text
from cascade_jax.data.tokenizer import Tokenizer
from cascade_jax.rewards.tool_call import ToolCallParseError, parse_tool_calls

__all__ = ["AssistantTurn", "ChatRenderer", "EpisodeRow", "RenderError"]


class RenderError(ValueError):
    """The template cannot render the episode incrementally (the message says why)."""


@dataclasses.dataclass(frozen=True)
class AssistantTurn:
    """One parsed assistant turn.

    text           the model's text (decoded response without the stop token's text)
    message        OpenAI-style assistant message for the template
    calls          parsed tool calls (empty on a parse error or when there are none)
    parse_error    the parser's message for malformed tool-call markup or an unclosed
                   ``<think>``, else None
    answer         the final answer (text after the reasoning, before any tool call)
    finish_reason  the engine's finish reason: ``stop`` or ``length`` (cut by max_new_tokens)
    """

    text: str
    message: dict
    calls: tuple
    parse_error: Optional[str]
    answer: str
    finish_reason: str = "stop"


@dataclasses.dataclass
class EpisodeRow:
    """The episode's token row, built incrementally. ``tokens``, ``loss_mask`` (1.0 on sampled
    tokens), ``logprobs`` (sampling log-probs on sampled tokens, 0 elsewhere) are aligned
    (``rl.batch`` layout); ``turns`` holds each assistant turn's ``(start, end)`` columns."""

    tokens: list = dataclasses.field(default_factory=list)
    loss_mask: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    turns: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add_context(self, ids) -> None:
        ids = [int(t) for t in ids]
        self.tokens += ids
        self.loss_mask += [0.0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def add_model(self, ids, logprobs) -> None:
        ids = [int(t) for t in ids]
        if len(logprobs) != len(ids):
            raise ValueError(f"logprobs: {len(logprobs)} values for {len(ids)} sampled tokens")
        start = len(self.tokens)
        self.tokens += ids
        self.loss_mask += [1.0] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.turns.append((start, len(self.tokens)))

    def arrays(self):
        """``(tokens [L] int32, loss_mask [L] float32, logprobs [L] float32)``."""
        return (np.asarray(self.tokens, np.int32), np.asarray(self.loss_mask, np.float32),
                np.asarray(self.logprobs, np.float32))


class ChatRenderer:
    """Render and parse an episode with ``tokenizer``'s chat template (module doc).

    ``thinking`` is the template's ``enable_thinking``; ``stop_token`` (default the tokenizer's
    EOS, ``<|im_end|>`` for ChatML templates) ends every assistant turn."""

    def __init__(self, tokenizer: Tokenizer, *, thinking: bool = False,
                 stop_token: Optional[str] = None, **template_kwargs):
        self.tokenizer = tokenizer
        self.thinking = bool(thinking)
        self.stop_text = stop_token or tokenizer.special_tokens.get("eos_token")
        if not self.stop_text:
            raise RenderError("stop_token: the tokenizer has no eos_token; pass stop_token")
        self.stop_id = tokenizer.token_id(self.stop_text)
        self.template_kwargs = template_kwargs

    def render(self, messages: Sequence[dict], tools=None, *, add_generation_prompt: bool) -> str:
        return render_text(self.tokenizer, messages, tools=tools, thinking=self.thinking,
                           add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    # ---- context tokens
    def prompt_ids(self, messages: Sequence[dict], tools=None) -> np.ndarray:
        """``[P]`` int32: the first prompt (generation prompt included)."""
        return self.tokenizer.encode(self.render(messages, tools, add_generation_prompt=True))

    def continuation_ids(self, messages: Sequence[dict], observations: Sequence[dict],
                         tools=None) -> np.ndarray:
        """``[C]`` int32: the context after the last assistant turn of ``messages`` (whose stop
        token is already in the row) through ``observations`` and the next generation prompt."""
        base = self.render(messages, tools, add_generation_prompt=False)
        full = self.render(list(messages) + list(observations), tools, add_generation_prompt=True)
        if not full.startswith(base):
            raise RenderError("the chat template re-renders earlier turns when the observations "
                              "are added (not prefix-stable); use tool-role observations")
        cut = base.rfind(self.stop_text)
        if cut < 0:
            raise RenderError(f"the rendered assistant turn has no stop token {self.stop_text!r}")
        return self.tokenizer.encode(base[cut + len(self.stop_text):] + full[len(base):])

    def conversation_text(self, messages: Sequence[dict], tools=None) -> str:
        """The whole conversation as the template renders it, cut after the last stop token:
        what an episode's row tokenises as when every turn is canonical."""
        text = self.render(messages, tools, add_generation_prompt=False)
        cut = text.rfind(self.stop_text)
        return text if cut < 0 else text[:cut + len(self.stop_text)]

    # ---- parsing
    def parse(self, response_ids, finish_reason: str = "stop") -> AssistantTurn:
        """Parse the sampled ``response_ids`` into an :class:`AssistantTurn` (module doc)."""
        text = self.tokenizer.decode(response_ids)
        if text.endswith(self.stop_text):
            text = text[:-len(self.stop_text)]
        return self.parse_text(text, finish_reason)

    def parse_text(self, text: str, finish_reason: str = "stop") -> AssistantTurn:
        message: dict = {"role": "assistant"}
        error = None
        rest = text
        if self.thinking:
            head, sep, tail = text.partition("</think>")
            if not sep:
                error = "unclosed <think> (no </think> in the turn)"
                message["reasoning_content"] = text
                message["content"] = ""
                return AssistantTurn(text, message, (), error, "", finish_reason)
            message["reasoning_content"] = head[:-1] if head.endswith("\n") else head
            rest = tail[1:] if tail.startswith("\n") else tail
        calls: tuple = ()
        i = rest.find("<tool_call>")
        content = rest if i < 0 else rest[:i]
        content = content[:-1] if (i >= 0 and content.endswith("\n")) else content
        try:
            calls = tuple(parse_tool_calls(rest))
        except ToolCallParseError as e:
            error = f"malformed tool call: {e}"
            content = rest
        message["content"] = content
        if calls:
            message["tool_calls"] = [{"type": "function",
                                      "function": {"name": c.name, "arguments": dict(c.arguments)}}
                                     for c in calls]
        return AssistantTurn(text, message, calls, error, content.strip(), finish_reason)

    def is_canonical(self, messages: Sequence[dict], turn: AssistantTurn, tools=None) -> bool:
        """True when the template renders ``turn.message`` after ``messages`` as exactly the
        generation prompt's continuation ``turn.text`` + stop token."""
        prompt = self.render(messages, tools, add_generation_prompt=True)
        full = self.render(list(messages) + [turn.message], tools, add_generation_prompt=False)
        return full.startswith(prompt + turn.text + self.stop_text)

