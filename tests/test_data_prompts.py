"""RL prompt streams: rendered prompts with domain ids and verifier metadata, mixing weights,
over-sampling, exact resume in a new process, disjoint shards, field mapping, bad rows."""

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax import domains as D
from cascade_jax.data import DataError, prompt_batches, render_chat, tiny_tokenizer
from cascade_jax.data.convert import write_jsonl
from cascade_jax.rewards import make_scorer
from cascade_jax.data.tiny import tiny_examples
from tests.oracle_util import REPO

TOK = tiny_tokenizer()


def _cfg(*more):
    return C.apply_overrides(C.Config(), ["data.batch_prompts=24", "rollout.sampling.n_samples=4",
                                          "rollout.sampling.max_prompt_len=512", "data.tiny_rows_per_domain=64",
                                          *more])


def test_domain_ids_are_one_table():
    assert [D.domain_id(n) for n in D.DOMAINS] == list(range(len(D.DOMAINS)))
    assert all(D.domain_name(D.domain_id(n)) == n for n in D.DOMAINS)
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        D.domain_id("poetry")
    with pytest.raises(ValueError, match="unknown domain id 99"):
        D.domain_name(99)


def test_batch_contents_render_and_expand():
    cfg = _cfg("data.oversample=1.5", 'data.domains=["math", "mcq", "tool_call"]', "rollout.sampling.thinking=false")
    pb = next(prompt_batches(cfg, TOK))
    P = math.ceil(24 * 1.5)
    assert len(pb) == P and pb.tokens.shape == (P, 512) and pb.n_samples == 4 and pb.step == 0
    assert set(pb.domains) <= {"math", "mcq", "tool_call"}
    assert pb.domain_ids.tolist() == [D.domain_id(d) for d in pb.domains]
    for i in range(P):
        text, ids, _ = render_chat(TOK, pb.messages[i], tools=pb.tools[i], thinking=False,
                                   add_generation_prompt=True)
        assert text == pb.texts[i] and text.endswith("<|im_start|>assistant\n<think></think>")
        n = pb.lengths[i]
        assert pb.tokens[i, :n].tolist() == ids.tolist() and (pb.tokens[i, n:] == TOK.pad_id).all()
        assert (pb.tools[i] is not None) == (pb.domains[i] == "tool_call")
        assert pb.prompts[i] == pb.messages[i][-1]["content"]
    tokens, lengths, groups, dom = pb.expand()
    assert tokens.shape == (P * 4, 512) and groups.tolist() == np.repeat(np.arange(P), 4).tolist()
    assert (tokens[4 * 3 + 2] == pb.tokens[3]).all() and dom[4 * 5] == pb.domain_ids[5]


def test_metadata_reaches_the_scorers():
    doms = ["math", "mcq", "structured_output", "tool_call", "instruction_following"]
    cfg = _cfg(f"data.domains={json.dumps(doms)}", "data.batch_prompts=20")
    refs = {ex.prompt: ex.reference for d in doms for ex in tiny_examples(d, n=64, seed=0)}
    pb = next(prompt_batches(cfg, TOK))
    for d in set(pb.domains):
        idx = [i for i, x in enumerate(pb.domains) if x == d]
        prompts = [pb.prompts[i] for i in idx]
        scores = make_scorer(d)(prompts, [refs[p] for p in prompts], [pb.metadata[i] for i in idx])
        assert [s.value for s in scores] == [1.0] * len(idx), d
        wrong = make_scorer(d)(prompts, ["nothing useful"] * len(idx), [pb.metadata[i] for i in idx])
        assert max(s.value for s in wrong) < 1.0


def test_mixing_weights_55_30_15():
    cfg = C.load(str(REPO / "configs" / "multi_domain_rl.json"))
    # the paper's stage config with its data swapped for the built-in tiny rows (weights kept)
    cfg = C.apply_overrides(cfg, ["model.preset=tiny", 'data.sources=[{"format": "tiny"}]',
                                  "data.batch_prompts=128",
                                  "rollout.sampling.max_prompt_len=512", "data.tiny_rows_per_domain=64"])
    it = prompt_batches(cfg, TOK)
    assert it.weights == {"mcq": 0.55, "tool_call": 0.30, "structured_output": 0.15}
    counts = Counter(d for _ in range(40) for d in next(it).domains)
    n = sum(counts.values())
    assert n == 5120
    for d, w in it.weights.items():  # multinomial: std of a share <= 0.007 here
        assert abs(counts[d] / n - w) < 0.025, (d, counts[d] / n)
    # default weights: proportional to the rows per domain
    it2 = prompt_batches(_cfg('data.domains=["math", "mcq"]'), TOK)
    assert it2.weights == {"math": 0.5, "mcq": 0.5}



