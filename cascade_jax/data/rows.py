"""Rows: the field mapping from a source's row to the canonical fields, and row validation.

Canonical fields (``data.sources[i].fields`` maps each to a key of the row; dotted paths such as
``"params.input"`` reach nested keys; an unmapped field is read under its own name):

===============  =====  ========================================================================
field            used   meaning
===============  =====  ========================================================================
messages         both   list of ``{"role", "content", ["reasoning_content"], ["tool_calls"]}``;
                        roles ``system | user | assistant | tool``; thinking either inline
                        (``<think>...</think>`` at the start of ``content``) or in
                        ``reasoning_content`` (also accepted as ``reasoning`` / ``thinking``)
prompt           RL     a user message text, used when ``messages`` is absent
response         SFT    an assistant reply, used with ``prompt`` when ``messages`` is absent
reasoning        SFT    optional reasoning of that reply (its ``reasoning_content``)
system           both   optional system message text (with ``prompt``)
tools            both   optional list of JSON-schema function specs (OpenAI ``tools``)
train_turns      SFT    optional list of booleans, one per assistant turn: which turns carry
                        loss (default all); a per-message boolean ``train`` key works too
domain           both   canonical domain name (``cascade_jax.domains``); RL requires one
                        (from the row or from the source's ``domain``)
metadata         RL     dict handed to ``make_scorer(domain)`` as the verifier metadata;
                        ``metadata.KEY`` maps single keys (merged over ``metadata``)
id               both   optional row id (else ``file:line``)
===============  =====  ========================================================================

Mappings for the released Nemotron-Cascade-2 data (row formats as the dataset cards describe
them; verify the key names on the files you download):

* ``Nemotron-Cascade-2-SFT-Data``: OpenAI-style ``messages`` (reasoning inline or in
  ``reasoning_content``) and optional ``tools`` -> ``{"messages": "messages", "tools": "tools"}``.
* ``Nemotron-Cascade-2-RL-data``: a prompt plus the grading signal per domain (expected answer,
  ground-truth tool calls, instruction ids + kwargs, or a JSON schema). The card does not name
  the keys, so the mapping below only shows the shape (replace the right-hand sides with the
  file's keys): ``{"messages": "<prompt messages>", "tools": "<tools>", "domain": "<env>",
  "metadata.answer": "<expected answer>", "metadata.expected_calls": "<ground-truth calls>",
  "metadata.schema": "<schema>"}`` -- the metadata keys on the left are what
  ``cascade_jax.rewards.make_scorer(domain)`` reads. One source per subset with ``domain`` set
  is the simplest when a subset is a single domain.

A row that fails here raises :class:`BadRow`; the pipelines turn it into a :class:`DataError`
naming ``file:line`` (``data.on_bad_row = "error"``) or skip and count it (``"skip"``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from cascade_jax import domains as _domains

__all__ = ["DataError", "BadRow", "get_path", "map_row", "normalize_messages", "CANONICAL_FIELDS"]

CANONICAL_FIELDS = ("messages", "prompt", "response", "reasoning", "system", "tools", "domain",
                    "metadata", "id", "train_turns")
_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad data (missing file, empty source, bad row); the message names the file (and line)."""


class BadRow(ValueError):
    """A row that cannot be used; the pipelines prefix its location (``file:line``)."""


_MISSING = object()


def get_path(row: Any, path: str, default=_MISSING):
    """``row["a"]["b"]`` for ``path = "a.b"`` (list items by integer key)."""
    cur = row
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            if default is _MISSING:
                raise KeyError(path)
            return default
    return cur


def _content_text(content, where: str) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for j, p in enumerate(content):
            if isinstance(p, Mapping) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise BadRow(f"{where}.content[{j}]: only text parts are supported, got {p!r:.80}")
        return "".join(parts)
    raise BadRow(f"{where}.content: expected a string, got {type(content).__name__}")


