"""Rule-verified scorers: positive, negative and adversarial cases per domain, and the shared
interface (parallel batches, per-item timeout, metadata errors)."""

import threading
import time

import pytest

from cascade_jax import domains
from cascade_jax.rewards import MetadataError, Pointwise, Score, final_answer, make_scorer, score
from cascade_jax.rewards.tool_call import ToolCallParseError, format_tool_call, parse_tool_calls


def _values(domain, responses, meta, prompts=None):
    prompts = prompts or ["p"] * len(responses)
    metas = meta if isinstance(meta, list) else [meta] * len(responses)
    return [s.value for s in score(domain, prompts, responses, metas)]


# --------------------------------------------------------------------------------- interface


def test_domains_are_canonical():
    assert set(domains.DOMAINS) == {"math", "instruction_following", "mcq", "structured_output",
                                    "tool_call", "code", "rlhf", "long_context", "swe"}
    assert domains.check_domain("code") == "code"
    with pytest.raises(ValueError, match="valid domains"):
        domains.check_domain("maths")
    with pytest.raises(ValueError, match="valid domains"):
        make_scorer("maths")


def test_final_answer_rules():
    assert final_answer("<think>a</think> b ") == "b"
    assert final_answer("<think></think>b") == "b"
    assert final_answer("plain") == "plain"
    assert final_answer("<think>never closed") is None
    assert final_answer("<think>a</think>b</think>c") == "c"


def test_pointwise_parallel_timeout_and_errors():
    """A scorer call that hangs becomes a timeout score after ``timeout_s``; the call returns
    while the hung worker still blocks (it is released only after the assertions), so the
    property holds however loaded the machine is."""
    release = threading.Event()

    def slow(p, r, m):
        if r == "hang":
            release.wait(120)
        if r == "boom":
            raise RuntimeError("scorer bug")
        return Score(1.0, "fine")
    scorer = Pointwise(slow, workers=4, timeout_s=0.5)
    try:
        # had the call waited for the hung worker, it would have scored 1.0 after 120 s
        out = scorer(["p"] * 4, ["a", "hang", "boom", "b"], [{}] * 4)
    finally:
        release.set()
    assert [s.value for s in out] == [1.0, 0.0, 0.0, 1.0]
    assert out[1].reason.startswith("timeout") and "RuntimeError: scorer bug" in out[2].reason
    with pytest.raises(ValueError, match="length mismatch"):
        scorer(["p"], ["a", "b"], [{}])
    with pytest.raises(ValueError, match=r"metadata\[0\]"):
        scorer(["p"], ["a"], ["not a mapping"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Score(1.5, "bad")


def test_metadata_errors_name_row_and_field():
    with pytest.raises(MetadataError, match=r"metadata\[1\]: missing field 'answer'"):
        score("math", ["p", "p"], ["1", "2"], [{"answer": "1"}, {}])
    with pytest.raises(MetadataError, match=r"metadata\[0\].*unknown instruction id"):
        score("instruction_following", ["p"], ["x"], [{"instruction_id_list": ["nope"]}])
    with pytest.raises(TypeError, match="takes no judge"):
        make_scorer("math", judge=lambda f: None)


# ---------------------------------------------------------------------------------- math


def test_math():
    meta = {"answer": "\\frac{1}{2}"}
    assert _values("math", ["<think>so</think>The answer is $\\boxed{0.5}$",
                            "<think>x</think>It equals 1/2.", "\\boxed{\\dfrac{2}{4}}"], meta) == [1, 1, 1]
    assert _values("math", ["\\boxed{0.6}", "<think>x</think>no idea", ""], meta) == [0, 0, 0]
    # adversarial: answer hidden in reasoning; two different boxed answers; truncated thinking
    out = score("math", ["p"] * 4, ["<think>it is \\boxed{1/2}</think>I give up.",
                                    "<think>x</think>\\boxed{1/2} or maybe \\boxed{1/3}",
                                    "<think>\\boxed{1/2}", "\\boxed{1/2} and again \\boxed{ 1/2 }"],
                [meta] * 4)
    assert [s.value for s in out] == [0, 0, 0, 1]
    assert "multiple different boxed" in out[1].reason and "never closed" in out[2].reason
    assert _values("math", ["x = \\boxed{2\\sqrt{2}}"], {"answer": "\\sqrt{8}"}) == [1]
    assert _values("math", ["\\boxed{12}"], {"answer": 12}) == [1]


# ----------------------------------------------------------------------------------- mcq


def test_mcq():
    meta = {"answer": "B", "letters": "ABCD"}
    good = ["Answer: B", "The answer is (B).", "**Final Answer:** B) 42 because A is wrong",
            "<think>A? no.</think>B", "\\boxed{B}", "\\boxed{\\text{B}}", "The correct option is B."]
    assert _values("mcq", good, meta) == [1] * len(good)
    assert _values("mcq", ["Answer: C", "I think it is right", "Answer: E"], meta) == [0, 0, 0]
    # adversarial: several letters, answer only in reasoning
    bad = score("mcq", ["p"] * 4, ["Answer: A or B", "\\boxed{A, B}", "Answer: B\nAnswer: C",
                                   "<think>Answer: B</think>Unsure."], [meta] * 4)
    assert [s.value for s in bad] == [0, 0, 0, 0]
    assert "several answer letters" in bad[0].reason and "no answer letter" in bad[3].reason
    assert _values("mcq", ["Answer: B"], {"answer": "B", "choices": ["x", "y"]}) == [1]


# ---------------------------------------------------------------------------- structured


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "tags": {"type": "array", "items": {
                                               "type": "object",
                                               "properties": {"k": {"type": "integer"}}}}},
          "required": ["name"]}


