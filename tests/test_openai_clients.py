"""``launch/serve.py``'s OpenAI-compatible routes driven by the ``openai`` Python client (what agentic
RL loops call): one real server process (tiny fp32 checkpoint + tiny tokenizer and chat template,
an API key). Expected shapes: the OpenAI API as SGLang 0.5.23's adapter serves it; numbers: the
server's own ``/generate`` with the same ids and seed, and the trainer's log-probs within ``TOL``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import httpx
import jax
import numpy as np
import openai
import pytest

from cascade_jax.data.chat import render_text
from cascade_jax.data.tokenizer import write_tiny_tokenizer
from cascade_jax.rewards.tool_call import format_tool_call
from cascade_jax.rollout.launcher import free_port, wait_healthy
from cascade_jax.rollout.weight_sync import reference_logprobs, write_version
from models import nemotron_h as nh
from tests.runner_support import Child

TOL = 1e-4
KEY = "sk-test"
NAME = "tiny-cascade"
FLAGS = ["--num-slots", "2", "--max-len", "480", "--prompt-buckets", "32,448", "--prefill-sizes", "2",
         "--steps-per-call", "4", "--served-model-name", NAME, "--api-key", KEY]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "first addend"},
                                                    "b": {"type": "integer", "description": "second addend"}},
                   "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    cfg = nh.preset("tiny")
    params = jax.tree.map(lambda x: x.astype(np.float32), nh.init_params(cfg, jax.random.key(5)))
    ck = write_version(params, cfg, root, "0")
    tok = write_tiny_tokenizer(ck)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "cascade-jax-serve-test-cache"))
    log = root / "server.log"
    proc = Child([sys.executable, "launch/serve.py", "--checkpoint", str(ck), "--port", str(port),
                  "--weight-version", "0", *FLAGS], env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=300, proc=proc.p, log=log)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=300, max_retries=0)
        yield type("S", (), dict(url=url, cfg=cfg, params=params, tok=tok, client=client))
    finally:
        proc.stop(grace=30)


def _generate(server, ids, **sp):
    r = httpx.post(server.url + "/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": sp},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_and_completions_match_generate_and_the_trainer(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    prompt = "What is 2+3?"
    ids = [int(t) for t in server.tok.encode(prompt)]
    c = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0.0, logprobs=4)
    ch = c.choices[0]
    ref = _generate(server, ids, max_new_tokens=6, temperature=0.0, stop_token_ids=[server.tok.eos_id])
    out = ref["output_ids"]
    eos = bool(out) and out[-1] == server.tok.eos_id
    body = out[:-1] if eos else out
    assert ch.text == server.tok.decode(body, skip_special_tokens=True)
    assert ch.finish_reason == ("stop" if eos else "length")
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == len(body)
    np.testing.assert_allclose(ch.logprobs.token_logprobs,
                               reference_logprobs(server.params, server.cfg, [ids], [out])[0][:len(body)], atol=TOL)
    assert all(len(d) <= 4 and max(d.values()) == pytest.approx(lp, abs=TOL)  # greedy: the best is taken
               for d, lp in zip(ch.logprobs.top_logprobs, ch.logprobs.token_logprobs))
    assert ch.logprobs.tokens == [server.tok.decode([t]) for t in body]


def test_completions_stop_string_seed_and_n(server):
    ids = [int(t) for t in server.tok.encode("Add 1 and 2.")]
    sampled = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=1.0, seed=9, n=2)
    again = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=1.0, seed=9, n=2)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded
    assert [c.index for c in sampled.choices] == [0, 1]
    full = _generate(server, ids, max_new_tokens=12, temperature=1.0, sampling_seed=9,
                     stop_token_ids=[server.tok.eos_id])["output_ids"]
    assert sampled.choices[0].text == server.tok.decode([t for t in full if t != server.tok.eos_id],
                                                        skip_special_tokens=True)
    text = sampled.choices[0].text
    stop = next((text[i:j] for i in range(1, len(text)) for j in range(i + 2, len(text) + 1)
                 if len(server.tok.encode(text[i:j])) >= 2 and text.find(text[i:j]) == i), None)
    if stop is None:
        pytest.fail(f"no multi-token stop string in {text!r}")
    cut = server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=1.0, seed=9,
                                           stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    # streamed with the stop string (sent when the choice finishes): the same text, reason and usage
    chunks = list(server.client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=1.0, seed=9,
                                                   stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens and not chunks[-1].choices


def test_chat_template_tools_logprobs_and_streaming(server):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    r = server.client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=1.0, seed=4,
                                              n=2, logprobs=True, top_logprobs=3)
    ids = [int(t) for t in server.tok.encode(render_text(server.tok, msgs))]
    assert r.usage.prompt_tokens == len(ids) and len(r.choices) == 2 and r.object == "chat.completion"
    for c in r.choices:
        assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
        assert len(c.logprobs.content) == r.usage.completion_tokens // 2 or c.finish_reason == "stop"
        assert all(len(e.top_logprobs) == 3 for e in c.logprobs.content)
    one = _generate(server, ids, max_new_tokens=5, temperature=1.0, sampling_seed=4,
                    stop_token_ids=[server.tok.eos_id])
    body = [t for t in one["output_ids"] if t != server.tok.eos_id]
    assert r.choices[0].message.content == server.tok.decode(body, skip_special_tokens=True)
    np.testing.assert_allclose([e.logprob for e in r.choices[0].logprobs.content],
                               [t[0] for t in one["meta_info"]["output_token_logprobs"]][:len(body)], atol=1e-6)
    # streaming: the deltas add up to the same message; usage comes last
    stream = server.client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=1.0,
                                                   seed=4, stream=True, stream_options={"include_usage": True})
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert text == r.choices[0].message.content and reasons == [r.choices[0].finish_reason]
    assert usage.prompt_tokens == len(ids)
    # a longer completion streams as it is decoded, adding up to the one-shot text (how many
    # pieces depends on the decode speed against the server's 50 ms poll: on an idle machine the
    # tiny model may finish between two polls, so the count is not asserted)
    kw = dict(model=NAME, prompt=ids, max_tokens=120, temperature=1.0, seed=6)
    whole = server.client.completions.create(**kw).choices[0]
    pieces = [c.choices[0].text for c in server.client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(pieces) == whole.text and any(pieces)
    # tools reach the checkpoint's chat template; an assistant turn with tool_calls renders too
    t = server.client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=2, temperature=0)
    assert t.usage.prompt_tokens == len(server.tok.encode(render_text(server.tok, msgs, tools=TOOLS)))
    streamed = list(server.client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=2,
                                                          temperature=0, stream=True))  # sent when finished
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == (t.choices[0].message.content or "")
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == [t.choices[0].finish_reason]
    history = msgs + [{"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    h = server.client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, max_tokens=2,
                                              temperature=0)
    want = [dict(m) for m in history]
    want[1]["tool_calls"] = [{**want[1]["tool_calls"][0], "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    assert h.usage.prompt_tokens == len(server.tok.encode(render_text(server.tok, want, tools=TOOLS)))


def test_tool_calls_are_parsed_with_the_projects_parser():
    """The model's tool-call markup (the chat template's Qwen3-Coder format) becomes OpenAI
    ``tool_calls`` with JSON arguments typed by the tool schema; the text before it is content."""
    from cascade_jax.rollout.openai_api import _tool_calls
    text = "I will add.\n" + format_tool_call("add", {"a": 2, "b": 3})
    content, calls = _tool_calls(text, TOOLS)
    assert content == "I will add." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert _tool_calls("no call here", TOOLS) == ("no call here", None)
    assert _tool_calls("<tool_call>\n<function=add>\n", TOOLS)[1] is None  # malformed: left as text


def test_bad_requests_are_400_naming_the_param_and_the_server_keeps_serving(server):
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs, param in [({"temperature": -1}, "temperature"), ({"n": 0}, "n"), ({"top_logprobs": 3}, "top_logprobs"),
                          ({"tool_choice": "required", "tools": TOOLS}, "tool_choice"),
                          ({"frequency_penalty": 1.0}, "frequency_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, **kwargs)
        assert param in str(e.value), (param, str(e.value))
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = server.client.completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens <= 2
