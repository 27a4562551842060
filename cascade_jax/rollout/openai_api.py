"""OpenAI-compatible routes of the JAX rollout server, in the shapes SGLang 0.5.23's OpenAI adapter
(``entrypoints/openai/``) serves: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` — the interface agentic RL loops call.

Requests (fields read; other OpenAI fields are ignored as SGLang's request models do, and the
ones that would change the output are refused when set, naming the field):

* completions: ``model``, ``prompt`` (a string, a list of one string, token ids, or a list of one
  list of ids), ``max_tokens`` (16), ``temperature`` (1), ``top_p`` (1), ``top_k`` (-1, SGLang's
  extension), ``n`` (1), ``stop`` (a string or up to 4), ``stop_token_ids``, ``seed``,
  ``logprobs`` (0-5: that many top alternatives per token), ``echo`` (false only),
  ``stream``, ``stream_options.include_usage``;
* chat: ``messages`` rendered with the checkpoint's chat template (``tools`` passed to it,
  ``chat_template_kwargs`` too), ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``n``, ``stop``, ``seed``, ``logprobs`` (bool) + ``top_logprobs``
  (0-20), ``tools`` / ``tool_choice`` (``auto`` / ``none``), ``stream``.

Replies::

    completion: {"id": "cmpl-…", "object": "text_completion", "created", "model",
                 "choices": [{"index", "text", "logprobs": null | {"tokens", "token_logprobs",
                              "top_logprobs": [{token: logp}], "text_offset"},
                              "finish_reason": "stop" | "length", "matched_stop"}],
                 "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    chat:       {"id": "chatcmpl-…", "object": "chat.completion", "created", "model",
                 "choices": [{"index", "message": {"role": "assistant", "content",
                              "reasoning_content": null, "tool_calls": null | [{"id", "type":
                              "function", "function": {"name", "arguments": JSON string}}]},
                              "logprobs": null | {"content": [{"token", "logprob", "bytes",
                              "top_logprobs": [{"token", "logprob", "bytes"}]}]},
                              "finish_reason": "stop" | "length" | "tool_calls", "matched_stop"}],
                 "usage": {...}}

Streaming answers Server-Sent Events ``data: {chunk}`` (``text_completion`` chunks with ``text``
deltas; ``chat.completion.chunk`` with ``delta`` = ``{"role", "content"}``, then ``{"content"}``
pieces, then ``{"tool_calls"}``), a last chunk per choice with its ``finish_reason`` (and the
choice's ``logprobs``), a usage chunk when ``stream_options.include_usage``, and ``data:
[DONE]``. Text is sent as the engine decodes it; with stop strings longer than a token, or with
tools, a choice's pieces are sent when it finishes (those need the whole text).

Tool calls are parsed from the model's text with the project's parser
(:func:`cascade_jax.rewards.tool_call.parse_tool_calls`, the chat template's Qwen3-Coder
format); argument values are JSON-decoded unless the tool's schema declares them strings. Stop
strings that are one token become stop token ids; longer ones cut the text after generation
(``finish_reason: "stop"``, ``matched_stop`` the string). Errors are SGLang's ``ErrorResponse``
``{"object": "error", "message", "type": "BadRequestError", "param", "code": 400}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Optional

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from cascade_jax.data.chat import ChatTemplateError, render_text
from cascade_jax.rewards.tool_call import ToolCallParseError, parse_tool_calls

from .sglang_api import GenerateItem, RequestError, read_json, sse
from .sglang_api import _int, _num as _finite
from .types import RolloutError, SamplingParams

__all__ = ["mount"]

MAX_STOP = 4


def _error(message: str, param: Optional[str] = None, code: int = 400) -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "type": "BadRequestError", "param": param,
                         "code": code}, status_code=code)


def _num(body, key, default, lo=None, hi=None, integer=False):
    """``body[key]`` (``default`` when absent): a finite number (an integer with ``integer``) in
    ``[lo, hi]``, else :class:`RequestError` naming ``key``."""
    v = body.get(key)
    if v is None:
        return default
    v = _int(v, key) if integer else _finite(v, key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(key, f"must be in [{lo}, {hi}], got {v!r}")
    return v


class _Call:
    """One validated OpenAI request: its prompt ids, sampling, stops and reply options."""

    def __init__(self, srv, body: dict, prompt_ids: list, *, max_tokens_keys, top_logprobs: int, chat: bool):
        if srv.tokenizer is None:
            raise RequestError("model", "this checkpoint has no tokenizer; the OpenAI routes need one "
                                        "(use /generate with input_ids)")
        if not isinstance(body.get("model", ""), str):
            raise RequestError("model", f"expected a string, got {body.get('model')!r}")
        for key, default in (("frequency_penalty", 0), ("presence_penalty", 0)):
            if body.get(key) not in (None, default, 0.0):
                raise RequestError(key, "not supported by the JAX rollout server (only 0)")
        if body.get("logit_bias") not in (None, {}):
            raise RequestError("logit_bias", "not supported by the JAX rollout server")
        if body.get("response_format") not in (None, {"type": "text"}):
            raise RequestError("response_format", "constrained decoding is not supported by the JAX rollout "
                                                  "server (only {'type': 'text'})")
        self.srv, self.chat = srv, chat
        self.model = body.get("model") or srv.served_model_name
        room = srv.engine.max_len - len(prompt_ids)
        if not prompt_ids:
            raise RequestError("messages" if chat else "prompt", "empty prompt")
        if room <= 0 or len(prompt_ids) > srv.engine.prompt_buckets[-1]:
            raise RequestError("messages" if chat else "prompt",
                               f"prompt of {len(prompt_ids)} tokens does not fit (largest prompt "
                               f"{min(srv.engine.prompt_buckets[-1], srv.engine.max_len - 1)})")
        max_tokens = None
        for key in max_tokens_keys:
            max_tokens = _num(body, key, None, 0, room, integer=True)
            if max_tokens is not None:
                break
        if max_tokens is None:
            max_tokens = min(room, 16 if not chat else room)
        temperature = _num(body, "temperature", 1.0, 0, 2)
        top_p = _num(body, "top_p", 1.0, 0, 1)
        if top_p == 0:
            raise RequestError("top_p", "must be > 0")
        top_k = _num(body, "top_k", -1, -1, None, integer=True)
        if top_k == 0:
            raise RequestError("top_k", "must be -1 (off) or >= 1")
        n = _num(body, "n", 1, 1, 128, integer=True)
        seed = _num(body, "seed", None, 0, 2**63 - 1, integer=True)
        stops = body.get("stop")
        if isinstance(stops, str):
            stops = [stops]
        if stops is None:
            stops = []
        if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(x, str) and x for x in stops):
            raise RequestError("stop", f"expected a non-empty string or a list of at most {MAX_STOP}, got {stops!r}")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                     and 0 <= t < srv._vocab() for t in stop_ids):
            raise RequestError("stop_token_ids", f"expected a list of token ids, got {stop_ids!r}")
        stop_ids = list(stop_ids)
        if chat or body.get("ignore_eos") is not True:
            stop_ids.append(int(srv.tokenizer.eos_id))
        self.stop_strings = []
        for x in stops:  # one-token stops are stop ids; longer ones cut the text afterwards
            ids = [int(t) for t in srv.tokenizer.encode(x)]
            if len(ids) == 1:
                stop_ids.append(ids[0])
            else:
                self.stop_strings.append(x)
        stop_ids = tuple(dict.fromkeys(stop_ids))
        if len(stop_ids) > getattr(srv.engine, "max_stop_tokens", 8):
            raise RequestError("stop", f"at most {srv.engine.max_stop_tokens} stop tokens in all")
        self.top_logprobs = top_logprobs
        self.want_logprobs = body.get("logprobs") not in (None, False)
        self.sampling = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                                       top_p=float(top_p), top_k=int(top_k), n=int(n), seed=seed,
                                       stop_token_ids=stop_ids)
        self.prompt_ids = tuple(int(t) for t in prompt_ids)
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise RequestError("stream_options", f"expected an object, got {stream_options!r}")
        self.stream = bool(body.get("stream"))
        self.include_usage = bool(stream_options.get("include_usage"))
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def item(self) -> GenerateItem:
        return GenerateItem(prompt_ids=self.prompt_ids, sampling=self.sampling, rid=self.id,
                            return_logprob=True, logprob_start_len=-1, top_logprobs_num=self.top_logprobs)

    def finish(self, reply: dict) -> dict:
        """A ``/generate`` reply item -> ``{text, token_ids, logprobs, top, finish_reason,
        matched_stop}`` with stop strings applied."""
        tok = self.srv.tokenizer
        meta = reply["meta_info"]
        ids = list(reply["output_ids"])
        lps = [t[0] for t in meta["output_token_logprobs"]]
        top = meta.get("output_top_logprobs")
        fr = meta["finish_reason"]
        reason = "stop" if fr["type"] == "stop" else "length" if fr["type"] == "length" else "abort"
        matched = fr.get("matched") if reason == "stop" else None
        if reason == "stop" and ids and ids[-1] in self.sampling.stop_token_ids:  # the stop token is not text
            ids, lps, top = ids[:-1], lps[:-1], (top[:-1] if top is not None else None)
        text = tok.decode(ids, skip_special_tokens=True)
        cut = min(((text.find(s), s) for s in self.stop_strings if s in text), default=None)
        if cut is not None:  # keep the tokens whose text ends before the stop string
            pos, s = cut
            keep = 0
            while keep < len(ids) and len(tok.decode(ids[:keep + 1], skip_special_tokens=True)) <= pos:
                keep += 1
            ids, lps, top = ids[:keep], lps[:keep], (top[:keep] if top is not None else None)
            text, reason, matched = text[:pos], "stop", s
        return {"text": text, "ids": ids, "logprobs": lps, "top": top, "finish_reason": reason,
                "matched_stop": matched}

    def usage(self, outs) -> dict:
        c = sum(len(o["ids"]) for o in outs)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": c,
                "total_tokens": len(self.prompt_ids) + c}


def _token_str(tok, t: int) -> str:
    return tok.decode([int(t)])


def _completion_logprobs(call: _Call, o: dict) -> Optional[dict]:
    if not call.want_logprobs:
        return None
    tok = call.srv.tokenizer
    tokens = [_token_str(tok, t) for t in o["ids"]]
    offsets, pos = [], 0
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top = None
    if o["top"] is not None:  # best first; ids that decode to the same text keep the best value
        top = []
        for entry in o["top"]:
            d: dict = {}
            for lp, t, _ in entry:
                d.setdefault(_token_str(tok, t), lp)
            top.append(d)
    return {"tokens": tokens, "token_logprobs": o["logprobs"], "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(call: _Call, o: dict) -> Optional[dict]:
    if not call.want_logprobs:
        return None
    tok = call.srv.tokenizer

    def entry(t, lp):
        s = _token_str(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    content = []
    for i, (t, lp) in enumerate(zip(o["ids"], o["logprobs"])):
        e = entry(t, lp)
        e["top_logprobs"] = [entry(tt, ll) for ll, tt, _ in o["top"][i]] if o["top"] is not None else []
        content.append(e)
    return {"content": content}


def _tool_calls(text: str, tools: Optional[list]) -> tuple[Optional[str], Optional[list]]:
    """``(content, tool_calls)`` of an assistant text: the text before the first ``<tool_call>``
    and the parsed calls (None when there are none or the markup is malformed: then the whole
    text is content)."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, None
    try:
        calls = parse_tool_calls(text[start:])
    except ToolCallParseError:
        return text, None
    schemas = {}
    for t in tools or []:
        f = t.get("function", {}) if isinstance(t, dict) else {}
        schemas[f.get("name")] = (f.get("parameters") or {}).get("properties") or {}
    out = []
    for c in calls:
        args = {}
        for k, raw in c.arguments.items():
            if (schemas.get(c.name, {}).get(k) or {}).get("type") == "string":
                args[k] = raw
            else:
                try:
                    args[k] = json.loads(raw)
                except ValueError:
                    args[k] = raw
        out.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(args, ensure_ascii=False)}})
    content = text[:start].strip()
    return (content or None), out


