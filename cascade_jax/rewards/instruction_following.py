"""``instruction_following``: IFEval/IFBench-style rule checks, strict and loose.

Metadata (IFEval layout): ``instruction_id_list`` (list of check ids, below) and ``kwargs`` (one
dict per id; ``None`` values are ignored, as in the released IFEval/IF-RL data); optional
``reward`` — ``"strict_all"`` (default: 1 iff every instruction passes strictly, IFEval's
prompt-level strict accuracy), ``"loose_all"``, ``"strict_fraction"``, ``"loose_fraction"``.

Loose checking (IFEval): an instruction passes loosely if it passes on any of 8 variants of the
answer — as is, without its first line, without its last line, without both — each with and
without ``*`` characters.

Text units: words are ``\\w+`` runs (apostrophes and hyphens join words); sentences end at
``.``, ``!`` or ``?`` followed by space or end; paragraphs are separated by ``***`` lines
(``number_paragraphs``) or blank lines (``paragraph_first_word``). Relations are ``"less than"``
(<) and ``"at least"`` (>=), as in IFEval.

Checks (id: kwargs): ``length_constraints:number_words`` (num_words, relation),
``length_constraints:number_sentences`` (num_sentences, relation),
``length_constraints:number_paragraphs`` (num_paragraphs),
``length_constraints:nth_paragraph_first_word`` (num_paragraphs, nth_paragraph, first_word),
``keywords:existence`` (keywords), ``keywords:frequency`` (keyword, frequency, relation),
``keywords:forbidden_words`` (forbidden_words), ``keywords:letter_frequency`` (letter,
let_frequency, let_relation), ``change_case:english_lowercase``, ``change_case:english_capital``,
``change_case:capital_word_frequency`` (capital_frequency, capital_relation),
``detectable_format:json_format``, ``detectable_format:number_bullet_lists`` (num_bullets),
``detectable_format:title``, ``detectable_format:multiple_sections`` (section_spliter,
num_sections), ``detectable_format:number_highlighted_sections`` (num_highlights),
``detectable_format:constrained_response``, ``detectable_content:postscript``
(postscript_marker), ``detectable_content:number_placeholders`` (num_placeholders),
``startend:start_checker`` (start_phrase), ``startend:end_checker`` (end_phrase),
``startend:quotation``, ``punctuation:no_comma``, ``combination:repeat_prompt``
(prompt_to_repeat), ``combination:two_responses``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from cascade_jax.rewards.base import NO_ANSWER, MetadataError, Score, final_answer, require

__all__ = ["CHECKS", "check_instruction", "loose_variants", "score_instruction_following"]

_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def _words(t: str) -> list[str]:
    return _WORD.findall(t)


def _sentences(t: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", t.strip()) if _words(s)]


def _compare(value: int, target: int, relation: str) -> bool:
    if relation == "less than":
        return value < target
    if relation == "at least":
        return value >= target
    raise MetadataError(f"relation must be 'less than' or 'at least', got {relation!r}")


def _count_phrase(t: str, phrase: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", t, flags=re.I))


def _json_ok(t: str) -> bool:
    body = t.strip()
    m = re.match(r"^```(?:json|JSON|Json)?\s*\n?(.*?)\n?```$", body, flags=re.S)
    if m:
        body = m.group(1)
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def _paragraphs_star(t: str) -> list[str]:
    parts = re.split(r"\s?\*\*\*\s?", t)
    return parts


def _num_paragraphs(t: str, num_paragraphs: int) -> bool:
    parts = _paragraphs_star(t)
    n = len(parts)
    for i, p in enumerate(parts):  # an empty paragraph is only allowed at the very ends
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _nth_paragraph_first_word(t: str, num_paragraphs: int, nth_paragraph: int,
                              first_word: str) -> bool:
    paras = [p for p in re.split(r"\n\s*\n", t) if p.strip()]
    if len(paras) != num_paragraphs or not (1 <= nth_paragraph <= len(paras)):
        return False
    w = _words(paras[nth_paragraph - 1])
    return bool(w) and w[0].lower() == first_word.lower()


def _bullets(t: str) -> int:
    return len(re.findall(r"^\s*[\*\-]\s+\S", t, flags=re.M))


def _sections(t: str, section_spliter: str, num_sections: int) -> bool:
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", t)
    return len(parts) - 1 >= num_sections


def _highlights(t: str) -> int:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", t) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", t) if h.strip("*").strip())
    return n


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _postscript(t: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker.lower() == "p.p.s":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker.lower() == "p.s.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pat, t.lower(), flags=re.M))


CHECKS: dict[str, Callable[..., bool]] = {
    "length_constraints:number_words":
        lambda t, num_words, relation: _compare(len(_words(t)), num_words, relation),
    "length_constraints:number_sentences":
        lambda t, num_sentences, relation: _compare(len(_sentences(t)), num_sentences, relation),
    "length_constraints:number_paragraphs": _num_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "keywords:existence":
        lambda t, keywords: all(_count_phrase(t, k) > 0 for k in keywords),
    "keywords:frequency":
        lambda t, keyword, frequency, relation: _compare(_count_phrase(t, keyword), frequency,
                                                         relation),
    "keywords:forbidden_words":
        lambda t, forbidden_words: not any(_count_phrase(t, w) for w in forbidden_words),
    "keywords:letter_frequency":
        lambda t, letter, let_frequency, let_relation: _compare(
            t.lower().count(letter.lower()), let_frequency, let_relation),
    "change_case:english_lowercase": lambda t: t == t.lower() and bool(re.search(r"[a-z]", t)),
    "change_case:english_capital": lambda t: t == t.upper() and bool(re.search(r"[A-Z]", t)),
    "change_case:capital_word_frequency":
        lambda t, capital_frequency, capital_relation: _compare(
            sum(1 for w in _words(t) if w.isupper()),
            capital_frequency, capital_relation),
    "detectable_format:json_format": _json_ok,
    "detectable_format:number_bullet_lists": lambda t, num_bullets: _bullets(t) == num_bullets,
    "detectable_format:title": lambda t: any(x.strip() for x in re.findall(r"<<([^\n]+?)>>", t)),
    "detectable_format:multiple_sections": _sections,
    "detectable_format:number_highlighted_sections":
        lambda t, num_highlights: _highlights(t) >= num_highlights,
    "detectable_format:constrained_response": lambda t: any(c in t for c in _CONSTRAINED),
    "detectable_content:postscript": _postscript,
    "detectable_content:number_placeholders":
        lambda t, num_placeholders: len(re.findall(r"\[[^\[\]\n]+\]", t)) >= num_placeholders,
    "startend:start_checker":
        lambda t, start_phrase: t.strip().lower().startswith(start_phrase.strip().lower()),
    "startend:end_checker":
        lambda t, end_phrase: t.strip().lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda t: len(t.strip()) > 1 and t.strip()[0] == '"' == t.strip()[-1],
    "punctuation:no_comma": lambda t: "," not in t,
    "combination:repeat_prompt":
        lambda t, prompt_to_repeat: t.strip().lower().startswith(prompt_to_repeat.strip().lower()),
    "combination:two_responses": lambda t: (
        len(p := [x.strip() for x in t.split("******")]) == 2 and all(p) and p[0] != p[1]),
}


def check_instruction(instruction_id: str, text: str, kwargs: Mapping[str, Any]) -> bool:
    """Run one check; raises :class:`MetadataError` for an unknown id or bad kwargs."""
    fn = CHECKS.get(instruction_id)
    if fn is None:
        raise MetadataError(f"unknown instruction id {instruction_id!r}; known: {sorted(CHECKS)}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return bool(fn(text, **kw))
    except TypeError as e:
        raise MetadataError(f"instruction {instruction_id!r}: bad kwargs {kw}: {e}") from e


def loose_variants(text: str) -> list[str]:
    """IFEval's 8 loose variants of a response."""
    lines = text.split("\n")
    base = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
            "\n".join(lines[1:-1]).strip()]
    return base + [b.replace("*", "") for b in base]


