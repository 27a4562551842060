"""Judges: served judge over a real HTTP SGLang stand-in, rule-based judges, GenRM aggregation,
long-context QA and SWE repair scorers."""

import json
import os
import socket
import urllib.request

import pytest

from cascade_jax.rewards import make_scorer
from cascade_jax.rewards.judges import (JUDGE_CONFIG_DIR, HttpTransport, JudgeError,
                                        RulePairwiseJudge, RulePatchJudge, RuleQAJudge,
                                        ServedJudge, chatml, load_judge_prompt)
from cascade_jax.rewards.rlhf import GenRMScorer, aggregate_win_rates
from tests.rewards.support import byte_detokenizer, byte_tokenizer, sglang_stub


@pytest.fixture(scope="module")
def server():
    with sglang_stub() as url:
        yield url


def _stats(url):
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.loads(r.read())


def test_judge_configs_load_and_parse():
    names = sorted(f[:-5] for f in os.listdir(JUDGE_CONFIG_DIR) if f.endswith(".toml"))
    assert names == ["genrm_pairwise", "long_context_qa", "swe_repair"]
    p = load_judge_prompt("genrm_pairwise")
    assert p.fields == ["prompt", "response_a", "response_b"]
    assert p.parse("<think>[[A]]</think>so [[B]]") == (0.0, "B")  # reasoning ignored, last wins
    assert p.parse("[[TIE]]") == (0.5, "TIE")
    with pytest.raises(JudgeError, match="no verdict"):
        p.parse("<think>[[A]]</think>no idea")
    swe = load_judge_prompt("swe_repair")
    assert swe.parse("Score: 7") == (0.7, "7") and swe.parse("Score: 12")[0] == 1.0
    with pytest.raises(KeyError, match="missing fields"):
        p.render_user({"prompt": "x"})


def test_bad_judge_config_is_rejected(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('template = "{x}"\nbogus = 1\n[verdict]\npattern = "(A)"\nlabels = {A = 1.0}\n')
    with pytest.raises(ValueError, match="bogus"):
        load_judge_prompt(str(bad))
    bad.write_text('template = "{x}"\n[verdict]\npattern = "A"\nlabels = {A = 1.0}\n')
    with pytest.raises(ValueError, match="capture group"):
        load_judge_prompt(str(bad))


@pytest.mark.timeout(60)
def test_served_pairwise_judge_text_and_tokens(server):
    prompt = load_judge_prompt("genrm_pairwise")
    judge = ServedJudge(HttpTransport(server), prompt)
    v = judge({"prompt": "hi", "response_a": "short", "response_b": "much longer answer"})
    assert (v.value, v.label) == (1.0, "A")
    last = _stats(server)["last"]
    assert last["text"].startswith("<|im_start|>system\n") and last["text"].endswith(
        "<|im_start|>assistant\n<think>\n")
    assert last["sampling_params"]["max_new_tokens"] == 8192
    # the judge's own tokenizer: input_ids go over the wire
    tok_judge = ServedJudge(HttpTransport(server), prompt, tokenizer=byte_tokenizer,
                            sampling_overrides={"temperature": 0.0})
    v = tok_judge({"prompt": "hi", "response_a": "same", "response_b": "same"})
    assert (v.value, v.label) == (0.5, "TIE")
    last = _stats(server)["last"]
    assert "text" not in last and byte_detokenizer(last["input_ids"]).startswith("<|im_start|>")
    assert last["sampling_params"]["temperature"] == 0.0


@pytest.mark.timeout(60)
def test_served_judge_with_skip_tokenizer_init():
    with sglang_stub("--skip-tokenizer-init") as url:
        judge = ServedJudge(HttpTransport(url), load_judge_prompt("long_context_qa"),
                            tokenizer=byte_tokenizer, detokenizer=byte_detokenizer)
        v = judge({"question": "q?", "reference": "Paris", "response": "It is paris."})
        assert (v.value, v.label) == (1.0, "CORRECT")
        assert chatml([{"role": "user", "content": "x"}], thinking=False).endswith("assistant\n")


@pytest.mark.timeout(60)
def test_http_transport_errors_are_clear():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = HttpTransport(f"http://127.0.0.1:{port}", timeout_s=2, retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}/generate"):
        t.generate({"text": "x"})


@pytest.mark.timeout(60)
def test_http_transport_reports_4xx(server):
    with pytest.raises(JudgeError, match="HTTP 400"):
        HttpTransport(server, retries=0).generate({"sampling_params": {}})


@pytest.mark.timeout(60)
def test_genrm_all_pairs_over_http(server):
    judge = ServedJudge(HttpTransport(server), load_judge_prompt("genrm_pairwise"))
    before = _stats(server)["requests"]
    responses = ["<think>long reasoning</think>ok", "<think>r</think>a bit longer",
                 "<think>r</think>the longest answer of all", "<think>never finished"]
    prompts = ["p1"] * 4
    scores = GenRMScorer(judge, workers=4)(prompts, responses, [{}] * 4)
    assert _stats(server)["requests"] - before == 3  # C(3,2): the unfinished one is not judged
    assert [s.value for s in scores] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert scores[0].preferences == ((1, 1.0), (2, 1.0), (3, 1.0))
    assert "never closed" in scores[3].reason
    # both orders: twice the calls, same result for a position-consistent judge
    before = _stats(server)["requests"]
    both = GenRMScorer(judge, both_orders=True)(prompts, responses, [{}] * 4)
    assert _stats(server)["requests"] - before == 6
    assert [s.value for s in both] == pytest.approx([s.value for s in scores])


@pytest.mark.timeout(60)
def test_genrm_judge_failures_count_as_ties_with_reason(server):
    judge = ServedJudge(HttpTransport(server), load_judge_prompt("genrm_pairwise"))
    scores = GenRMScorer(judge)(["p", "p"], ["fine", "BREAK_JUDGE"], [{}, {}])
    assert [s.value for s in scores] == [0.5, 0.5]
    assert scores[0].metrics["judge_errors"] == 1 and "no verdict" in scores[0].reason


def test_genrm_groups_and_ties():
    judge = RulePairwiseJudge()
    prompts = ["a", "a", "b", "b", "b"]
    responses = ["x y", "x y", "one", "one two", "one two three"]
    scores = GenRMScorer(judge)(prompts, responses, [{}] * 5)
    assert [s.value for s in scores] == pytest.approx([0.5, 0.5, 1.0, 0.5, 0.0])
    meta = [{"group": 1, "judge_fields": {"keyword": "cat"}}] * 2
    s = GenRMScorer(judge)(["q1", "q2"], ["a long reply about a cat", "short"], meta)
    assert [x.value for x in s] == [1.0, 0.0]  # grouped by 'group', keyword beats brevity
    assert GenRMScorer(judge)(["solo"], ["alone"], [{}])[0].value == 0.5


def test_win_rate_aggregation_formulas():
    o = [[0, 1, 1], [0, 0, 0.5], [0, 0.5, 0]]
    assert aggregate_win_rates(o, [10, 10, 10]) == pytest.approx([1.0, 0.25, 0.25])
    # length normalisation: the longest of equal-quality responses loses some score
    lp = aggregate_win_rates([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]], [10, 20, 30],
                             length_penalty=0.1)
    assert lp[0] > lp[1] > lp[2] and lp[1] == pytest.approx(0.5)
    # conciseness bonus only above the quality gate
    cb = aggregate_win_rates(o, [10, 40, 40], conciseness_bonus=0.2, quality_gate=0.5)
    assert cb == pytest.approx([1.0, 0.25, 0.25])
    cb = aggregate_win_rates([[0, .6, .6], [.4, 0, .5], [.4, .5, 0]], [10, 40, 40],
                             conciseness_bonus=0.2)
    assert cb[0] == pytest.approx(0.6 + 0.2 * 0.75) and cb[1] == pytest.approx(0.45)


