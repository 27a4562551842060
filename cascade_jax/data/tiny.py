"""Tiny learnable environments, one per canonical domain, for the tiny preset.

Each generator makes short prompts with metadata for the domain's real scorer, plus a reference
response that earns reward 1, so a small model trained from scratch can move every stage's
reward. All are scored by the production scorers of :func:`cascade_jax.rewards.make_scorer`
(judged domains with their rule-based synthetic judges; the code domain really executes in the
sandbox): the generators live with the data, their scorers with the rewards.

============================  ===================================================================
domain                        task
============================  ===================================================================
math                          add two digits in 0..4, answer in ``\\boxed{}``
instruction_following         name a given word obeying case / keyword / length constraints
mcq                           which letter follows X (one of A..H) in the alphabet; the options are
                              the letters after A..D (or after E..H when X is one of them), in order
structured_output             a JSON object ``{"n": k}``, k in 0..9 (closed schema)
tool_call                     call ``square(n)``, n in 0..9, in the template's tool-call format
code                          a Python expression evaluating to a target in 0..20 (sandboxed)
rlhf                          short reply mentioning a topic word (synthetic pairwise judge;
                              eval: win rate against the fixed baseline answer "A <word> is nice.",
                              which the reference ties)
long_context                  needle in a haystack: find the one-digit code on one of three lines,
                              the others filler words (QA judge)
swe                           a unified diff fixing a one-line operator bug in one of four
                              functions of (a, b) or (b, a) (patch judge: changed-line F1)
============================  ===================================================================

The tasks are shaped for what the tiny model (hidden size 128 in the tiny stage configs, two
attention layers) learns in a few hundred SFT steps: copying a token from near the end of the
prompt, finding the one line of its kind (the needle), and small fixed maps (letter order, sums of
two digits). It does not learn to match a key against the prompt within that budget: a key/value
lookup ("what is the value of river?") and multiple choice over shuffled options both stayed at
chance after 200 SFT steps given to those domains alone, and a two-argument tool call at 0.03.
The prompt words that matter stand last and the ranges are small.

Near misses. SFT data distilled from a teacher follows the content but not always the verifier's
format, and RL against the verifier removes such slips. The tiny domains that RL stages train on
model this: for instruction following, MCQ, tool calling, structured output, long context and code
each example has a ``near_miss``, the right content with a format slip that scores 0:
``Piano`` for capitals only, ``I like ...`` for lowercase only, ``done.`` for "end with done",
``Answer: B or C``, a wrongly named tool parameter, ``{"n": "3"}`` for an integer field, the
needle's code as a word, a ``print`` statement for an expression. A share ``near_miss_rate``
(default :data:`NEAR_MISS_RATE`; ``data.tiny_near_miss_rate`` in a run config) of the SFT rows
answer with it, so the tiny SFT stage leaves partial scores that its RL stages can raise.

    examples = tiny_examples("code", n=64, seed=0)
    scores = make_scorer("code")([e.prompt for e in examples], responses,
                                 [e.metadata for e in examples])
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

from cascade_jax import domains as d
from cascade_jax.contract.formats import format_tool_call

__all__ = ["TinyExample", "tiny_examples", "GENERATORS"]


#: the default share of SFT rows whose response is the example's near miss (domains that have
#: one; the run config's ``data.tiny_near_miss_rate``)
NEAR_MISS_RATE = 0.3


@dataclasses.dataclass(frozen=True)
class TinyExample:
    domain: str
    prompt: str
    metadata: dict
    reference: str  # a response that scores 1
    near_miss: str = ""  # the right content with a format slip, scoring 0 ("" if none)
    sft_response: str = ""  # the SFT row's response: the near miss in NEAR_MISS_RATE of rows


_WORDS = ["apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "garden"]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _math(r: random.Random) -> TinyExample:
    a, b = r.randint(0, 4), r.randint(0, 4)
    return TinyExample(d.MATH, f"What is {a} + {b}? Put the final answer in \\boxed{{}}.",
                       {"answer": str(a + b)}, f"\\boxed{{{a + b}}}")


def _if(r: random.Random) -> TinyExample:
    w = r.choice(_WORDS)
    kind = r.randrange(3)
    if kind == 0:
        return TinyExample(d.INSTRUCTION_FOLLOWING, f"In capital letters only, write the word {w}.",
                           {"instruction_id_list": ["change_case:english_capital",
                                                    "keywords:existence"],
                            "kwargs": [{}, {"keywords": [w]}]}, w.upper(), w.capitalize())
    if kind == 1:
        return TinyExample(d.INSTRUCTION_FOLLOWING,
                           f"In fewer than 5 words, all lowercase, use the word {w}.",
                           {"instruction_id_list": ["keywords:existence",
                                                    "length_constraints:number_words",
                                                    "change_case:english_lowercase"],
                            "kwargs": [{"keywords": [w]}, {"num_words": 5, "relation": "less than"},
                                       {}]}, f"i like {w}", f"I like {w}")
    return TinyExample(d.INSTRUCTION_FOLLOWING,
                       f"End your reply with the word done, after saying {w}.",
                       {"instruction_id_list": ["keywords:existence", "startend:end_checker"],
                        "kwargs": [{"keywords": [w]}, {"end_phrase": "done"}]}, f"{w} done",
                       f"{w} done.")


def _mcq(r: random.Random) -> TinyExample:
    i = r.randrange(8)
    x, right = chr(65 + i), chr(66 + i)
    block = 4 * (i // 4)  # the options: the letters after A..D, or after E..H, in order
    options = [chr(66 + block + k) for k in range(4)]
    letters = "ABCD"
    gold = letters[options.index(right)]
    body = "\n".join(f"{letters[k]}) {o}" for k, o in enumerate(options))
    return TinyExample(d.MCQ, f"Which letter comes right after {x} in the alphabet?\n{body}\n"
                              f"Reply with 'Answer: <letter>'.",
                       {"answer": gold, "letters": letters}, f"Answer: {gold}",
                       f"Answer: {gold} or {letters[(letters.index(gold) + 1) % 4]}")


def _structured(r: random.Random) -> TinyExample:
    k = r.randint(0, 9)
    schema = {"type": "object", "properties": {"n": {"const": k}}, "required": ["n"]}
    return TinyExample(d.STRUCTURED_OUTPUT,
                       f'Return only a JSON object with the integer field "n" equal to {k}.',
                       {"schema": schema}, f'{{"n": {k}}}', f'{{"n": "{k}"}}')


def _tool(r: random.Random) -> TinyExample:
    n = r.randint(0, 9)
    args = {"n": n}
    return TinyExample(d.TOOL_CALL, f"Use the square tool on {n}.",
                       {"expected_calls": [{"name": "square", "arguments": args}]},
                       format_tool_call("square", args), format_tool_call("square", {"x": n}))


def _code(r: random.Random) -> TinyExample:
    t = r.randint(0, 20)
    return TinyExample(d.CODE, f"Write a Python expression that evaluates to {t}.",
                       {"tests": [{"input": "", "output": str(t)}], "expression": True,
                        "limits": {"wall_s": 5.0, "cpu_s": 2}},
                       f"```python\n{t}\n```", f"```python\nprint({t})\n```")


def _rlhf(r: random.Random) -> TinyExample:
    w = r.choice(_WORDS)
    return TinyExample(d.RLHF, f"Say something nice about a {w}.",
                       {"judge_fields": {"keyword": w}, "baseline": f"A {w} is nice."},
                       f"A {w} is lovely.")


def _long_context(r: random.Random) -> TinyExample:
    code = r.randint(1, 9)
    lines = [" ".join(r.choices(_WORDS, k=3)) for _ in range(2)]
    lines.insert(r.randrange(3), f"the code is {code}")
    q = "What is the code?"
    return TinyExample(d.LONG_CONTEXT, "\n".join(lines) + f"\n\n{q}",
                       {"answer": str(code), "question": q}, str(code), _NUMBER_WORDS[code])


_OPS = [("add", "+", "-"), ("sub", "-", "+"), ("mul", "*", "+"), ("div", "/", "*")]


def _swe(r: random.Random) -> TinyExample:
    name, good, bad = r.choice(_OPS)
    x, y = r.sample(["a", "b"], 2)
    bad_line, good_line = f"    return {x} {bad} {y}", f"    return {x} {good} {y}"
    gold = (f"--- a/ops.py\n+++ b/ops.py\n@@ -1,2 +1,2 @@\n def {name}({x}, {y}):\n"
            f"-{bad_line}\n+{good_line}\n")
    prompt = (f"ops.py:\n```python\ndef {name}({x}, {y}):\n{bad_line}\n```\n"
              f"Issue: {name} returns the wrong result. Reply with a unified diff in a "
              f"```diff block that fixes it.")
    return TinyExample(d.SWE, prompt, {"gold_patch": gold, "issue": f"{name} is wrong"},
                       f"```diff\n{gold}```")


GENERATORS: dict[str, Callable[[random.Random], TinyExample]] = {
    d.MATH: _math, d.INSTRUCTION_FOLLOWING: _if, d.MCQ: _mcq, d.STRUCTURED_OUTPUT: _structured,
    d.TOOL_CALL: _tool, d.CODE: _code, d.RLHF: _rlhf, d.LONG_CONTEXT: _long_context, d.SWE: _swe,
}
assert set(GENERATORS) == set(d.DOMAINS)


def tiny_examples(domain: str, n: int, seed: int = 0,
                  near_miss_rate: float = NEAR_MISS_RATE) -> list[TinyExample]:
    """``n`` deterministic examples of ``domain`` (same seed, same examples), each with its
    ``sft_response`` drawn: the near miss with probability ``near_miss_rate``, else the
    reference (at rate 0 nothing is drawn, so the examples are those of the plain generator)."""
    d.check_domain(domain)
    r = random.Random(f"{domain}:{seed}")
    out = []
    for _ in range(n):
        ex = GENERATORS[domain](r)
        slip = bool(ex.near_miss) and near_miss_rate > 0 and r.random() < near_miss_rate
        out.append(dataclasses.replace(ex, sft_response=ex.near_miss if slip else ex.reference))
    return out