def test_stratified_draws_keep_each_count_within_one_of_its_expectation():
    """``data.domain_draw=stratified``: ``c_d`` in ``{floor(B w_d), ceil(B w_d)}`` in every batch,
    the batch size exact, and the long-run share of each domain equal to its weight up to the
    rounding of one batch (independent of the multinomial's spread)."""
    weights = {"math": 0.55, "mcq": 0.30, "rlhf": 0.15}
    cfg = _cfg('data.domains=["math", "mcq", "rlhf"]', f"data.domain_weights={json.dumps(weights)}",
               "data.batch_prompts=8", "data.domain_draw=stratified")
    it = prompt_batches(cfg, TOK)
    total, n_batches = Counter(), 300
    for _ in range(n_batches):
        c = Counter(next(it).domains)
        assert sum(c.values()) == 8
        for d, w in weights.items():
            assert c[d] in (math.floor(8 * w), math.ceil(8 * w)), (d, c)
        total.update(c)
    # systematic sampling with a uniform offset: E[c_d] = 8 w_d; the share's std over 300
    # batches <= 0.5 / 8 / sqrt(300) = 0.0036, so 0.012 is more than 3 standard deviations
    for d, w in weights.items():
        assert abs(total[d] / (8 * n_batches) - w) < 0.012, (d, total[d] / (8 * n_batches))
    # equal weights over 6 domains, 8 prompts: every domain in every batch (the multinomial
    # leaves one out with probability 1 - 6! S(8, 6) / 6^8 = 0.89 per batch)
    six = ["math", "instruction_following", "tool_call", "mcq", "structured_output", "rlhf"]
    it6 = prompt_batches(_cfg(f"data.domains={json.dumps(six)}", "data.batch_prompts=8",
                              "data.domain_draw=stratified"), TOK)
    for _ in range(20):
        c = Counter(next(it6).domains)
        assert set(c) == set(six) and sorted(c.values()) == [1, 1, 1, 1, 2, 2], c
    multi = prompt_batches(_cfg(f"data.domains={json.dumps(six)}", "data.batch_prompts=8"), TOK)
    assert any(len(set(next(multi).domains)) < 6 for _ in range(20))


def test_heldout_prompts_do_not_depend_on_the_training_draw():
    """The eval's prompts and their order (hence the engine's sample seeds) are the same whether
    the stage trains with multinomial or stratified draws: one checkpoint, one score."""
    from cascade_jax.runner.evaluate import heldout_prompts

    doms = ["math", "rlhf", "structured_output"]
    got = [heldout_prompts(_cfg(f"data.domains={json.dumps(doms)}", "eval.prompts=16",
                                f"data.domain_draw={draw}"), TOK, doms)
           for draw in ("multinomial", "stratified")]
    assert len(got[0]) == 48 and got[0] == got[1]

_RESUME = """
import json, sys
from cascade_jax import config as C
from cascade_jax.data import prompt_batches, tiny_tokenizer
it = prompt_batches(C.from_dict(C.Config, json.load(open(sys.argv[1]))), tiny_tokenizer())
it.set_state(json.load(open(sys.argv[2])))
b = next(it)
json.dump({"tokens": b.tokens.tolist(), "domains": list(b.domains), "metadata": list(b.metadata),
           "row_ids": list(b.row_ids), "step": b.step}, open(sys.argv[3], "w"))
"""


def test_same_seed_same_stream_and_resume_in_a_new_process(tmp_path):
    cfg = _cfg("data.tiny_rows_per_domain=8")  # small pools: several epochs within 12 batches
    full = [next(it) for it in [prompt_batches(cfg, TOK)] for _ in range(12)]
    again = prompt_batches(cfg, TOK)
    for b in full[:11]:
        assert next(again).tokens.tolist() == b.tokens.tolist()
    other = next(prompt_batches(C.apply_overrides(cfg, ["data.shuffle_seed=1"]), TOK))
    assert other.row_ids != full[0].row_ids
    (tmp_path / "cfg.json").write_text(C.to_json(cfg))
    (tmp_path / "state.json").write_text(json.dumps(again.get_state()))
    subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path / "cfg.json"), str(tmp_path / "state.json"),
                    str(tmp_path / "b.json")], check=True, timeout=120, cwd=str(REPO),
                   env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    got = json.loads((tmp_path / "b.json").read_text())
    want = full[11]
    assert got["step"] == 11 and got["tokens"] == want.tokens.tolist()
    assert got["domains"] == list(want.domains) and got["row_ids"] == list(want.row_ids)
    assert got["metadata"] == json.loads(json.dumps(list(want.metadata)))