@contextlib.asynccontextmanager
async def _running(srv, call: _Call):
    """Admit the call (waits while paused; :class:`RolloutError` while memory is released) and
    run its samples: yields ``(item, task)``; on exit the task is cancelled (the engine aborts
    unfinished samples) and the call leaves the in-flight count."""
    item = call.item()
    refused = await srv._enter(1)
    if refused is not None:
        raise RolloutError(refused.body.decode())
    task = asyncio.ensure_future(srv._run_item(item, asyncio.get_running_loop()))
    try:
        yield item, task
    finally:
        task.cancel()
        await srv._done_inflight(1)


async def _generate(srv, call: _Call) -> list:
    """Run the call's ``n`` samples through the engine; the finished choices."""
    async with _running(srv, call) as (item, task):
        replies = await srv._item_replies(item, await task)
    return [call.finish(r) for r in replies]


async def _progressive(srv, call: _Call):
    """Run the call's samples and follow them as the engine retires tokens: yields
    ``("delta", k, text)`` for new text of sample ``k`` (held back while it ends in a partial
    UTF-8 character) and finally ``("done", choices)``. Only for calls without stop strings
    (those need the whole text)."""
    tok, stops = srv.tokenizer, set(call.sampling.stop_token_ids)
    emitted = [""] * call.sampling.n
    async with _running(srv, call) as (item, task):
        while not task.done():
            await asyncio.wait([task], timeout=0.05)
            for k, (ids, _) in enumerate(srv.engine.progress(item.rid) or []):
                text = tok.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                if len(text) > len(emitted[k]) and not text.endswith("\ufffd") and text.startswith(emitted[k]):
                    yield "delta", k, text[len(emitted[k]):]
                    emitted[k] = text
        outs = [call.finish(r) for r in await srv._item_replies(item, task.result())]
        for k, o in enumerate(outs):
            if len(o["text"]) > len(emitted[k]):
                yield "delta", k, o["text"][len(emitted[k]):]
        yield "done", outs


