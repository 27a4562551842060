"""Data: the one home of turning rows into token batches.

The seam for the stage runner (everything below is numpy / Python; no jax arrays are made here)::

    from cascade_jax import data

    tok = data.tokenizer_for(cfg)                  # data.tokenizer / model.checkpoint / tiny
    text, ids, loss_mask = data.render_chat(tok, messages, tools=None, thinking=True,
                                            add_generation_prompt=True)

    # SFT: packed rows [data.batch_rows // P, data.seq_len]
    it = data.sft_batches(cfg, tok, process_index=p, process_count=P)
    batch = next(it)                               # cascade_jax.rl.SFTBatch (numpy fields)
    it.stats, it.efficiency                        # counters: bad_row, overlong, truncated, ...

    # RL: prompts per step, with domain ids and verifier metadata
    it = data.prompt_batches(cfg, tok, process_index=p, process_count=P)
    pb = next(it)                                  # PromptBatch: tokens [P, L], lengths, domains,
    tokens, lengths, group_ids, domain_ids = pb.expand()   # prompts, metadata, n_samples

    state = it.get_state()                         # JSON-able dict of ints (orbax: args.JsonSave)
    it.set_state(state)                            # a fresh iterator, same config: same next batch

    data.save_tokenizer(tok, run_dir)              # after nh.save_checkpoint(...) (tiny:
                                                   # data.write_tiny_tokenizer(run_dir));
    tok = data.load_tokenizer(run_dir)             # tokenizer.json + tokenizer_config.json

Modules: :mod:`~cascade_jax.data.tokenizer` (``tokenizers``-backed tokenizer, the reproducible tiny
BPE), :mod:`~cascade_jax.data.chat` (the Jinja chat template as transformers renders it, assistant
loss masks), :mod:`~cascade_jax.data.rows` (field mapping, row validation, the released data's
row formats), :mod:`~cascade_jax.data.sources` (JSONL / Parquet / ArrayRecord / TFDS / tiny
random-access sources), :mod:`~cascade_jax.data.packing` (first-fit-decreasing look-ahead
packer), :mod:`~cascade_jax.data.sft`, :mod:`~cascade_jax.data.prompts`,
:mod:`~cascade_jax.data.convert` (rows to JSONL / Parquet / ArrayRecord), ``python -m
cascade_jax.data.bench`` (packing efficiency, pipeline tokens/s). Domain names <-> ids:
:mod:`cascade_jax.domains`.
"""

from cascade_jax.data.chat import (ChatRender, ChatTemplateError, assistant_mask, render_chat,
                                   render_text)
from cascade_jax.data.prompts import PromptBatch, PromptIterator, prompt_batches
from cascade_jax.data.rows import BadRow, DataError, map_row, normalize_messages
from cascade_jax.data.sft import SFTIterator, sft_batches
from cascade_jax.data.tokenizer import (TINY_VOCAB_SIZE, Tokenizer, TokenizerError, load_tokenizer,
                                        save_tokenizer, tiny_chat_template, tiny_tokenizer,
                                        tokenizer_for, write_tiny_tokenizer)

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "save_tokenizer", "tiny_tokenizer",
           "tiny_chat_template", "tokenizer_for", "write_tiny_tokenizer", "TINY_VOCAB_SIZE", "render_chat", "render_text",
           "ChatRender", "ChatTemplateError", "assistant_mask", "sft_batches", "SFTIterator",
           "prompt_batches", "PromptIterator", "PromptBatch", "DataError", "BadRow", "map_row",
           "normalize_messages"]
