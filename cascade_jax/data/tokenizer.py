"""The tokenizer of a checkpoint: Hugging Face ``tokenizers`` plus the chat template and special tokens.

A checkpoint directory carries ``tokenizer.json`` (the ``tokenizers`` model) and
``tokenizer_config.json`` (special tokens, ``chat_template``; a ``chat_template.jinja`` file next to
it wins, as transformers 5 writes it). :func:`load_tokenizer` reads both without transformers;
:func:`save_tokenizer` writes them so a run directory ships model and tokenizer together::

    nh.save_checkpoint(params, model_cfg, out_dir)
    save_tokenizer(tokenizer, out_dir)              # next to config.json / *.safetensors
    tok = load_tokenizer(out_dir)

The tiny preset has no released tokenizer; :func:`tiny_tokenizer` builds one reproducibly: a
byte-level BPE trained with ``tokenizers`` on the tiny domains' text (``cascade_jax.data.tiny``),
plus the chat special tokens, with vocabulary :data:`TINY_VOCAB_SIZE` = the tiny model's 512
(256 byte symbols + 11 special tokens + 245 merges). Byte-level means every Unicode string
round-trips exactly (``decode(encode(s)) == s``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tokenizers

from cascade_jax.data.tiny import tiny_examples
from cascade_jax.domains import DOMAINS

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "save_tokenizer", "tiny_tokenizer",
           "build_tiny_tokenizer", "tiny_chat_template", "tokenizer_for", "write_tiny_tokenizer",
           "TINY_VOCAB_SIZE", "TINY_SPECIAL_TOKENS",
           "TINY_CONTROL_TOKENS"]

TINY_VOCAB_SIZE = 512
#: special tokens of the tiny tokenizer (ids 0..4 in this order); never produced from plain text
TINY_SPECIAL_TOKENS = ("<|pad|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
#: structural tokens of the chat format (ids 5..10): single tokens, but decoded as text
TINY_CONTROL_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                       "</tool_response>")


class TokenizerError(ValueError):
    """A tokenizer directory or file is missing or malformed (the message names it)."""


def _token_text(v) -> Optional[str]:
    """tokenizer_config stores a special token as a string or as ``{"content": ...}``."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise TokenizerError(f"special token entry {v!r}: expected a string or {{'content': str}}")


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the checkpoint's chat template and special tokens.

    ``special_tokens`` maps the template-visible names (``bos_token``, ``eos_token``,
    ``pad_token``, ``unk_token``, ...) to token strings, as transformers passes them to the
    template; ``ids`` maps token strings of interest (special and control tokens present in the
    vocabulary, e.g. ``<|im_start|>``, ``<think>``) to ids.
    """

    backend: tokenizers.Tokenizer
    chat_template: str
    special_tokens: dict
    ids: dict
    extra_config: dict = dataclasses.field(default_factory=dict)

    # ---- ids
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, name: str) -> Optional[int]:
        tok = self.special_tokens.get(name)
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def eos_id(self) -> int:
        return self._id("eos_token")

    @property
    def pad_id(self) -> int:
        """The pad token's id, else the eos id, else 0."""
        for name in ("pad_token", "eos_token"):
            i = self._id(name)
            if i is not None:
                return i
        return 0

    def token_id(self, token: str) -> int:
        """Id of a single token string (e.g. ``"<think>"``); error if it is not in the vocabulary."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    # ---- text <-> ids
    def encode(self, text: str) -> np.ndarray:
        """``[L]`` int32 ids of ``text`` without added BOS/EOS (as ``apply_chat_template`` does)."""
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_with_offsets(self, text: str):
        """``(ids [L] int32, offsets [L, 2] int64)``: character span of every token."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return (np.asarray(enc.ids, dtype=np.int32),
                np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32)
                for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _select_template(tc) -> Optional[str]:
    if tc is None or isinstance(tc, str):
        return tc
    if isinstance(tc, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tc if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise TokenizerError(f"chat_template: expected a string or a list with a 'default' entry")


_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def load_tokenizer(path) -> Tokenizer:
    """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) from a
    checkpoint directory. Missing files or a template-less config raise :class:`TokenizerError`."""
    d = Path(path)
    tj, tc = d / "tokenizer.json", d / "tokenizer_config.json"
    if not tj.is_file():
        raise TokenizerError(f"{tj}: no tokenizer.json in checkpoint directory {d}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tj))
    except Exception as e:  # the Rust error names the bad field
        raise TokenizerError(f"{tj}: cannot load ({e})") from None
    config = _read_json(tc) if tc.is_file() else {}
    template = _select_template(config.get("chat_template"))
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if not template:
        raise TokenizerError(f"{d}: no chat template (neither 'chat_template' in "
                             f"tokenizer_config.json nor chat_template.jinja)")
    special = {k: _token_text(config.get(k)) for k in _SPECIAL_NAMES if config.get(k) is not None}
    for k, tok in special.items():
        if backend.token_to_id(tok) is None:
            raise TokenizerError(f"{tc}: {k} {tok!r} is not in the vocabulary of {tj}")
    ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    extra = {k: v for k, v in config.items()
             if k in ("model_max_length", "add_bos_token", "add_eos_token")}
    return Tokenizer(backend=backend, chat_template=template, special_tokens=special, ids=ids,
                     extra_config=extra)


def save_tokenizer(tokenizer: Tokenizer, path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template`` and the
    special tokens) into ``path`` (created if needed); transformers' ``AutoTokenizer`` and
    :func:`load_tokenizer` both read the result. Call it after ``save_checkpoint`` (which
    replaces the whole directory)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(d / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                      "normalized": t.normalized, "single_word": t.single_word,
                      "special": t.special}
             for i, t in sorted(tokenizer.backend.get_added_tokens_decoder().items())}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        **tokenizer.special_tokens,
        "clean_up_tokenization_spaces": False,
        "model_max_length": tokenizer.extra_config.get("model_max_length", 1 << 20),
        "chat_template": tokenizer.chat_template,
    }
    tmp = d / "tokenizer_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, d / "tokenizer_config.json")