def test_structured_output():
    meta = {"schema": SCHEMA}
    good = ['{"name": "a"}', '<think>{"x": 1}</think>```json\n{"name": "a", "tags": [{"k": 1}]}\n```']
    assert _values("structured_output", good, meta) == [1, 1]
    out = score("structured_output", ["p"] * 5,
                ['{"name": 3}', 'Sure! {"name": "a"}', '{"name": "a"', '{"name": "a", "extra": 1}',
                 '{"name": "a", "tags": [{"k": 1, "sneaky": 2}]}'], [meta] * 5)
    assert [s.value for s in out] == [0] * 5
    assert "Additional properties" in out[3].reason and "tags/0" in out[4].reason
    # a schema that explicitly allows extra keys keeps allowing them; strict can be turned off
    open_schema = dict(SCHEMA, additionalProperties=True)
    assert _values("structured_output", ['{"name": "a", "extra": 1}'], {"schema": open_schema}) == [1]
    assert _values("structured_output", ['{"name": "a", "extra": 1}'],
                   {"schema": SCHEMA, "strict": False}) == [1]
    with pytest.raises(MetadataError, match="invalid JSON schema"):
        score("structured_output", ["p"], ["{}"], [{"schema": {"type": "nonsense"}}])


# ----------------------------------------------------------------------------- tool call