@pytest.mark.timeout(60)
def test_long_context_qa_scorer(server):
    meta = [{"answer": "742", "question": "What is the value of tiger?"}] * 4
    responses = ["<think>tiger: 742 I guess</think>742", "<think>x</think>The value is 742.",
                 "<think>742</think>I am not sure", "<think>742"]
    for judge in (None, ServedJudge(HttpTransport(server), load_judge_prompt("long_context_qa"))):
        s = make_scorer("long_context", judge=judge)(["ctx"] * 4, responses, meta)
        assert [x.value for x in s] == [1.0, 1.0, 0.0, 0.0], [x.reason for x in s]
    assert RuleQAJudge(contains=False)({"reference": "The Cat", "response": "cat!"}).value == 1.0


@pytest.mark.timeout(60)
def test_long_context_judge_error_is_reported():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    judge = ServedJudge(HttpTransport(f"http://127.0.0.1:{port}", retries=0),
                        load_judge_prompt("long_context_qa"))
    out = make_scorer("long_context", judge=judge)(["q"], ["42"], [{"answer": "42"}])[0]
    assert out.value == 0 and "judge error" in out.reason and out.metrics["judge_error"] == 1


GOLD = "--- a/ops.py\n+++ b/ops.py\n@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n"


@pytest.mark.timeout(60)
def test_swe_repair_scorer(server):
    meta = [{"gold_patch": GOLD, "issue": "add is wrong"}] * 5
    responses = [
        f"<think>fix it</think>```diff\n{GOLD}```",
        "<think>x</think><<<<<<< SEARCH\n    return a - b\n=======\n    return a + b\n>>>>>>> REPLACE",
        "<think>x</think>```diff\n--- a/ops.py\n+++ b/ops.py\n-    return a - b\n+    return b - a\n```",
        f"<think>```diff\n{GOLD}```</think>I could not fix it.",
        "<think>x</think>```python\nprint('no patch')\n```",
    ]
    s = make_scorer("swe")(["p"] * 5, responses, meta)
    assert [x.value for x in s[:2]] == [1.0, 1.0]
    assert s[2].value == pytest.approx(0.5) and s[2].metrics["above_half"] == 0
    assert s[3].value == 0 and s[4].value == 0 and "no patch" in s[4].reason
    served = ServedJudge(HttpTransport(server), load_judge_prompt("swe_repair"))
    s = make_scorer("swe", judge=served)(["p"] * 3, responses[:3], meta[:3])
    assert [x.value for x in s] == pytest.approx([1.0, 0.2, 0.2])
    assert RulePatchJudge()({"gold_patch": GOLD, "patch": "+\n"}).value == 0.0
