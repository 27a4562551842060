"""``tool_call``: parse tool calls in the chat template's format and compare to expected calls.

Format (docs/algorithms.md §9, Qwen3-Coder style), one block per call, calls back to back::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

Metadata: ``expected_calls``: list of ``{"name": str, "arguments": {arg: value}}`` (an empty list
means the model must answer without calling a tool); optional ``ordered`` (default ``True``).

Rules (reward is binary, ``metrics["call_match"]`` is the fraction of expected calls matched):
1. Only the final answer (after ``</think>``) is parsed; an unclosed ``<think>`` scores 0.
2. Any malformed markup scores 0 with the parse error: unclosed or stray tags, a ``<function>``
   outside ``<tool_call>``, several functions in one call, a parameter outside a function, a
   duplicate parameter, or text after the last ``</tool_call>`` (the template forbids it).
3. A value is compared as JSON when the expected value is not a string (``3`` == ``3.0``,
   objects, lists, booleans); string values are compared after stripping the newline padding.
4. The calls must match the expected ones in count, names and arguments (exactly the expected
   argument names), in order unless ``ordered`` is false.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Optional

from cascade_jax.contract.formats import format_tool_call  # the format's home (re-exported)
from cascade_jax.rewards.base import (NO_ANSWER, MetadataError, Score, final_answer, require,
                                      values_match)

__all__ = ["ToolCall", "ToolCallParseError", "parse_tool_calls", "format_tool_call",
           "score_tool_call"]


class ToolCallParseError(ValueError):
    """The tool-call markup is malformed; the message says where."""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict  # argument name -> raw string value (newline padding stripped)


_TAG = re.compile(r"<(/?)(tool_call|function|parameter)(?:=([^>\n]*))?>")


def _strip_value(raw: str) -> str:
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    return raw


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Parse every tool call in ``text``; raise :class:`ToolCallParseError` on malformed markup."""
    calls: list[ToolCall] = []
    state = "outside"  # outside | call | function | parameter
    name: Optional[str] = None
    args: dict = {}
    param: Optional[str] = None
    value_start = 0
    last_end = None
    for m in _TAG.finditer(text):
        closing, tag, attr = m.group(1) == "/", m.group(2), m.group(3)
        where = f"at offset {m.start()} ({m.group(0)!r})"
        if state == "parameter" and not (closing and tag == "parameter"):
            continue  # values may contain anything but their own closing tag
        if not closing and attr is not None and tag == "tool_call":
            raise ToolCallParseError(f"<tool_call> takes no attribute {where}")
        if not closing and tag in ("function", "parameter") and not (attr or "").strip():
            raise ToolCallParseError(f"<{tag}=...> without a name {where}")
        if tag == "tool_call" and not closing:
            if state != "outside":
                raise ToolCallParseError(f"nested or unclosed <tool_call> {where}")
            state = "call"
        elif tag == "function" and not closing:
            if state != "call":
                raise ToolCallParseError(f"<function> outside <tool_call> or a second function "
                                         f"in one call {where}")
            state, name, args = "function", attr.strip(), {}
        elif tag == "parameter" and not closing:
            if state != "function":
                raise ToolCallParseError(f"<parameter> outside <function> {where}")
            param, value_start, state = attr.strip(), m.end(), "parameter"
            if param in args:
                raise ToolCallParseError(f"duplicate parameter {param!r} {where}")
        elif tag == "parameter":
            if state != "parameter":
                raise ToolCallParseError(f"</parameter> without an open <parameter> {where}")
            args[param] = _strip_value(text[value_start:m.start()])
            state = "function"
        elif tag == "function":
            if state != "function":
                raise ToolCallParseError(f"unexpected </function> {where}")
            calls.append(ToolCall(name, args))
            state = "call_done"
        elif tag == "tool_call":
            if state != "call_done":
                raise ToolCallParseError(f"</tool_call> without one complete <function> {where}")
            state, last_end = "outside", m.end()
    if state != "outside":
        raise ToolCallParseError(f"unclosed tag at end of text (state {state!r})")
    if last_end is not None and text[last_end:].strip():
        raise ToolCallParseError(f"text after the last </tool_call>: {text[last_end:].strip()[:60]!r}")
    return calls


def _value_matches(raw: str, expected: Any) -> bool:
    if isinstance(expected, str):
        return raw.strip() == expected.strip()
    try:
        got = json.loads(raw)
    except ValueError:
        return False
    return values_match(got, expected, tol=0.0)


def _call_matches(call: ToolCall, expected: Mapping[str, Any]) -> bool:
    exp_args = expected.get("arguments", {})
    return (call.name == expected["name"] and call.arguments.keys() == exp_args.keys()
            and all(_value_matches(call.arguments[k], exp_args[k]) for k in exp_args))


def score_tool_call(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    expected = require(meta, "expected_calls", list)
    for j, e in enumerate(expected):
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str):
            raise MetadataError(f"field 'expected_calls[{j}]': needs a string 'name'")
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER, {"call_match": 0.0})
    try:
        calls = parse_tool_calls(final)
    except ToolCallParseError as e:
        return Score(0.0, f"malformed tool call: {e}", {"call_match": 0.0})
    if not expected:
        ok = not calls
        return Score(float(ok), "no tool call, as expected" if ok else
                     f"expected no tool call, got {len(calls)}", {"call_match": float(ok)})
    if meta.get("ordered", True):
        matched = sum(_call_matches(c, e) for c, e in zip(calls, expected))
    else:
        remaining, matched = list(calls), 0
        for e in expected:
            for c in remaining:
                if _call_matches(c, e):
                    remaining.remove(c)
                    matched += 1
                    break
    frac = matched / len(expected)
    if matched == len(expected) and len(calls) == len(expected):
        return Score(1.0, f"all {len(expected)} tool call(s) match", {"call_match": 1.0})
    if not calls:
        return Score(0.0, f"no tool call in the final answer; expected "
                          f"{[e['name'] for e in expected]}", {"call_match": 0.0})
    got = [c.name for c in calls]
    return Score(0.0, f"{len(calls)} tool call(s) {got}, {matched} of {len(expected)} expected "
                      f"{[e['name'] for e in expected]} matched", {"call_match": frac})
