"""Multi-turn rendering and the episode loop with scripted policies (tiny tokenizer and template).

* the incrementally built row tokenises exactly as the template renders the whole conversation
  (thinking and non-thinking mode), and the loss mask covers exactly the assistant's tokens
  (hand-checked: the masked text is the two turns; against ``render_chat``'s generation-block
  mask it differs only by the generation prompt's ``<think></think>``);
* tool calls are parsed with the tool-call scorer's parser; malformed markup, unknown tools and
  bad arguments are observations; limits on turns, tokens and wall time end episodes;
* the lookup domain: the canonical solution scores 1, answering without the tool or with a
  wrong code 0; tasks are seeded and the code is not in the prompt.
"""

import numpy as np
import pytest

from cascade_jax.agentic.env import Environment, Step
from cascade_jax.agentic.episode import EpisodeLimits, ScriptedPolicy, run_episode
from cascade_jax.agentic.lookup import (LOOKUP_TOOL, LookupEnv, lookup_solution, lookup_tasks,
                                        score_lookup)
from cascade_jax.agentic.render import ChatRenderer, RenderError
from cascade_jax.data.chat import render_chat
from cascade_jax.data.tokenizer import tiny_tokenizer
from cascade_jax.rewards.tool_call import format_tool_call


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _run(tok, texts, thinking=False, task=None, limits=EpisodeLimits()):
    r = ChatRenderer(tok, thinking=thinking)
    task = task or lookup_tasks(1, seed=3)[0]
    return r, task, run_episode(LookupEnv(), task, ScriptedPolicy(r, texts), r, limits)


@pytest.mark.parametrize("thinking", [False, True])
def test_row_equals_full_rendering_and_mask_is_the_assistant_tokens(tok, thinking):
    task = lookup_tasks(1, seed=3)[0]
    call, code = lookup_solution(task)
    texts = ([f"I will look it up.\n</think>\n{call}", f"Found it.\n</think>\n{code}"] if thinking
             else [call, code])
    r, _, ep = _run(tok, texts, thinking, task)
    assert (ep.reward, ep.ended_by, ep.canonical, ep.finish_reason) == (1.0, "env", True, "stop")
    assert ep.messages[1]["tool_calls"][0]["function"] == {"name": "lookup",
                                                           "arguments": {"key": task["metadata"]["key"]}}
    assert ep.messages[2] == {"role": "tool", "content": f"code of {task['metadata']['key']}: {code}"}
    full = r.conversation_text(ep.messages, [LOOKUP_TOOL])
    np.testing.assert_array_equal(ep.tokens, tok.encode(full))  # no drift
    # hand check: masked tokens are exactly the two assistant turns (each with its stop token)
    masked = [t for t, m in zip(ep.tokens, ep.loss_mask) if m]
    assert tok.decode(masked) == texts[0] + "<|im_end|>" + texts[1] + "<|im_end|>"
    runs = np.flatnonzero(np.diff(np.r_[0, ep.loss_mask, 0]))
    assert len(runs) == 4  # two contiguous spans
    assert ep.loss_mask[-1] == 1 and ep.tokens[-1] == r.stop_id
    # against the template's generation blocks: they also cover the generation prompt's part
    rc = render_chat(tok, ep.messages, tools=[LOOKUP_TOOL], thinking=thinking,
                     add_generation_prompt=False)
    n = len(ep.tokens)
    np.testing.assert_array_equal(rc.ids[:n], ep.tokens)
    extra = [i for i in range(n) if rc.loss_mask[i] == 1 and ep.loss_mask[i] == 0]
    assert all(ep.loss_mask[i] <= rc.loss_mask[i] for i in range(n))
    want = "<think>\n<think>\n" if thinking else "<think></think><think></think>"
    assert tok.decode([ep.tokens[i] for i in extra]) == want
    assert np.all(ep.logprobs == 0)


def test_parse_uses_the_tool_call_parser(tok):
    r = ChatRenderer(tok)
    t = r.parse_text("Let me check.\n" + format_tool_call("lookup", {"key": "k01"}))
    assert t.parse_error is None and t.calls[0].name == "lookup" and t.answer == "Let me check."
    assert t.message == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "lookup", "arguments": {"key": "k01"}}}]}
    bad = r.parse_text("<tool_call>\n<function=lookup>\n</tool_call>")
    assert bad.calls == () and bad.parse_error.startswith("malformed tool call")
    rt = ChatRenderer(tok, thinking=True)
    assert rt.parse_text("still thinking").parse_error.startswith("unclosed <think>")


