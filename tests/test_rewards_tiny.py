"""Tiny learnable domains: every canonical domain has one, its reference response earns 1 from
the production scorer (code really runs in the sandbox) and a wrong response earns 0."""

import pytest

from cascade_jax.domains import DOMAINS, RLHF
from cascade_jax.rewards import make_scorer
from cascade_jax.rewards.tiny import GENERATORS, tiny_examples


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