def score_instruction_following(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    ids = require(meta, "instruction_id_list", list)
    kwargs = meta.get("kwargs") or [{} for _ in ids]
    if len(kwargs) != len(ids):
        raise MetadataError(f"'kwargs' has {len(kwargs)} entries for {len(ids)} instructions")
    mode = meta.get("reward", "strict_all")
    if mode not in ("strict_all", "loose_all", "strict_fraction", "loose_fraction"):
        raise MetadataError(f"field 'reward': unknown mode {mode!r}")
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER, {"strict_fraction": 0.0, "loose_fraction": 0.0})
    variants = [v for v in loose_variants(final) if v.strip()]
    strict = [check_instruction(i, final, kw) for i, kw in zip(ids, kwargs)]
    loose = [s or any(check_instruction(i, v, kw) for v in variants)
             for s, i, kw in zip(strict, ids, kwargs)]
    n = max(len(ids), 1)
    metrics = {"strict_fraction": sum(strict) / n, "loose_fraction": sum(loose) / n,
               "prompt_strict": float(all(strict)), "prompt_loose": float(all(loose))}
    value = {"strict_all": metrics["prompt_strict"], "loose_all": metrics["prompt_loose"],
             "strict_fraction": metrics["strict_fraction"],
             "loose_fraction": metrics["loose_fraction"]}[mode]
    failed = [i for i, s in zip(ids, strict) if not s]
    reason = (f"all {len(ids)} instructions followed" if not failed else
              f"failed {len(failed)}/{len(ids)} (strict): {failed}")
    return Score(value, reason, metrics)