def test_tool_call_parse_and_score():
    call = format_tool_call("get_weather", {"city": "Paris", "days": 3, "opts": {"u": "C"}})
    assert parse_tool_calls(call)[0].arguments == {"city": "Paris", "days": "3",
                                                   "opts": '{"u": "C"}'}
    meta = {"expected_calls": [{"name": "get_weather",
                                "arguments": {"city": "Paris", "days": 3, "opts": {"u": "C"}}}]}
    assert _values("tool_call", ["<think>need weather</think>\n" + call, "Let me check.\n" + call,
                                 call.replace("\n3\n", "\n3.0\n")], meta) == [1, 1, 1]
    assert _values("tool_call", [call.replace("Paris", "Rome"),
                                 call.replace("get_weather", "get_time"),
                                 call + "\n" + call], meta) == [0, 0, 0]
    malformed = [call + "\nHope that helps!",                      # text after the call
                 call.replace("</function>", ""),                  # unclosed function
                 call.replace("<tool_call>\n", ""),                # function outside tool_call
                 call.replace("<parameter=days>", "<parameter=city>"),  # duplicate parameter
                 call.replace("<function=get_weather>", "<function=>"),  # nameless function
                 "<tool_call>\n<function=a>\n</function>\n<function=b>\n</function>\n</tool_call>",
                 call.replace("</tool_call>", "")]                 # unclosed tool_call
    out = score("tool_call", ["p"] * len(malformed), malformed, [meta] * len(malformed))
    assert all(s.value == 0 and s.reason.startswith("malformed tool call") for s in out), out
    hidden = score("tool_call", ["p"], ["<think>" + call + "</think>It will rain."], [meta])[0]
    assert hidden.value == 0 and "no tool call" in hidden.reason
    assert _values("tool_call", ["It is sunny.", call], {"expected_calls": []}) == [1, 0]
    two = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": "1"}}]
    calls = format_tool_call("b", {"x": "1"}) + "\n" + format_tool_call("a", {})
    assert _values("tool_call", [calls], {"expected_calls": two}) == [0]
    assert _values("tool_call", [calls], {"expected_calls": two, "ordered": False}) == [1]
    with pytest.raises(ToolCallParseError):
        parse_tool_calls("<tool_call>\n<function=f>\n<parameter=x>\n1\n</function>\n</tool_call>")


# ------------------------------------------------------------------ instruction following


def test_instruction_following():
    meta = {"instruction_id_list": ["length_constraints:number_words", "keywords:existence",
                                    "keywords:forbidden_words", "change_case:english_lowercase",
                                    "startend:end_checker"],
            "kwargs": [{"num_words": 12, "relation": "less than"}, {"keywords": ["blue"]},
                       {"forbidden_words": ["red"], "unused": None}, {},
                       {"end_phrase": "any other question?"}]}
    ok = "<think>RED is a colour</think>the sky is blue. any other question?"
    assert _values("instruction_following", [ok], meta) == [1]
    out = score("instruction_following", ["p"] * 3,
                ["the sky is blue and red. any other question?",
                 "**the sky is blue. any other question?**",
                 "<think>the sky is blue. any other question?"], [meta] * 3)
    assert [s.value for s in out] == [0, 0, 0]
    assert "forbidden_words" in out[0].reason
    assert out[1].metrics["prompt_loose"] == 1.0 and out[1].metrics["prompt_strict"] == 0.0
    frac = score("instruction_following", ["p"], ["the sky is red. any other question?"],
                 [dict(meta, reward="strict_fraction")])[0]
    assert frac.value == pytest.approx(0.6)  # no "blue", has "red": 3 of 5 pass


@pytest.mark.parametrize("iid,kwargs,good,bad", [
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "One. Two!", "Only one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a\n***\nb", "a\n\nb"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}, "a\n\nThen b", "a\n\nb"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "cat and cat", "cat and dog"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zoo", "zzz"),
    ("change_case:english_capital", {}, "HELLO WORLD", "Hello"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and ESA", "NASA only"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\na\nSection 2\nb", "Section 1\na"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and *b*", "*a*"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "hi\nP.S. bye", "hi"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]",
     "[name]"),
    ("startend:start_checker", {"start_phrase": "Dear Sir"}, "Dear sir, hi", "Hi"),
    ("startend:quotation", {}, '"quoted"', "not quoted"),
    ("punctuation:no_comma", {}, "no commas here", "a, b"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Say hi. Hi!", "Hi!"),
    ("combination:two_responses", {}, "one\n******\ntwo", "one\n******\none"),
])
def test_instruction_checks(iid, kwargs, good, bad):
    meta = {"instruction_id_list": [iid], "kwargs": [kwargs]}
    assert _values("instruction_following", [good, bad], meta) == [1, 0]


@pytest.mark.timeout(30)
def test_math_pathological_answer_is_time_bounded(monkeypatch):
    import cascade_jax.rewards.math as m
    monkeypatch.setattr(m, "TIMEOUT_S", 1)
    t = time.monotonic()
    out = score("math", ["p"], ["\\boxed{9^{9^{9^{9}}}}"], [{"answer": "1"}])[0]
    assert out.value == 0 and time.monotonic() - t < 10
