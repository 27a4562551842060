"""Data: the one home of turning rows into token batches.

Tokenizer and chat template (``load_tokenizer``, ``render_chat``); see the module docs of
:mod:`cascade_jax.data.tokenizer` and :mod:`cascade_jax.data.chat`.
"""

from cascade_jax.data.chat import ChatRender, ChatTemplateError, assistant_mask, render_chat, render_text
from cascade_jax.data.tokenizer import (TINY_VOCAB_SIZE, Tokenizer, TokenizerError, load_tokenizer,
                                        save_tokenizer, tiny_chat_template, tiny_tokenizer)

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "save_tokenizer", "tiny_tokenizer",
           "tiny_chat_template", "TINY_VOCAB_SIZE", "render_chat", "render_text", "ChatRender",
           "ChatTemplateError", "assistant_mask"]
