"""Tiny learnable environments, one per canonical domain, for the tiny preset.

Each generator makes short prompts with metadata for the domain's real scorer, plus a reference
response that earns reward 1, so a small model trained from scratch can move every stage's
reward. All use the production scorers from :func:`cascade_jax.rewards.make_scorer` (judged
domains with their rule-based synthetic judges); the code domain really executes in the sandbox.

============================  ===================================================================
domain                        task
============================  ===================================================================
math                          add two digits in 0..4, answer in ``\\boxed{}``
instruction_following         name a given word obeying case / keyword / length constraints
mcq                           which letter follows X (one of A..H) in the alphabet (4 options)
structured_output             a JSON object ``{"n": k}``, k in 0..9 (closed schema)
tool_call                     call ``add(a, b)``, a and b in 0..4, in the template's tool-call format
code                          a Python expression evaluating to a target in 0..20 (sandboxed)
rlhf                          short reply mentioning a topic word (synthetic pairwise judge;
                              eval: win rate against the fixed baseline answer "A <word> is nice.",
                              which the reference ties)
long_context                  look up a key's one-digit value in 3 key/value lines (QA judge)
swe                           a unified diff fixing a one-line operator bug in one of four
                              functions of (a, b) or (b, a) (patch judge: changed-line F1)
============================  ===================================================================

The ranges are small on purpose: the tiny preset (hidden size 64, two attention layers) learns
to copy and look up from the prompt within a few hundred SFT steps at these sizes, so its sampled
scores after the tiny SFT stage are partial and every RL stage has reward variance to work with.

    examples = tiny_examples("code", n=64, seed=0)
    scores = make_scorer("code")([e.prompt for e in examples], responses,
                                 [e.metadata for e in examples])
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

from cascade_jax import domains as d
from cascade_jax.rewards.tool_call import format_tool_call

__all__ = ["TinyExample", "tiny_examples", "GENERATORS"]


@dataclasses.dataclass(frozen=True)
class TinyExample:
    domain: str
    prompt: str
    metadata: dict
    reference: str  # a response that scores 1


_WORDS = ["apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "garden"]


def _math(r: random.Random) -> TinyExample:
    a, b = r.randint(0, 4), r.randint(0, 4)
    return TinyExample(d.MATH, f"What is {a} + {b}? Put the final answer in \\boxed{{}}.",
                       {"answer": str(a + b)}, f"\\boxed{{{a + b}}}")


def _if(r: random.Random) -> TinyExample:
    w = r.choice(_WORDS)
    kind = r.randrange(3)
    if kind == 0:
        return TinyExample(d.INSTRUCTION_FOLLOWING, f"Write the word {w} in capital letters only.",
                           {"instruction_id_list": ["change_case:english_capital",
                                                    "keywords:existence"],
                            "kwargs": [{}, {"keywords": [w]}]}, w.upper())
    if kind == 1:
        return TinyExample(d.INSTRUCTION_FOLLOWING,
                           f"Use the word {w} in fewer than 5 words, all lowercase.",
                           {"instruction_id_list": ["keywords:existence",
                                                    "length_constraints:number_words",
                                                    "change_case:english_lowercase"],
                            "kwargs": [{"keywords": [w]}, {"num_words": 5, "relation": "less than"},
                                       {}]}, f"i like {w}")
    return TinyExample(d.INSTRUCTION_FOLLOWING, f"Say {w} and end your reply with the word done.",
                       {"instruction_id_list": ["keywords:existence", "startend:end_checker"],
                        "kwargs": [{"keywords": [w]}, {"end_phrase": "done"}]}, f"{w} done")


def _mcq(r: random.Random) -> TinyExample:
    i = r.randrange(8)
    x, right = chr(65 + i), chr(66 + i)
    wrong = r.sample([chr(65 + k) for k in range(10) if chr(65 + k) != right], 3)
    options = wrong + [right]
    r.shuffle(options)
    letters = "ABCD"
    gold = letters[options.index(right)]
    body = "\n".join(f"{letters[k]}) {o}" for k, o in enumerate(options))
    return TinyExample(d.MCQ, f"Which letter comes right after {x} in the alphabet?\n{body}\n"
                              f"Reply with 'Answer: <letter>'.",
                       {"answer": gold, "letters": letters}, f"Answer: {gold}")


def _structured(r: random.Random) -> TinyExample:
    k = r.randint(0, 9)
    schema = {"type": "object", "properties": {"n": {"const": k}}, "required": ["n"]}
    return TinyExample(d.STRUCTURED_OUTPUT,
                       f'Return only a JSON object with the integer field "n" equal to {k}.',
                       {"schema": schema}, f'{{"n": {k}}}')


def _tool(r: random.Random) -> TinyExample:
    a, b = r.randint(0, 4), r.randint(0, 4)
    args = {"a": a, "b": b}
    return TinyExample(d.TOOL_CALL, f"Use the add tool to add {a} and {b}.",
                       {"expected_calls": [{"name": "add", "arguments": args}]},
                       format_tool_call("add", args))


def _code(r: random.Random) -> TinyExample:
    t = r.randint(0, 20)
    return TinyExample(d.CODE, f"Write a Python expression that evaluates to {t}.",
                       {"tests": [{"input": "", "output": str(t)}], "expression": True,
                        "limits": {"wall_s": 5.0, "cpu_s": 2}},
                       f"```python\n{t}\n```")


def _rlhf(r: random.Random) -> TinyExample:
    w = r.choice(_WORDS)
    return TinyExample(d.RLHF, f"Say something nice about a {w}.",
                       {"judge_fields": {"keyword": w}, "baseline": f"A {w} is nice."},
                       f"A {w} is lovely.")


def _long_context(r: random.Random) -> TinyExample:
    keys = r.sample(_WORDS, 3)
    values = {k: r.randint(1, 9) for k in keys}
    k = r.choice(keys)
    lines = "\n".join(f"{key}: {v}" for key, v in values.items())
    q = f"What is the value of {k}?"
    return TinyExample(d.LONG_CONTEXT, f"{lines}\n\n{q}",
                       {"answer": str(values[k]), "question": q}, str(values[k]))


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


def tiny_examples(domain: str, n: int, seed: int = 0) -> list[TinyExample]:
    """``n`` deterministic examples of ``domain`` (same seed, same examples)."""
    d.check_domain(domain)
    r = random.Random(f"{domain}:{seed}")
    return [GENERATORS[domain](r) for _ in range(n)]
