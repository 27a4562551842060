"""Chat-template rendering with jinja2, as transformers' ``apply_chat_template`` does it.

The template is the checkpoint's own Jinja text (:attr:`Tokenizer.chat_template`). It is rendered
in a sandboxed jinja2 environment configured like transformers' (``trim_blocks``,
``lstrip_blocks``, loop controls, a ``tojson`` filter that does not HTML-escape,
``raise_exception``, ``strftime_now``, the ``{% generation %}`` block) with the same variables
(``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special-token strings and
template kwargs such as ``enable_thinking``). The text is tokenized without added special tokens.

Loss mask: a token is an assistant token iff its character span overlaps a ``{% generation %}``
block of the rendered text (transformers' ``return_assistant_tokens_mask`` rule). Templates
without generation blocks fall back to ChatML: from the end of each ``<|im_start|>assistant\\n``
header through the turn's ``<|im_end|>``. The template decides what an assistant turn contains
(e.g. the tiny and Nemotron templates drop the reasoning of turns before the last user turn).
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
from typing import NamedTuple, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cascade_jax.data.tokenizer import Tokenizer

__all__ = ["ChatRender", "render_chat", "render_text", "assistant_mask", "ChatTemplateError",
           "ROLES"]

#: message roles the data layer accepts (the template decides how each renders)
ROLES = ("system", "user", "assistant", "tool")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The template raised (``raise_exception``) or cannot render the conversation."""


class ChatRender(NamedTuple):
    """``text``: the rendered string; ``ids``: ``[L]`` int32 token ids; ``loss_mask``: ``[L]``
    float32, 1.0 on assistant tokens (see module doc)."""

    text: str
    ids: np.ndarray
    loss_mask: np.ndarray


_TRACKING: contextvars.ContextVar = contextvars.ContextVar("cascade_generation_spans", default=None)


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged and, while tracking,
    records the body's character span in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

    def _span(self, caller):
        text = caller()
        state = _TRACKING.get()
        if state is not None:
            blocks, spans = state
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: line {e.lineno}: {e.message}") from None


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _prepare_messages(messages: Sequence[dict]) -> list[dict]:
    """Plain copies; a message's reasoning is visible under every name templates read
    (``reasoning_content``, ``thinking``), as in transformers."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}]: expected a dict with 'role', got {type(m).__name__}")
        m = _plain(m)
        r = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        out.append(m)
    return out


def render_text(tokenizer: Tokenizer, messages: Sequence[dict], *, tools=None,
                thinking: bool = True, add_generation_prompt: bool = True, track: bool = False,
                **template_kwargs):
    """The rendered string, and (``track=True``) the ``[(start, end)]`` character spans of the
    template's generation blocks."""
    tmpl = _compile(tokenizer.chat_template)
    variables = {**tokenizer.special_tokens, "enable_thinking": thinking, **template_kwargs}
    variables.update(messages=_prepare_messages(messages),
                     tools=None if tools is None else _plain(list(tools)), documents=None,
                     add_generation_prompt=add_generation_prompt)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((blocks, spans)) if track else None
    try:
        for b in tmpl.generate(**variables):
            blocks.append(b)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    finally:
        if token is not None:
            _TRACKING.reset(token)
    text = "".join(blocks)
    return (text, spans) if track else text


def _chatml_spans(text: str) -> list[tuple[int, int]]:
    spans, header, end = [], "<|im_start|>assistant\n", "<|im_end|>"
    pos = text.find(header)
    while pos >= 0:
        s = pos + len(header)
        e = text.find(end, s)
        e = len(text) if e < 0 else e + len(end)
        spans.append((s, e))
        pos = text.find(header, e)
    return spans


def assistant_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """``[L]`` float32: 1.0 where token ``[start, end)`` (``offsets [L, 2]``) overlaps a span."""
    mask = np.zeros(len(offsets), np.float32)
    if len(spans) == 0 or len(offsets) == 0:
        return mask
    s = np.asarray(spans, np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    # token overlaps span j iff tok_end > s_j and tok_start < e_j
    hit = (ends[:, None] > s[None, :, 0]) & (starts[:, None] < s[None, :, 1])
    mask[hit.any(axis=1)] = 1.0
    return mask


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict], *, tools=None,
                thinking: bool = True, add_generation_prompt: bool = True,
                train_turns: Optional[Sequence[bool]] = None, **template_kwargs) -> ChatRender:
    """Render ``messages`` (OpenAI-style dicts: ``role`` in :data:`ROLES`, ``content``, optional
    ``reasoning_content`` and ``tool_calls``) with the tokenizer's chat template and tokenize.

    ``thinking`` is passed as ``enable_thinking``; ``tools`` are JSON-schema function specs.
    Returns ``(text, ids [L] int32, loss_mask [L] float32)``; unpack ``text, ids, _ = ...``.
    For RL prompts use ``add_generation_prompt=True``; for SFT rows ``False``.
    ``train_turns``: one flag per assistant turn (in order); turns flagged false get no loss
    (the template must render one assistant span per assistant message).
    """
    text, spans = render_text(tokenizer, messages, tools=tools, thinking=thinking,
                              add_generation_prompt=add_generation_prompt, track=True,
                              **template_kwargs)
    if not _GENERATION_RE.search(tokenizer.chat_template):
        spans = _chatml_spans(text)
    if train_turns is not None:
        n_turns = sum(m.get("role") == "assistant" for m in messages)
        spans = spans[:n_turns]  # a trailing generation prompt is no assistant turn
        if len(train_turns) != n_turns or len(spans) != n_turns:
            raise ChatTemplateError(
                f"train_turns: {len(train_turns)} flags for {n_turns} assistant turns "
                f"({len(spans)} assistant spans rendered)")
        spans = [sp for sp, keep in zip(spans, train_turns) if keep]
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ChatRender(text, ids, assistant_mask(offsets, spans))