async def _live(srv, call: _Call, delta, final):
    """The choices of a call streamed as the engine decodes (:func:`_progressive`):
    ``delta(k, text)`` per new piece of sample ``k``, ``final(i, out)`` per finished choice,
    then the finished outputs (a list, for the usage chunk)."""
    async for ev in _progressive(srv, call):
        if ev[0] == "delta":
            yield delta(ev[1], ev[2])
            continue
        for i, o in enumerate(ev[1]):
            yield final(i, o)
        yield ev[1]


def _sse_response(head: dict, call: _Call, choices) -> StreamingResponse:
    """Server-Sent Events of one call: ``data: {**head, "choices": [choice]}`` for every choice
    dict the async iterator ``choices`` yields, the usage chunk (``stream_options.include_usage``)
    after the outputs list it yields last, then ``data: [DONE]``."""
    async def events():
        async for c in choices:
            if isinstance(c, list):
                if call.include_usage:
                    yield sse({**head, "choices": [], "usage": call.usage(c)})
                continue
            yield sse({**head, "choices": [c]})
        yield sse("[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream")


def _tokens_of(srv, prompt) -> list:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [int(t) for t in srv.tokenizer.encode(prompt)] if srv.tokenizer is not None else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < srv._vocab()]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} outside [0, {srv._vocab()})")
        return list(prompt)
    raise RequestError("prompt", "expected a string, a list of token ids, or a list holding one of them "
                                 "(batches of prompts: send one request each)")