def _drop_none(d: Mapping) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _tool_call(call: Any, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise BadRow(f"{where}: expected a tool call object, got {call!r:.80}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise BadRow(f"{where}: tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI wire format: arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRow(f"{where}.arguments: not valid JSON ({e})") from None
    if not isinstance(args, Mapping):
        raise BadRow(f"{where}.arguments: expected an object, got {args!r:.80}")
    return {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}


def normalize_messages(messages: Any) -> list[dict]:
    """Validate and normalise a conversation: roles checked, content parts joined, ``None``
    values dropped, tool-call arguments parsed to objects, reasoning under ``reasoning_content``."""
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"messages: expected a non-empty list, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise BadRow(f"{where}: expected an object, got {m!r:.80}")
        role = m.get("role")
        if role not in _ROLES:
            raise BadRow(f"{where}.role: unknown role {role!r}; valid roles: {', '.join(_ROLES)}")
        msg = {"role": role, "content": _content_text(m.get("content"), where) or ""}
        reasoning = next((m[k] for k in ("reasoning_content", "reasoning", "thinking")
                          if m.get(k) is not None), None)
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise BadRow(f"{where}.reasoning_content: only a string on assistant turns")
            msg["reasoning_content"] = reasoning
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise BadRow(f"{where}.tool_calls: only a list on assistant turns")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        for k in ("name", "tool_call_id"):
            if isinstance(m.get(k), str):
                msg[k] = m[k]
        if m.get("train") is not None:
            if role != "assistant" or not isinstance(m["train"], bool):
                raise BadRow(f"{where}.train: only a boolean on assistant turns")
            msg["train"] = m["train"]
        out.append(msg)
    return out


def _tools(tools: Any) -> Optional[list]:
    if tools is None:
        return None
    if isinstance(tools, str):  # some dumps store tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow(f"tools: not valid JSON ({e})") from None
    if not isinstance(tools, list):
        raise BadRow(f"tools: expected a list of function specs, got {tools!r:.80}")
    out = []
    for j, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise BadRow(f"tools[{j}]: expected a function spec with a name")
        out.append({"type": "function", "function": _drop_none(fn)})
    return out or None


def map_row(row: Any, fields: Mapping[str, str], *, kind: str,
            source_domain: Optional[str] = None) -> dict:
    """Canonical row ``{"messages", "tools", "domain", "metadata", "id"}`` from a raw row.

    ``kind``: ``"sft"`` (needs an assistant turn) or ``"rl"`` (needs a domain; the prompt must not
    end with an assistant turn). Raises :class:`BadRow` naming the field.
    """
    if not isinstance(row, Mapping):
        raise BadRow(f"row: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(k for k in fields if k.split(".")[0] not in CANONICAL_FIELDS)
    if unknown:
        raise DataError(f"fields: unknown canonical field(s) {unknown}; valid: {', '.join(CANONICAL_FIELDS)}")

    def get(name, required=False):
        key = fields.get(name, name)
        v = get_path(row, key, None)
        if v is None and required:
            raise BadRow(f"missing field {name!r}" + (f" (mapped from {key!r})" if key != name else ""))
        return v

    raw_messages = get("messages")
    if isinstance(raw_messages, str):  # Parquet dumps may store nested values as JSON text
        try:
            raw_messages = json.loads(raw_messages)
        except json.JSONDecodeError as e:
            raise BadRow(f"messages: not valid JSON ({e})") from None
    if raw_messages is None:
        if "messages" in fields or get("prompt") is None:
            key = fields.get("messages", "messages")
            raise BadRow("missing field 'messages'" + (f" (mapped from {key!r})" if key != "messages" else
                                                       " (or 'prompt')"))
        prompt = get("prompt", required=True)
        if not isinstance(prompt, str):
            raise BadRow(f"prompt: expected a string, got {type(prompt).__name__}")
        raw_messages = []
        system = get("system")
        if system is not None:
            raw_messages.append({"role": "system", "content": system})
        raw_messages.append({"role": "user", "content": prompt})
        if kind == "sft":
            response = get("response", required=True)
            raw_messages.append({"role": "assistant", "content": response,
                                 "reasoning_content": get("reasoning")})
    messages = normalize_messages(raw_messages)
    if kind == "sft" and not any(m["role"] == "assistant" for m in messages):
        raise BadRow("messages: no assistant turn to train on")
    if kind == "rl" and messages[-1]["role"] == "assistant":
        raise BadRow("messages: an RL prompt must not end with an assistant turn")

    domain = get("domain")
    if domain is None:
        domain = source_domain
    if domain is not None:
        if not isinstance(domain, str) or domain not in _domains.DOMAINS:
            raise BadRow(f"domain: unknown domain {domain!r}; valid domains: "
                         f"{', '.join(sorted(_domains.DOMAINS))}")
    elif kind == "rl":
        raise BadRow("domain: missing (map a 'domain' field or set the source's domain)")

    metadata = get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as e:
            raise BadRow(f"metadata: not valid JSON ({e})") from None
    if not isinstance(metadata, Mapping):
        raise BadRow(f"metadata: expected an object, got {type(metadata).__name__}")
    metadata = dict(metadata)
    for name, key in fields.items():
        if name.startswith("metadata."):
            v = get_path(row, key, None)
            if v is None:
                raise BadRow(f"missing field {name!r} (mapped from {key!r})")
            metadata[name[len("metadata."):]] = v
    rid = get("id")
    return {"messages": messages, "tools": _tools(get("tools")), "domain": domain,
            "metadata": metadata, "id": None if rid is None else str(rid),
            "train_turns": _train_turns(get("train_turns"), messages) if kind == "sft" else None}


def _train_turns(flags: Any, messages: list) -> Optional[list]:
    """Per-assistant-turn loss flags from a ``train_turns`` list or per-message ``train`` keys."""
    turns = [m for m in messages if m["role"] == "assistant"]
    if flags is None:
        if not any("train" in m for m in turns):
            return None
        flags = [m.get("train", True) for m in turns]
    if (not isinstance(flags, list) or len(flags) != len(turns)
            or not all(isinstance(f, (bool, int)) and f in (0, 1) for f in flags)):
        raise BadRow(f"train_turns: expected {len(turns)} booleans (one per assistant turn), "
                     f"got {flags!r:.80}")
    return [bool(f) for f in flags]
