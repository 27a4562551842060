"""``mcq``: STEM multiple-choice answer-letter extraction.

Metadata: ``answer`` (the gold letter, e.g. ``"C"``); optional ``choices`` (list of option texts,
which fixes the valid letters A, B, … ) or ``letters`` (a string such as ``"ABCD"``); default
letters A–J.

Extraction from the final answer (after ``</think>``; an unclosed ``<think>`` scores 0):
* anchored forms, all of them: ``\\boxed{X}``, ``Answer: X``, ``answer is (X)``, ``**Final answer:** X``,
  ``correct option/choice is X`` (letter optionally in ``()``, ``[]``, ``**``, followed by ``)``/``.``);
  letters chained with ``,``/``or``/``and``/``/``/``&`` are all collected;
* otherwise a bare letter, alone on the (last non-empty) line: ``B``, ``(B)``, ``B.``, ``**B**``.

Several distinct letters (``A or B``, ``\\boxed{A, C}``, two anchors naming different letters) score
0 with reason; reward is 1 iff exactly one letter is found and it equals the gold letter.
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping

from cascade_jax.rewards.base import NO_ANSWER, Score, final_answer, require
from cascade_jax.rewards.math import boxed_contents

__all__ = ["score_mcq", "extract_letters"]

_ANCHOR = re.compile(
    r"(?:final\s+answer|correct\s+(?:answer|option|choice)|answer|option|choice)"
    r"\s*(?:is|:|=|would\s+be|should\s+be)?\s*:?\s*(?:\*\*)?\s*", re.I)
_HEAD = re.compile(r"^[\s\*\(\[\{$]*(?:\\text\{)?([A-Z])(?![A-Za-z0-9])[\)\]\}\.\*:]*")
_CHAIN = re.compile(r"^\s*(?:,|/|&|\bor\b|\band\b)\s*[\*\(\[]*([A-Z])(?![A-Za-z0-9])[\)\]\.\*]*")
_BOX_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![a-z])")
_BARE = re.compile(r"^[\s\*\(\[]*([A-Z])[\)\]\.\*]*\s*$")


def _letters_at(span: str) -> list[str]:
    m = _HEAD.match(span)
    if not m:
        return []
    out, rest = [m.group(1)], span[m.end():]
    while True:
        c = _CHAIN.match(rest)
        if not c:
            return out
        out.append(c.group(1))
        rest = rest[c.end():]


def extract_letters(text: str, valid: str) -> list[str]:
    """All distinct answer letters (in ``valid``) the text commits to, in order of appearance."""
    found: list[str] = []
    for box in boxed_contents(text):
        found += _BOX_LETTER.findall(box.replace("\\text", ""))
    for m in _ANCHOR.finditer(text):
        found += _letters_at(text[m.end():m.end() + 60])
    found = [c for c in found if c in valid]
    if not found:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        if lines:
            b = _BARE.match(lines[-1])
            if b and b.group(1) in valid:
                found = [b.group(1)]
    return list(dict.fromkeys(found))


def score_mcq(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    gold = str(require(meta, "answer", str)).strip().upper()
    if "letters" in meta:
        valid = str(meta["letters"]).upper()
    elif "choices" in meta:
        valid = string.ascii_uppercase[:len(meta["choices"])]
    else:
        valid = "ABCDEFGHIJ"
    if gold not in valid or len(gold) != 1:
        raise ValueError(f"gold answer {gold!r} is not one of the valid letters {valid!r}")
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER)
    letters = extract_letters(final, valid)
    if not letters:
        return Score(0.0, "no answer letter found")
    if len(letters) > 1:
        return Score(0.0, f"several answer letters given: {letters}")
    if letters[0] == gold:
        return Score(1.0, f"answer {letters[0]} is correct")
    return Score(0.0, f"answer {letters[0]} is wrong (gold {gold})")