def test_two_processes_disjoint_shards_cover_the_pool():
    cfg = _cfg('data.domains=["math"]', "data.tiny_rows_per_domain=40", "data.batch_prompts=20")
    seen = []
    for p in (0, 1):
        it = prompt_batches(cfg, TOK, process_index=p, process_count=2)
        assert it.batch_size == 10
        seen.append([r for _ in range(2) for r in next(it).row_ids])  # one epoch of 20 each
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"tiny:math:{j}" for j in range(40)}
    assert len(set(seen[0])) == 20


def _rl_rows():
    return [{"question": {"text": f"What is {a} + 1?"}, "env": "math", "gold": str(a + 1), "uid": f"q{a}"}
            for a in range(10)]


FIELDS = {"prompt": "question.text", "domain": "env", "metadata.answer": "gold", "id": "uid"}


def _jsonl_cfg(path, *more, fields=FIELDS):
    src = {"path": str(path), "format": "jsonl", "fields": fields}
    return _cfg(f"data.sources={json.dumps([src])}", "data.batch_prompts=5", *more)


def test_field_mapping_of_nested_rows(tmp_path):
    write_jsonl(_rl_rows(), tmp_path / "rl.jsonl")
    pb = next(prompt_batches(_jsonl_cfg(tmp_path / "rl.jsonl"), TOK))
    for i in range(len(pb)):
        a = int(pb.row_ids[i][1:])
        assert pb.domains[i] == "math" and pb.metadata[i] == {"answer": str(a + 1)}
        assert pb.prompts[i] == f"What is {a} + 1?"


@pytest.mark.parametrize("bad,match", [
    ('{"question": {"text": "x"}, "env": "poetry", "gold": "1"}', "unknown domain 'poetry'"),
    ('{"question": {"text": "x"}, "gold": "1"}', "domain: missing"),
    ('{"question": {"text": "x"}, "env": "math"}', "missing field 'metadata.answer' \\(mapped from 'gold'\\)"),
    ('{"question": ', "malformed JSON"),
])
def test_bad_rows_error_with_file_and_line_or_skip(tmp_path, bad, match):
    lines = [json.dumps(r) for r in _rl_rows()]
    lines.insert(6, bad)
    (tmp_path / "rl.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"rl.jsonl:7: .*{match}"):
        prompt_batches(_jsonl_cfg(tmp_path / "rl.jsonl"), TOK)
    it = prompt_batches(_jsonl_cfg(tmp_path / "rl.jsonl", "data.on_bad_row=skip"), TOK)
    assert it.stats["bad_row"] == 1 and len(next(it)) == 5


def test_missing_domain_empty_source_and_overlong_prompts(tmp_path):
    write_jsonl(_rl_rows(), tmp_path / "rl.jsonl")
    with pytest.raises(DataError, match=r"no RL prompts for domain\(s\) \['mcq'\]"):
        prompt_batches(_jsonl_cfg(tmp_path / "rl.jsonl", 'data.domains=["mcq"]'), TOK)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no rows"):
        prompt_batches(_jsonl_cfg(tmp_path / "empty.jsonl"), TOK)
    rows = _rl_rows()
    rows[3]["question"]["text"] = "very long " * 200
    write_jsonl(rows, tmp_path / "long.jsonl")
    it = prompt_batches(_jsonl_cfg(tmp_path / "long.jsonl", "rollout.sampling.max_prompt_len=64"), TOK)
    ids = [r for _ in range(4) for r in next(it).row_ids]  # two epochs of the 9 usable rows
    assert "q3" not in ids and it.stats["overlong"] == 2 and len(set(ids)) == 9
    with pytest.raises(DataError, match="no prompt of its 10 fits"):
        next(prompt_batches(_jsonl_cfg(tmp_path / "long.jsonl", "rollout.sampling.max_prompt_len=4"), TOK))
