"""Chat template: documented format by hand, assistant masks, and parity with transformers'
``apply_chat_template`` (text, token ids and assistant mask) in the oracle environment."""

import json
import os
import subprocess

import numpy as np
import pytest

from cascade_jax.data import (ChatTemplateError, Tokenizer, load_tokenizer, render_chat,
                              render_text, save_tokenizer, tiny_tokenizer)
from cascade_jax.rewards.tool_call import format_tool_call, parse_tool_calls
from tests.oracle_util import REPO, oracle_python

TOK = tiny_tokenizer()
#: a two-parameter tool (the tiny domain's own tool, ``square(n)``, has one)
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "description": "first addend"},
        "b": {"type": "integer", "description": "second addend"}}, "required": ["a", "b"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "city name", "title": "City"},
        "days": {"type": "integer", "description": "forecast days"}}, "required": ["city"]}}}


def _call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


# (messages, tools, thinking, add_generation_prompt)
CASES = [
    ([{"role": "user", "content": "What is 2 + 3?"}], None, True, True),
    ([{"role": "user", "content": "What is 2 + 3?"}], None, False, True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None, True, True),
    # single-turn SFT row, reasoning in reasoning_content
    ([{"role": "user", "content": "2+3?"},
      {"role": "assistant", "content": "\\boxed{5}", "reasoning_content": "2 plus 3 is 5"}],
     None, True, False),
    # reasoning inline, multi-turn: the first turn's reasoning is dropped (before the last user)
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr1\n</think>\nA1"},
      {"role": "user", "content": "b"}, {"role": "assistant", "content": "A2", "reasoning_content": "r2"}],
     None, True, False),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
      {"role": "user", "content": "b"}], None, False, True),
    # tools in the system prompt (with and without a system message), tool calls, tool responses
    ([{"role": "user", "content": "Use the add tool to add 3 and 4."}], [ADD_TOOL], True, True),
    ([{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris and 3+4?"},
      {"role": "assistant", "content": "Calling tools.", "reasoning_content": "two calls",
       "tool_calls": [_call("get_weather", {"city": "Paris", "days": 2}), _call("add", {"a": 3, "b": 4})]},
      {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "7"},
      {"role": "assistant", "content": "21 degrees; 7.", "reasoning_content": "done"}],
     [WEATHER, ADD_TOOL], True, False),
    ([{"role": "user", "content": "3+4"},
      {"role": "assistant", "content": "", "tool_calls": [_call("add", {"a": 3, "b": 4})]},
      {"role": "tool", "content": "7"}], [ADD_TOOL], True, True),
    # Unicode, empty assistant content, non-thinking history
    ([{"role": "user", "content": "Übersetze: 日本語 🙂 — naïve café"},
      {"role": "assistant", "content": "Japanese 🙂"}, {"role": "user", "content": "merci\u00a0!"},
      {"role": "assistant", "content": ""}], None, False, False),
]


