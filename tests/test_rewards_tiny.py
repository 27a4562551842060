"""Tiny learnable domains: every canonical domain has one, its reference response earns 1 from
the production scorer (code really runs in the sandbox), a wrong response earns 0, and a near miss
(the SFT rows' format slip) earns 0."""

import pytest

from cascade_jax.domains import DOMAINS, RLHF
from cascade_jax.rewards import make_scorer
from cascade_jax.data.tiny import GENERATORS, NEAR_MISS_RATE, tiny_examples


def test_every_domain_has_a_tiny_environment():
    assert set(GENERATORS) == set(DOMAINS)
    a, b = tiny_examples("math", 5, seed=3), tiny_examples("math", 5, seed=3)
    assert a == b and a != tiny_examples("math", 5, seed=4)
    with pytest.raises(ValueError, match="unknown domain"):
        tiny_examples("chess", 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("domain", sorted(set(DOMAINS) - {RLHF}))
def test_reference_scores_one_and_wrong_scores_zero(domain):
    ex = tiny_examples(domain, 6, seed=0)
    prompts, meta = [e.prompt for e in ex], [e.metadata for e in ex]
    scorer = make_scorer(domain)
    good = scorer(prompts, ["<think>easy</think>" + e.reference for e in ex], meta)
    assert all(s.value == 1.0 for s in good), [s.reason for s in good]
    bad = scorer(prompts, ["<think>hmm</think>I do not know." for _ in ex], meta)
    assert all(s.value == 0.0 for s in bad), [s.reason for s in bad]
    assert all(s.reason for s in good + bad)


def test_rlhf_reference_wins_its_group():
    ex = tiny_examples(RLHF, 4, seed=0)
    prompts, responses, meta = [], [], []
    for k, e in enumerate(ex):
        for r in (e.reference, "Well, I would rather talk about something else entirely today."):
            prompts.append(e.prompt)
            responses.append("<think>x</think>" + r)
            meta.append(dict(e.metadata, group=k))
    out = make_scorer(RLHF)(prompts, responses, meta)
    assert [s.value for s in out] == [1.0, 0.0] * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("domain", ["instruction_following", "mcq", "tool_call", "structured_output",
                                    "long_context", "code"])
def test_near_miss_scores_zero_and_fills_its_share_of_sft_rows(domain):
    ex = tiny_examples(domain, 400, seed=0)
    scored = ex[:16] if domain == "code" else ex  # code runs each response in the sandbox
    scores = make_scorer(domain)([e.prompt for e in scored],
                                 ["<think>ok</think>" + e.near_miss for e in scored],
                                 [e.metadata for e in scored])
    assert all(s.value == 0.0 for s in scores), [s.reason for s in scores if s.value]
    assert all(e.sft_response in (e.reference, e.near_miss) for e in ex)
    share = sum(e.sft_response == e.near_miss for e in ex) / len(ex)
    assert abs(share - NEAR_MISS_RATE) < 0.07, share  # binomial sd at n=400: 0.023


def test_domains_without_near_miss_train_on_the_reference():
    for domain in ("math", "rlhf", "swe"):
        assert all(not e.near_miss and e.sft_response == e.reference
                   for e in tiny_examples(domain, 50, seed=1))


def test_sft_rows_follow_the_configured_near_miss_rate():
    from cascade_jax.config import DataSource
    from cascade_jax.data.sources import open_source

    def responses(rate):
        src = open_source(DataSource(format="tiny"), domains=["mcq"], tiny_rows_per_domain=50,
                          tiny_near_miss_rate=rate, seed=2)
        return [src[i][1]["response"] for i in range(len(src))]

    assert responses(0.0) == [e.reference for e in tiny_examples("mcq", 50, seed=2, near_miss_rate=0.0)]
    assert responses(1.0) == [e.near_miss for e in tiny_examples("mcq", 50, seed=2, near_miss_rate=1.0)]