def test_errors_are_observations(tok):
    task = lookup_tasks(1, seed=4)[0]
    call, code = lookup_solution(task)
    texts = ["<tool_call>\n<function=lookup>\n</tool_call>",  # malformed
             format_tool_call("search", {"q": "x"}),  # unknown tool
             format_tool_call("lookup", {"name": "k00"}),  # wrong argument
             format_tool_call("lookup", {"key": "nope"}),  # unknown key
             # a stray </parameter> (a sampled corruption that once crashed the template)
             "<tool_call>\n<function=lookup>\n<=key>>\nk02\n</parameter>\n</function>\n"
             "</tool_call>",
             call, code]
    r, _, ep = _run(tok, texts, task=task)
    obs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert obs[0].startswith("error: malformed tool call")
    assert obs[4].startswith("error: malformed tool call: </parameter> without an open <parameter>")
    assert obs[1].startswith("error: unknown tool 'search'")
    assert "unknown argument(s) ['name']" in obs[2] and "missing argument(s) ['key']" in obs[2]
    assert obs[3] == "error: no key 'nope'"
    assert ep.reward == 1.0 and len(ep.turns) == 7
    np.testing.assert_array_equal(ep.tokens, tok.encode(r.conversation_text(ep.messages, [LOOKUP_TOOL])))


def test_lookup_scores(tok):
    task = lookup_tasks(1, seed=5)[0]
    call, code = lookup_solution(task)
    assert code not in task["prompt"] and task["metadata"]["key"] in task["prompt"]
    assert _run(tok, [code], task=task)[2].reward == 0.0  # never called the tool
    assert _run(tok, [call, "WRONG1"], task=task)[2].reward == 0.0
    assert _run(tok, [call, code], task=task)[2].reward == 1.0
    s = score_lookup("p", "<think>x</think> " + code, {"answer": code, "called": True})
    assert s.value == 1.0
    assert score_lookup("p", "<think>x", {"answer": code}).value == 0.0
    assert lookup_tasks(3, seed=1) == lookup_tasks(3, seed=1) != lookup_tasks(3, seed=2)


def test_limits_end_episodes(tok):
    task = lookup_tasks(1, seed=6)[0]
    call, _ = lookup_solution(task)
    _, _, ep = _run(tok, [call], limits=EpisodeLimits(max_turns=3))
    assert (ep.ended_by, ep.reward, len(ep.turns), ep.finish_reason) == ("turns", 0.0, 3, "length")
    _, _, ep = _run(tok, [call], limits=EpisodeLimits(max_tokens=480))
    assert ep.ended_by == "tokens" and len(ep.tokens) < 480
    _, _, ep = _run(tok, [call], limits=EpisodeLimits(max_new_tokens=5))
    assert ep.ended_by == "length" and len(ep.turns) == 1 and ep.loss_mask.sum() == 5
    _, _, ep = _run(tok, [call], limits=EpisodeLimits(wall_s=1e-9))
    assert ep.ended_by == "time" and ep.turns == []
    with pytest.raises(ValueError, match="max_turns"):
        EpisodeLimits(max_turns=0)


def test_protocol_and_prefix_stability(tok):
    assert isinstance(LookupEnv(), Environment)
    with pytest.raises(ValueError, match="reward"):
        Step(done=True)
    with pytest.raises(ValueError, match="observations"):
        Step()
    r = ChatRenderer(tok, thinking=True)
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "reasoning_content": "r", "content": "b"}]
    # a new *user* turn makes the template drop the earlier reasoning: not prefix-stable
    with pytest.raises(RenderError, match="prefix-stable"):
        r.continuation_ids(msgs, [{"role": "user", "content": "c"}])


def test_non_canonical_turns_keep_the_models_tokens(tok):
    task = lookup_tasks(1, seed=7)[0]
    call, code = lookup_solution(task)
    # a blank line inside the call markup: parsed the same, rendered without it
    texts = [call.replace("<function=lookup>\n", "<function=lookup>\n\n"), code]
    r, _, ep = _run(tok, texts, task=task)
    assert ep.reward == 1.0 and not ep.canonical
    masked = [t for t, m in zip(ep.tokens, ep.loss_mask) if m]
    assert tok.decode(masked) == "<|im_end|>".join(texts) + "<|im_end|>"
    assert list(ep.tokens) != list(tok.encode(r.conversation_text(ep.messages, [LOOKUP_TOOL])))