def mount(app, srv) -> None:
    """Add the ``/v1`` routes of ``srv`` (a :class:`~cascade_jax.rollout.server.RolloutServer`)."""

    async def guarded(handler, request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
            return await handler(body)
        except RequestError as e:
            return _error(str(e), e.field)
        except ValueError as e:  # the engine's own validation
            return _error(str(e))
        except RolloutError as e:
            return _error(str(e), code=503)

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [{
            "id": srv.served_model_name, "object": "model", "created": int(srv.started), "owned_by": "sglang",
            "root": srv.served_model_name, "max_model_len": srv.engine.max_len}]})

    async def completions(body: dict):
        if body.get("echo"):
            raise RequestError("echo", "not supported by the JAX rollout server (only false)")
        if body.get("suffix") is not None:
            raise RequestError("suffix", "not supported by the JAX rollout server")
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise RequestError("best_of", "only equal to n")
        if "prompt" not in body:
            raise RequestError("prompt", "required")
        top = _num(body, "logprobs", 0, 0, 5, integer=True)
        call = _Call(srv, body, _tokens_of(srv, body["prompt"]), max_tokens_keys=("max_tokens",),
                     top_logprobs=top, chat=False)
        head = {"id": call.id, "object": "text_completion", "created": call.created, "model": call.model}

        def final(i, o):  # a choice's last chunk
            return {"index": i, "text": "", "logprobs": _completion_logprobs(call, o),
                    "finish_reason": o["finish_reason"], "matched_stop": o["matched_stop"]}

        def piece(i, text):
            return {"index": i, "text": text, "logprobs": None, "finish_reason": None}

        if call.stream and not call.stop_strings:  # token by token as the engine decodes
            return _sse_response(head, call, _live(srv, call, piece, final))
        outs = await _generate(srv, call)
        if not call.stream:
            choices = [{**final(i, o), "text": o["text"]} for i, o in enumerate(outs)]
            return JSONResponse({**head, "choices": choices, "usage": call.usage(outs)})

        async def buffered():
            for i, o in enumerate(outs):
                sent = 0  # one chunk per token, text deltas adding up to the choice's text (the
                for k in range(len(o["ids"]) + 1):  # last one: text a stop string cut inside a token)
                    upto = len(o["text"]) if k == len(o["ids"]) else min(
                        len(o["text"]), len(srv.tokenizer.decode(o["ids"][:k + 1], skip_special_tokens=True)))
                    if upto > sent:
                        yield piece(i, o["text"][sent:upto])
                        sent = upto
                yield final(i, o)
            yield outs
        return _sse_response(head, call, buffered())

    async def chat(body: dict):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("messages", "expected a non-empty list of messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise RequestError(f"messages[{i}].role", f"expected system/user/assistant/tool, got "
                                                          f"{m.get('role') if isinstance(m, dict) else m!r}")
            if isinstance(m.get("content"), list):  # content parts: text only
                parts = m["content"]
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                    raise RequestError(f"messages[{i}].content", "only text content parts are supported")
                m = msgs[i] = {**m, "content": "".join(p.get("text", "") for p in parts)}
            for tc in m.get("tool_calls") or []:  # templates read arguments as a mapping
                f = tc.get("function", {}) if isinstance(tc, dict) else {}
                if isinstance(f.get("arguments"), str):
                    try:
                        f["arguments"] = json.loads(f["arguments"])
                    except ValueError:
                        raise RequestError(f"messages[{i}].tool_calls", "arguments must be a JSON object "
                                                                        "string") from None
        tools = body.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools)):
            raise RequestError("tools", "expected a list of {'type': 'function', 'function': {'name', ...}}")
        choice = body.get("tool_choice", "auto")
        if choice not in (None, "auto", "none"):
            raise RequestError("tool_choice", "only 'auto' and 'none' are supported by the JAX rollout server")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RequestError("chat_template_kwargs", f"expected an object, got {kwargs!r}")
        use_tools = tools if tools and choice != "none" else None
        try:
            text = render_text(srv.tokenizer, msgs, tools=use_tools,
                               **{"thinking": kwargs.get("enable_thinking", True),
                                  **{k: v for k, v in kwargs.items() if k != "enable_thinking"}})
        except ChatTemplateError as e:
            raise RequestError("messages", str(e)) from None
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise RequestError("logprobs", f"expected a bool, got {want!r}")
        top = _num(body, "top_logprobs", 0, 0, 20, integer=True)
        if top and not want:
            raise RequestError("top_logprobs", "needs logprobs: true")
        call = _Call(srv, body, [int(t) for t in srv.tokenizer.encode(text)],
                     max_tokens_keys=("max_completion_tokens", "max_tokens"), top_logprobs=top, chat=True)
        head = {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model}
        if call.stream and not call.stop_strings and not use_tools:  # token by token as the engine decodes
            started = set()

            def piece(k, text):
                delta = {"content": text} if k in started else {"role": "assistant", "content": text}
                started.add(k)
                return {"index": k, "delta": delta, "logprobs": None, "finish_reason": None}

            def final(i, o):
                return {"index": i, "delta": {} if i in started else {"role": "assistant", "content": ""},
                        "logprobs": _chat_logprobs(call, o), "finish_reason": o["finish_reason"],
                        "matched_stop": o["matched_stop"]}
            return _sse_response(head, call, _live(srv, call, piece, final))
        outs = await _generate(srv, call)
        choices = []
        for i, o in enumerate(outs):
            content, calls = _tool_calls(o["text"], use_tools) if use_tools else (o["text"], None)
            reason = "tool_calls" if calls and o["finish_reason"] == "stop" else o["finish_reason"]
            choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                    "reasoning_content": None, "tool_calls": calls},
                            "logprobs": _chat_logprobs(call, o), "finish_reason": reason,
                            "matched_stop": o["matched_stop"]})
        if not call.stream:
            return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                                 "usage": call.usage(outs)})

        async def buffered():
            for c in choices:
                i, msg = c["index"], c["message"]
                yield {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}
                if msg["content"]:
                    yield {"index": i, "delta": {"content": msg["content"]}, "logprobs": c["logprobs"],
                           "finish_reason": None}
                if msg["tool_calls"]:
                    yield {"index": i, "delta": {"tool_calls": [{"index": k, **tc} for k, tc in
                                                                enumerate(msg["tool_calls"])]},
                           "logprobs": None, "finish_reason": None}
                yield {"index": i, "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"],
                       "matched_stop": c["matched_stop"]}
            yield outs
        return _sse_response(head, call, buffered())

    @app.post("/v1/completions")
    async def completions_route(request: HTTPRequest):
        return await guarded(completions, request)

    @app.post("/v1/chat/completions")
    async def chat_route(request: HTTPRequest):
        return await guarded(chat, request)
