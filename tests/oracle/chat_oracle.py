"""The chat-template oracle: transformers' ``apply_chat_template`` on a tokenizer directory.

Runs ONLY under the oracle interpreter (see ``tests/oracle_util.py``)::

    chat_oracle.py --tokenizer DIR --cases CASES.json --out OUT.json

``CASES.json``: a list of ``{"messages", "tools", "thinking", "add_generation_prompt"}`` and
optionally ``"chat_template"`` (a template text used instead of the tokenizer's). For each case
``OUT.json`` holds ``{"text", "ids", "assistant_mask"}`` from
``AutoTokenizer.from_pretrained(DIR).apply_chat_template`` (``enable_thinking=thinking``;
``assistant_mask`` from ``return_assistant_tokens_mask=True``, ``null`` for a template without
generation blocks), plus ``"decoded"``: the decode of the ids.
"""

from __future__ import annotations

import argparse
import json
import re


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.cases, encoding="utf-8") as f:
        cases = json.load(f)
    out = []
    for c in cases:
        kw = dict(tools=c.get("tools"), add_generation_prompt=c["add_generation_prompt"],
                  enable_thinking=c["thinking"], chat_template=c.get("chat_template"))
        masked = re.search(r"\{%-?\s*generation\s*-?%\}", c.get("chat_template") or tok.chat_template)
        text = tok.apply_chat_template(c["messages"], tokenize=False, **kw)
        enc = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=bool(masked), **kw)
        ids = list(enc["input_ids"])
        out.append({"text": text, "ids": ids,
                    "assistant_mask": list(enc["assistant_masks"]) if masked else None,
                    "decoded": tok.decode(ids)})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
