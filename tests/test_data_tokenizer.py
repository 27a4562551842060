"""Tokenizer: reproducible tiny BPE within the tiny vocabulary, exact round trips, checkpoint I/O."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cascade_jax import config as C
from cascade_jax.data import (TINY_VOCAB_SIZE, TokenizerError, load_tokenizer, save_tokenizer,
                              tiny_tokenizer, tokenizer_for, write_tiny_tokenizer)
from cascade_jax.data.tokenizer import TINY_CONTROL_TOKENS, TINY_SPECIAL_TOKENS, build_tiny_tokenizer
from cascade_jax.domains import DOMAINS
from cascade_jax.data.tiny import tiny_examples
from models.nemotron_h import preset

TOK = tiny_tokenizer()

UNICODE = ["", " ", "  leading and trailing  ", "tab\there\nnewline\r\n", "naïve café — “quotes”",
           "日本語のテキスト", "한국어", "emoji 🙂👍🏽 family 👨‍👩‍👧", "combining e\u0301 vs é",
           "zero\u200bwidth", "nul\x00byte", "RTL عربى", "math ∑∫√ ≤ ≥", "\U0010FFFF edge",
           "<|im_start|>user\nhi<|im_end|>", "<think>\nx\n</think>", "literal <|pad|> text"]


def test_tiny_vocab_fits_the_tiny_model_and_special_ids():
    assert TOK.vocab_size == TINY_VOCAB_SIZE <= preset("tiny").vocab_size
    for i, t in enumerate(TINY_SPECIAL_TOKENS + TINY_CONTROL_TOKENS):
        assert TOK.token_id(t) < TINY_VOCAB_SIZE
        assert TOK.encode(t).tolist() == [TOK.token_id(t)]  # one token each
    assert TOK.pad_id == 0 and TOK.eos_id == TOK.token_id("<|im_end|>")
    assert TOK.token_id("<|im_start|>") == 3
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        TOK.token_id("<nope>")


def test_tiny_build_is_reproducible_across_processes():
    code = ("from cascade_jax.data.tokenizer import build_tiny_tokenizer;"
            "import sys; sys.stdout.write(build_tiny_tokenizer().to_str())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           check=True).stdout
    assert json.loads(other) == json.loads(build_tiny_tokenizer().to_str())


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_tiny_domain_text(domain):
    for ex in tiny_examples(domain, n=16, seed=3):
        for s in (ex.prompt, ex.reference):
            ids = TOK.encode(s)
            assert ids.dtype == np.int32 and ids.max() < TINY_VOCAB_SIZE
            assert TOK.decode(ids) == s
    # BPE compresses the tiny text (well below one token per byte)
    text = " ".join(e.prompt for e in tiny_examples(domain, n=16, seed=3))
    assert len(TOK.encode(text)) < 0.7 * len(text.encode())


@pytest.mark.parametrize("s", UNICODE)
def test_round_trip_unicode(s):
    assert TOK.decode(TOK.encode(s)) == s


def test_save_load_round_trip(tmp_path):
    save_tokenizer(TOK, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == TOK.chat_template and cfg["eos_token"] == "<|im_end|>"
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens == TOK.special_tokens and tok.chat_template == TOK.chat_template
    assert tok.ids == TOK.ids and (tok.pad_id, tok.eos_id) == (TOK.pad_id, TOK.eos_id)
    for s in UNICODE:
        assert tok.encode(s).tolist() == TOK.encode(s).tolist()
    # chat_template.jinja next to the config wins (transformers 5 layout)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0].content }}"


def test_tokenizer_for_config(tmp_path):
    assert tokenizer_for(C.Config()) is TOK  # tiny preset, no checkpoint
    save_tokenizer(TOK, tmp_path)
    cfg = C.apply_overrides(C.Config(), [f"data.tokenizer={tmp_path}"])
    assert tokenizer_for(cfg).chat_template == TOK.chat_template
    with pytest.raises(TokenizerError, match="set data.tokenizer"):
        tokenizer_for(C.apply_overrides(C.Config(), ["model.preset=nano-30b-a3b",
                                                     'data.sources=[{"path": "d", "format": "jsonl"}]']))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    save_tokenizer(TOK, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x", "eos_token": "<eos>"}))
    with pytest.raises(TokenizerError, match="eos_token '<eos>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load"):
        load_tokenizer(tmp_path)


def test_checkpoint_directory_ships_model_and_tokenizer(tmp_path):
    import jax
    from models import nemotron_h as nh

    cfg = preset("tiny")
    shapes = jax.eval_shape(lambda k: nh.init_params(cfg, k), jax.random.key(0))
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)  # values do not matter here
    nh.save_checkpoint(params, cfg, tmp_path / "ckpt")
    write_tiny_tokenizer(tmp_path / "ckpt")
    cfg2, _ = nh.load_checkpoint(tmp_path / "ckpt")
    tok = load_tokenizer(tmp_path / "ckpt")
    assert cfg2.vocab_size == cfg.vocab_size and tok.vocab_size <= cfg2.vocab_size
    assert tok.encode("What is 2 + 3?").tolist() == TOK.encode("What is 2 + 3?").tolist()
    run = C.apply_overrides(C.Config(), [f"model.checkpoint={tmp_path / 'ckpt'}"])
    assert tokenizer_for(run).chat_template == TOK.chat_template