def test_generation_prompts_and_history_by_hand():
    user = [{"role": "user", "content": "hi"}]
    assert render_text(TOK, user, thinking=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert render_text(TOK, user, thinking=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think></think>"
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "A2", "reasoning_content": "r2"}]
    assert render_text(TOK, conv, add_generation_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think></think>A1<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\nA2<|im_end|>\n")
    # history reasoning kept when the template is asked to
    assert "r1" in render_text(TOK, conv, add_generation_prompt=False, truncate_history_thinking=False)


def test_tool_call_and_response_format_matches_rewards_parser():
    msgs = CASES[8][0]
    text = render_text(TOK, msgs, tools=[ADD_TOOL], add_generation_prompt=False)
    assert "<tools>\n<function>\n<name>add</name>" in text and "<required>[\"a\", \"b\"]</required>" in text
    assert format_tool_call("add", {"a": 3, "b": 4}) + "<|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n" in text
    turn = text.split("<|im_start|>assistant\n")[1]
    calls = parse_tool_calls(turn.split("<|im_end|>")[0])
    assert [(c.name, dict(c.arguments)) for c in calls] == [("add", {"a": "3", "b": "4"})]


def _assistant_segments(text):
    """Expected assistant spans, by hand: from after each '<|im_start|>assistant\\n' header
    through its '<|im_end|>'."""
    out = []
    for part in text.split("<|im_start|>assistant\n")[1:]:
        end = part.find("<|im_end|>")
        out.append(part if end < 0 else part[:end + len("<|im_end|>")])
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_mask_covers_exactly_the_assistant_turns(case):
    msgs, tools, thinking, agp = CASES[case]
    text, ids, mask = render_chat(TOK, msgs, tools=tools, thinking=thinking, add_generation_prompt=agp)
    assert np.array_equal(ids, TOK.encode(text)) and mask.shape == ids.shape
    assert TOK.decode(ids) == text
    expected = _assistant_segments(text)
    if agp:  # the generation prompt is no assistant content
        expected = expected[:-1]
    assert TOK.decode(ids[mask > 0]) == "".join(expected)
    # the ChatML fallback (a template without generation blocks) gives the same mask
    plain = Tokenizer(backend=TOK.backend, special_tokens=TOK.special_tokens, ids=TOK.ids,
                      chat_template=TOK.chat_template.replace("{%- generation -%}", "")
                      .replace("{%- endgeneration -%}", ""))
    if not agp:
        np.testing.assert_array_equal(render_chat(plain, msgs, tools=tools, thinking=thinking,
                                                  add_generation_prompt=agp).loss_mask, mask)


def test_train_turns_select_which_assistant_turns_carry_loss():
    msgs = CASES[4][0]  # two assistant turns
    text, ids, full = render_chat(TOK, msgs, add_generation_prompt=False)
    first, second = _assistant_segments(text)
    for flags, want in [([True, True], first + second), ([False, True], second), ([True, False], first),
                        ([False, False], "")]:
        _, _, mask = render_chat(TOK, msgs, add_generation_prompt=False, train_turns=flags)
        assert TOK.decode(ids[mask > 0]) == want
    with pytest.raises(ChatTemplateError, match="train_turns: 1 flags for 2 assistant turns"):
        render_chat(TOK, msgs, add_generation_prompt=False, train_turns=[True])


def test_bad_messages_raise_naming_the_problem():
    with pytest.raises(ChatTemplateError, match="unknown role narrator"):
        render_chat(TOK, [{"role": "narrator", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat(Tokenizer(backend=TOK.backend, chat_template="{% if %}", special_tokens={}, ids={}),
                    [{"role": "user", "content": "x"}])


# A second, independent template (JSON tool calls, plain jinja tags relying on trim_blocks /
# lstrip_blocks, loop controls, a namespace, tojson of non-ASCII objects, bos_token): our jinja
# environment must render any checkpoint's template as transformers does, not only ours.
OTHER_TEMPLATE = """{{ bos_token }}
{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}
# Tools
<tools>
{% for t in tools %}
{{ t | tojson }}
{% endfor %}
</tools><|im_end|>
{% endif %}
{% set ns = namespace(last=-1) %}
{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}
{% for m in messages %}
{% if m.role == 'system' and tools %}{% continue %}{% endif %}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content and loop.index0 > ns.last %}
<think>{{ m.reasoning_content | trim }}</think>
{% endif %}
{{ m.content }}
{% if m.tool_calls %}{% for c in m.tool_calls %}
<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>
{% endfor %}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% if not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""


@pytest.mark.oracle
def test_parity_with_transformers_apply_chat_template(tmp_path):
    save_tokenizer(TOK, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # what a checkpoint ships is what we render with
    cases = [{"messages": m, "tools": t, "thinking": th, "add_generation_prompt": g}
             for m, t, th, g in CASES]
    cases += [{**c, "chat_template": OTHER_TEMPLATE} for c in cases]
    (tmp_path / "cases.json").write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([oracle_python(), str(REPO / "tests" / "oracle" / "chat_oracle.py"),
                           "--tokenizer", str(tmp_path / "tok"), "--cases", str(tmp_path / "cases.json"),
                           "--out", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert len(want) == len(cases) == 2 * len(CASES)
    other = Tokenizer(backend=tok.backend, chat_template=OTHER_TEMPLATE,
                      special_tokens=tok.special_tokens, ids=tok.ids)
    for i, (c, w) in enumerate(zip(cases, want)):
        t = other if "chat_template" in c else tok
        text, ids, mask = render_chat(t, c["messages"], tools=c["tools"], thinking=c["thinking"],
                                      add_generation_prompt=c["add_generation_prompt"])
        assert text == w["text"], f"case {i}: text differs"
        assert ids.tolist() == w["ids"], f"case {i}: token ids differ"
        if w["assistant_mask"] is not None:
            assert mask.astype(int).tolist() == w["assistant_mask"], f"case {i}: assistant mask differs"
        assert tok.decode(ids) == w["decoded"] == text, f"case {i}: decode differs"
    assert "<tool_call>{\"name\": \"get_weather\"" in want[len(CASES) + 7]["text"]
    assert want[len(CASES)]["text"].startswith("<s><|im_start|>user\nWhat is 2 + 3?")
