"""SFT pipeline: packing invariants, determinism and resume in a new process, disjoint shards,
identical batches from every source format, bad rows and over-long examples."""

import json
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.data import DataError, render_chat, sft_batches, tiny_tokenizer
from cascade_jax.data import packing
from cascade_jax.data.convert import write_array_record, write_jsonl, write_parquet, write_tfds
from cascade_jax.data.sft import Example, example_dataset
from cascade_jax.domains import DOMAINS
from cascade_jax.data.tiny import tiny_examples
from tests.oracle_util import REPO
from tests.test_data_chat import ADD_TOOL

TOK = tiny_tokenizer()
FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def _rows(n=60, seed=0):
    """SFT rows of varied length: tiny prompts/references, reasoning inline or separate,
    multi-turn, tools and tool calls."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        ex = tiny_examples(DOMAINS[i % len(DOMAINS)], n=1, seed=i)[0]
        reasoning = " ".join(r.choice(["think", "so", "then", "sum", "ok"]) for _ in range(r.randint(0, 40)))
        kind = i % 4
        if kind == 0:
            msgs = [{"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": ex.reference, "reasoning_content": reasoning}]
        elif kind == 1:
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n{ex.reference}"}]
        elif kind == 2:
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.reference}]
        else:
            msgs = [{"role": "user", "content": "add 2 and 5"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 5}'}}]},
                    {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7 " + reasoning}]
        row = {"messages": msgs, "id": f"r{i}"}
        if kind == 3:
            row["tools"] = [ADD_TOOL]
        rows.append(row)
    return rows


ROWS = _rows()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    out = {"jsonl": str(d / "rows.jsonl"), "jsonl_gz": str(d / "rows.jsonl.gz"),
           "parquet": str(d / "rows.parquet"), "array_record": str(d / "rows.array_record")}
    write_jsonl(ROWS, out["jsonl"])
    write_jsonl(ROWS, out["jsonl_gz"])
    write_parquet(ROWS, out["parquet"], row_group_size=16)
    write_array_record(ROWS, out["array_record"])
    out["tfds"] = write_tfds(ROWS, str(d / "tfds"))
    out["dir"] = str(d)
    return out


def _cfg(path, fmt="jsonl", *more):
    return C.apply_overrides(C.Config(), [
        f'data.sources=[{{"path": "{path}", "format": "{fmt}"}}]', "data.seq_len=192",
        "data.batch_rows=3", "data.pack_buffer=12", "data.shuffle_seed=5", *more])


def _take(it, k):
    return [next(it) for _ in range(k)]


def _segments(batches):
    """Every packed segment as (ids tuple, mask tuple), checking the row layout on the way."""
    segs = []
    for b in batches:
        for row in range(b.tokens.shape[0]):
            seg, pos, tok, mask = (np.asarray(getattr(b, f)[row]) for f in
                                   ("segment_ids", "positions", "tokens", "loss_mask"))
            pad = seg == 0
            assert (tok[pad] == TOK.pad_id).all() and (pos[pad] == 0).all() and (mask[pad] == 0).all()
            n_real = int((~pad).sum())
            assert not pad[:n_real].any(), "padding only at the end of a row"
            ids = [s for s in np.unique(seg) if s > 0]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all(), "a segment is contiguous"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                assert mask[where[0]] == 0, "a segment's first token has no prefix"
                segs.append((tuple(tok[where].tolist()), tuple(mask[where].tolist())))
    return segs


def _expected_examples(cfg):
    ds = example_dataset(C.apply_overrides(cfg, ["data.num_epochs=1"]), TOK)
    out = []
    for i in range(len(ds)):
        ex = ds[i]
        if isinstance(ex, Example):
            m = ex.loss_mask.copy()
            m[0] = 0
            out.append((tuple(ex.ids.tolist()), tuple(m.tolist())))
    return out


def test_fill_row_and_baseline_by_hand():
    assert packing.fill_row([5, 4, 3, 3, 1], 8) == [0, 2]
    assert packing.ffd_stream([5, 4, 3, 3, 1], 8, buffer=5) == [[0, 2], [1, 3, 4]]
    assert packing.greedy_in_order([5, 4, 3, 3, 1], 8) == [[0], [1, 2], [3, 4]]
    assert packing.efficiency([[0, 2], [1, 3, 4]], [5, 4, 3, 3, 1], 8) == 1.0
    tokens, pos, seg, mask = packing.build_row(
        [(np.array([7, 8, 9]), np.array([0, 1, 1.])), (np.array([4, 5]), np.array([1, 1.]))], 7, pad_id=0)
    assert tokens.tolist() == [7, 8, 9, 4, 5, 0, 0] and pos.tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert seg.tolist() == [1, 1, 1, 2, 2, 0, 0] and mask.tolist() == [0, 1, 1, 0, 1, 0, 0]


def test_fill_row_equals_the_plain_ffd_walk():
    def walk(lengths, cap):  # reference: visit by decreasing length, take whatever fits
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        out, room = [], cap
        for i in order:
            if lengths[i] <= room:
                out.append(i)
                room -= lengths[i]
        return out

    r = np.random.default_rng(0)
    for _ in range(500):
        cap = int(r.integers(1, 100))
        lengths = r.integers(1, cap + 1, size=int(r.integers(0, 40))).tolist()
        assert packing.fill_row(lengths, cap) == walk(lengths, cap)


def test_packing_loses_and_duplicates_nothing(files):
    cfg = _cfg(files["jsonl"], "jsonl", "data.num_epochs=1")
    it = sft_batches(cfg, TOK)
    batches = list(it)
    got = _segments(batches)
    want = _expected_examples(cfg)
    assert len(want) > 40 and Counter(got) == Counter(want)
    st = it.stats
    assert st["examples"] == len(want) and st["examples"] + st["overlong"] + st["no_loss_tokens"] == len(ROWS)
    assert st["real_tokens"] == sum(len(s[0]) for s in want)
    assert 0.5 < it.efficiency <= 1.0
    # packed with look-ahead FFD it needs no more rows than in-order next-fit
    lens = [len(s[0]) for s in want]
    assert len(packing.ffd_stream(lens, 192, 12)) <= len(packing.greedy_in_order(lens, 192))


def test_same_seed_same_batches_other_seed_differs(files):
    a = _take(sft_batches(_cfg(files["jsonl"]), TOK), 4)
    b = _take(sft_batches(_cfg(files["jsonl"]), TOK), 4)
    c = _take(sft_batches(_cfg(files["jsonl"], "jsonl", "data.shuffle_seed=6"), TOK), 4)
    for x, y in zip(a, b):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c))


_RESUME = """
import json, sys, numpy as np
from cascade_jax import config as C
from cascade_jax.data import sft_batches, tiny_tokenizer
cfg = C.from_dict(C.Config, json.load(open(sys.argv[1])))
it = sft_batches(cfg, tiny_tokenizer())
it.set_state(json.load(open(sys.argv[2])))
b = next(it)
np.savez(sys.argv[3], **{f: np.asarray(getattr(b, f)) for f in ("tokens", "positions", "segment_ids", "loss_mask")})
"""


def test_resume_in_a_new_process_gives_the_next_batch(files, tmp_path):
    cfg = _cfg(files["jsonl"], "jsonl", "data.seq_len=256")  # forever: epochs wrap too
    full = _take(sft_batches(cfg, TOK), 9)
    it = sft_batches(cfg, TOK)
    _take(it, 8)
    state = it.get_state()
    assert state["buffer"], "the look-ahead buffer is part of the state"
    (tmp_path / "cfg.json").write_text(C.to_json(cfg))
    (tmp_path / "state.json").write_text(json.dumps(state))
    subprocess.run([sys.executable, "-c", _RESUME, str(tmp_path / "cfg.json"), str(tmp_path / "state.json"),
                    str(tmp_path / "b.npz")], check=True, timeout=120, cwd=str(REPO),
                   env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    got = np.load(tmp_path / "b.npz")
    for f in FIELDS:
        np.testing.assert_array_equal(got[f], getattr(full[8], f))
    assert next(it).tokens.tolist() == full[8].tokens.tolist()  # and in this process


def test_two_processes_see_disjoint_shards_covering_the_data(files):
    cfg = _cfg(files["jsonl"], "jsonl", "data.num_epochs=1", "data.seq_len=1024")
    two = C.apply_overrides(cfg, ["data.num_epochs=2"])
    p0 = [example_dataset(two, TOK, process_index=0, process_count=2)[i] for i in range(60)]
    p1 = [example_dataset(two, TOK, process_index=1, process_count=2)[i] for i in range(60)]
    for epoch in (slice(0, 30), slice(30, 60)):  # every epoch: disjoint halves of all rows
        w0, w1 = {e.where for e in p0[epoch]}, {e.where for e in p1[epoch]}
        assert not w0 & w1 and len(w0 | w1) == len(ROWS)
    assert [e.where for e in p0[:30]] != [e.where for e in p0[30:]]  # reshuffled per epoch
    segs = [s for p in (0, 1) for s in _segments(list(sft_batches(cfg, TOK, process_index=p, process_count=2,
                                                                  rows=2)))]
    with pytest.raises(ValueError, match="batch_rows 3 is not divisible by 2 processes"):
        sft_batches(cfg, TOK, process_index=0, process_count=2)
    assert Counter(segs) == Counter(_expected_examples(cfg))


@pytest.mark.parametrize("fmt", ["jsonl_gz", "parquet", "array_record", "tfds"])
def test_every_format_gives_the_same_batches(files, fmt):
    want = _take(sft_batches(_cfg(files["jsonl"]), TOK), 5)
    got = _take(sft_batches(_cfg(files[fmt], fmt.replace("_gz", "")), TOK), 5)
    for x, y in zip(want, got):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_convert_cli_parquet_to_array_record(files, tmp_path, capsys):
    from cascade_jax.data.convert import main

    out = str(tmp_path / "conv.array_record")
    assert main(["--from", "parquet", files["parquet"], "--to", "array_record", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": len(ROWS), "out": out}
    want = _take(sft_batches(_cfg(files["jsonl"]), TOK), 2)
    got = _take(sft_batches(_cfg(out, "array_record"), TOK), 2)
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)


def _bad_file(tmp_path, name, bad_line):
    lines = [json.dumps(r) for r in ROWS[:4]]
    lines.insert(2, bad_line)  # line 3
    lines.insert(1, "")        # a blank line is no row; the bad row is now line 4
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.mark.parametrize("name,bad,match", [
    ("malformed.jsonl", '{"messages": [', "malformed JSON"),
    ("missing.jsonl", '{"conversation": []}', "missing field 'messages'"),
    ("role.jsonl", '{"messages": [{"role": "narrator", "content": "x"}]}', "unknown role 'narrator'"),
    ("domain.jsonl", json.dumps({**ROWS[0], "domain": "poetry"}), "unknown domain 'poetry'"),
])
def test_bad_rows_error_with_file_and_line_or_skip_and_count(tmp_path, name, bad, match):
    path = _bad_file(tmp_path, name, bad)
    with pytest.raises(DataError, match=f"{path}:4: .*{match}"):
        list(sft_batches(_cfg(path, "jsonl", "data.num_epochs=1", "data.seq_len=1024"), TOK))
    it = sft_batches(_cfg(path, "jsonl", "data.num_epochs=1", "data.seq_len=1024", "data.on_bad_row=skip"), TOK)
    list(it)
    assert it.stats["bad_row"] == 1 and it.stats["examples"] == 4


def test_train_turns_from_the_row(tmp_path):
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    rows = [{"messages": conv, "flags": [False, True]},
            {"messages": [dict(m, train=False) if m["content"] == "second" else m for m in conv]}]
    write_jsonl(rows, tmp_path / "t.jsonl")
    cfg = C.apply_overrides(_cfg(tmp_path / "t.jsonl", "jsonl", "data.num_epochs=1", "data.batch_rows=1"),
                            [f'data.sources=[{{"path": "{tmp_path / "t.jsonl"}", "fields": {{"train_turns": "flags"}}}}]'])
    b = next(sft_batches(cfg, TOK))
    trained = {TOK.decode(b.tokens[0][(b.segment_ids[0] == s) & (b.loss_mask[0] > 0)]) for s in (1, 2)}
    assert trained == {"<think></think>second<|im_end|>", "<think></think>first<|im_end|>"}
    rows[0]["flags"] = [True]
    write_jsonl(rows, tmp_path / "t.jsonl")
    with pytest.raises(DataError, match="t.jsonl:1: train_turns: expected 2 booleans"):
        list(sft_batches(cfg, TOK))


def test_missing_or_empty_sources_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        sft_batches(_cfg(tmp_path / "nope.jsonl"), TOK)
    with pytest.raises(DataError, match="no jsonl files found"):
        sft_batches(_cfg(tmp_path / "*.jsonl"), TOK)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        sft_batches(_cfg(tmp_path / "empty.jsonl"), TOK)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        sft_batches(_cfg(tmp_path / "x.parquet", "parquet"), TOK)
    (tmp_path / "ok.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match=r"fields: unknown canonical field\(s\) \['mesages'\]"):
        sft_batches(C.apply_overrides(_cfg(tmp_path / "ok.jsonl"), [
            f'data.sources=[{{"path": "{tmp_path / "ok.jsonl"}", "fields": {{"mesages": "m"}}}}]']), TOK)
    with pytest.raises(C.ConfigError, match="data.sources.0: path: required"):
        C.apply_overrides(C.Config(), ['data.sources=[{"format": "jsonl"}]'])


def test_overlong_examples_dropped_or_truncated_and_counted(files):
    lens = [len(s[0]) for s in _expected_examples(_cfg(files["jsonl"], "jsonl", "data.seq_len=4096"))]
    limit = sorted(lens)[len(lens) // 2]
    n_long = sum(n > limit for n in lens)
    drop = sft_batches(_cfg(files["jsonl"], "jsonl", "data.num_epochs=1", f"data.seq_len={limit}"), TOK)
    list(drop)
    assert drop.stats["overlong"] == n_long and drop.stats["truncated"] == 0
    trunc = sft_batches(_cfg(files["jsonl"], "jsonl", "data.num_epochs=1", f"data.seq_len={limit}",
                             "data.overlong=truncate"), TOK)
    segs = _segments(list(trunc))
    # a truncated example keeps its first seq_len tokens; it is dropped if no assistant token is left
    st = trunc.stats
    assert st["overlong"] == 0 and st["truncated"] > 0 and st["truncated"] + st["no_loss_tokens"] == n_long
    assert sum(len(s[0]) == limit for s in segs) >= st["truncated"]


def test_sources_mix_by_weight(files):
    cfg = C.apply_overrides(_cfg(files["jsonl"]), [
        f'data.sources=[{{"path": "{files["jsonl"]}", "weight": 3}}, '
        f'{{"path": "{files["parquet"]}", "format": "parquet", "weight": 1}}]'])
    ds = example_dataset(cfg, TOK)
    src = Counter(ds[i].where.endswith(".parquet") or ".parquet:" in ds[i].where for i in range(400))
    assert src[True] == 100 and src[False] == 300


def test_bench_packing_reports_ffd_and_baseline():
    from cascade_jax.data.bench import bench_packing

    out = bench_packing(400, buffer=128)
    assert set(out) == {"4096", "32768", "262144"}
    for r in out.values():
        assert 0 < r["greedy_in_order_efficiency"] <= r["ffd_efficiency"] <= 1


@pytest.mark.parametrize("thinking", [True, False])
def test_tiny_sft_rows_match_the_rollout_thinking_mode(thinking):
    """Tiny SFT turns have the shape RL prompts of the same mode open and the scorer grades."""
    cfg = C.apply_overrides(C.Config(), [f"rollout.sampling.thinking={str(thinking).lower()}", 'data.domains=["math"]',
                                         "data.seq_len=256", "data.batch_rows=1"])
    b = next(sft_batches(cfg, TOK))
    text = TOK.decode(b.tokens[0][b.segment_ids[0] == 1])
    gen = render_chat(TOK, [{"role": "user", "content": "x"}], thinking=thinking).text.split("assistant\n")[1]
    turn = text.split("<|im_start|>assistant\n")[1]
    assert turn.startswith(gen) and turn.startswith("<think>\nI know the answer.\n</think>\n" if thinking
                                                    else "<think></think>\\boxed{")