# ------------------------------------------------------------------------------------------
# The tiny tokenizer


def tiny_chat_template() -> str:
    """Text of the tiny preset's chat template (``templates/tiny_chat.jinja``, package data)."""
    return (importlib.resources.files("cascade_jax.data") / "templates" / "tiny_chat.jinja"
            ).read_text(encoding="utf-8")


def _tiny_corpus(n_per_domain: int = 64) -> list[str]:
    texts = []
    for dom in DOMAINS:
        for ex in tiny_examples(dom, n=n_per_domain, seed=0):
            texts += [ex.prompt, ex.reference]
    # words of the chat format and tool declarations, so the template's own text is cheap
    texts += ["system", "user", "assistant", "# Tools", "You have access to the following functions:",
              "<tools>", "</tools>", "<function>", "</function>", "<name>", "</name>", "<parameters>",
              "</parameters>", "<parameter>", "</parameter>", "<description>", "</description>",
              "<type>", "</type>", "<required>", "</required>", "<function=", "<parameter=",
              "integer", "number", "string", "object", "Add two integers.", "first addend",
              "second addend", "To call a function, reply with:", "VALUE", "NAME", "ARG",
              "Reason before the call; write nothing after it.", "I know the answer."]
    return texts


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Train the tiny byte-level BPE (deterministic: same library version, same result)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    n_fixed = len(TINY_SPECIAL_TOKENS) + len(TINY_CONTROL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TINY_CONTROL_TOKENS), min_frequency=2, show_progress=False,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # control tokens: single ids, matched before BPE, kept when decoding
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t in TINY_CONTROL_TOKENS])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise TokenizerError(f"tiny tokenizer has {size} tokens > vocab_size {vocab_size}")
    assert [tok.token_to_id(t) for t in TINY_SPECIAL_TOKENS] == list(range(len(TINY_SPECIAL_TOKENS)))
    assert n_fixed <= size
    return tok


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """The tiny preset's :class:`Tokenizer` (BPE + tiny chat template); cached per process."""
    backend = build_tiny_tokenizer(vocab_size)
    special = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    ids = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    return Tokenizer(backend=backend, chat_template=tiny_chat_template(), special_tokens=special,
                     ids=ids, extra_config={"model_max_length": 4096})


def tokenizer_for(config) -> Tokenizer:
    """The run's tokenizer: ``data.tokenizer`` if set, else ``model.checkpoint``'s, else (no
    checkpoint) the tiny tokenizer for the ``tiny`` preset; otherwise an error."""
    path = config.data.tokenizer or config.model.checkpoint
    if path:
        return load_tokenizer(path)
    if config.model.preset == "tiny":
        return tiny_tokenizer()
    raise TokenizerError(f"no tokenizer for preset {config.model.preset!r}: set data.tokenizer or "
                         f"model.checkpoint to a directory with tokenizer.json")


def write_tiny_tokenizer(path) -> Tokenizer:
    """Write the tiny tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with its chat
    template) into ``path``, e.g. a tiny checkpoint directory after ``save_checkpoint``."""
    tok = tiny_tokenizer()
    save_tokenizer(tok, path)
    return tok
