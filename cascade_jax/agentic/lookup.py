"""The tiny multi-turn tool domain: look a code up with a tool, then answer with it.

Task (seeded, :func:`lookup_tasks`): a table of ``n_keys`` keys (``k`` + 2 digits, of the first
``key_space`` names) mapped to random codes (``code_len`` characters of ``alphabet``; default 6
of ``A-Z0-9``; the tiny stage's: 1 of ``ABCD``), hidden from the model; the prompt names one key
and asks for its code, so the only way to the answer is to call ``lookup(key=...)``, read the
tool result and answer with it. Task row::

    {"prompt": "What is the code of key k07? Use the lookup tool, then answer with the code only.",
     "metadata": {"table": {"k07": "Q3ZK8A", ...}, "key": "k07", "answer": "Q3ZK8A"},
     "declare_tools": True}     # False: the prompt has no tool spec (short rows, SFT'd models)

Episode (:class:`LookupEnv`): tool ``lookup(key)`` returns ``code of k07: Q3ZK8A`` (or an error
observation for an unknown key); a turn without a tool call is the final answer, scored by
:func:`score_lookup`: 1 iff the final answer (after ``</think>``), stripped, equals the code,
and the tool was called (``metadata`` of the score says whether it was). Truncated episodes
score 0. The canonical solution is two turns::

    <tool_call>\\n<function=lookup>\\n<parameter=key>\\nk07\\n</parameter>\\n</function>\\n</tool_call>
    Q3ZK8A
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from cascade_jax.rewards.base import NO_ANSWER, Score, final_answer, require
from cascade_jax.rewards.tool_call import format_tool_call

from .env import Reset, Tool, ToolEnvironment, tool_spec
from .render import AssistantTurn

__all__ = ["LookupEnv", "lookup_tasks", "score_lookup", "lookup_solution", "lookup_sft_rows",
           "LOOKUP_TOOL", "ALPHABET"]

#: the default code alphabet
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

LOOKUP_TOOL = tool_spec("lookup", "Return the code stored under a key.",
                        {"key": ("string", "the key, e.g. k07")}, required=["key"])


def lookup_tasks(n: int, seed: int = 0, n_keys: int = 4, declare_tools: bool = True,
                 code_len: int = 6, alphabet: str = ALPHABET, key_space: int = 100) -> list[dict]:
    """``n`` task rows (module doc), deterministic in ``seed``: ``n_keys`` distinct keys drawn
    from the ``key_space`` names ``k00 … k{key_space-1:02d}``, codes of ``code_len`` characters
    of ``alphabet``. ``declare_tools=False`` marks the tasks to start without the tool spec in
    the prompt (the template's ~290-token tool block): a model SFT'd on the canonical solution
    knows the tool (the tiny stage's short rows)."""
    if n < 0 or n_keys < 1 or code_len < 1 or not alphabet or not n_keys <= key_space <= 100:
        raise ValueError(f"n / n_keys / code_len / alphabet / key_space: need n >= 0, n_keys >= 1, "
                         f"code_len >= 1, a non-empty alphabet and n_keys <= key_space <= 100, got "
                         f"{n}, {n_keys}, {code_len}, {alphabet!r}, {key_space}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        keys = [f"k{int(i):02d}" for i in rng.choice(key_space, size=n_keys, replace=False)]
        table = {k: "".join(alphabet[int(j)] for j in rng.integers(0, len(alphabet), code_len))
                 for k in keys}
        key = keys[int(rng.integers(0, n_keys))]
        out.append({"prompt": f"What is the code of key {key}? Use the lookup tool, then answer "
                              f"with the code only.",
                    "metadata": {"table": table, "key": key, "answer": table[key]},
                    "declare_tools": bool(declare_tools)})
    return out


def lookup_solution(task: Mapping[str, Any]) -> list[str]:
    """The two assistant texts of the canonical solution (non-thinking mode)."""
    meta = task["metadata"]
    return [format_tool_call("lookup", {"key": meta["key"]}), meta["answer"]]


def _observation(key: str, code: str) -> str:
    return f"code of {key}: {code}"


def lookup_sft_rows(n: int, seed: int = 0, *, copy: float = 1.0, **task_args) -> list[dict]:
    """``n`` SFT rows ``{"messages"[, "tools"]}`` (the ``jsonl`` source layout): the canonical
    two-turn solution of :func:`lookup_tasks` ``(n, seed, **task_args)`` as the episode renders
    it (user prompt, assistant tool call, tool result, assistant answer). ``copy``: the share of
    rows whose final answer is the tool's code; the others answer an independent uniform draw
    from the alphabet (seeded by ``seed``). A model SFT'd on rows with ``copy < 1`` learns the
    format (call the tool, then answer) from a demonstrator that answers right with chance
    ``copy + (1 - copy) · len(alphabet) ** -code_len``: the room GRPO has to improve on it."""
    if not 0.0 <= copy <= 1.0:
        raise ValueError(f"copy: the share of rows answering the code must be in [0, 1], "
                         f"got {copy}")
    tasks = lookup_tasks(n, seed=seed, **task_args)
    alphabet = task_args.get("alphabet", ALPHABET)
    guess = np.random.default_rng([seed, 1])
    rows = []
    for task in tasks:
        meta = task["metadata"]
        draw = "".join(alphabet[int(j)]
                       for j in guess.integers(0, len(alphabet), len(meta["answer"])))
        answer = meta["answer"] if guess.random() < copy else draw
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"key": meta["key"]}}}
        rows.append({"messages": [
            {"role": "user", "content": task["prompt"]},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": _observation(meta["key"], meta["answer"])},
            {"role": "assistant", "content": answer}],
            **({"tools": [LOOKUP_TOOL]} if task["declare_tools"] else {})})
    return rows


def score_lookup(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    """1 iff the final answer is the key's code (module doc); ``meta["called"]`` (optional,
    default True) says whether the episode called the tool."""
    answer = str(require(meta, "answer", str))
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER, {"called": float(meta.get("called", True))})
    called = bool(meta.get("called", True))
    if not called:
        return Score(0.0, "answered without calling the lookup tool", {"called": 0.0})
    ok = final.strip() == answer
    return Score(float(ok), "the code matches" if ok else f"answer {final.strip()[:40]!r} is not "
                 "the key's code", {"called": 1.0})


class LookupEnv(ToolEnvironment):
    """One lookup episode (module doc). ``system``: optional system prompt."""

    def __init__(self, system: Optional[str] = None):
        super().__init__()
        self.system = system
        self.tools = {"lookup": Tool(LOOKUP_TOOL, self._lookup)}
        self.called = False
        self.task: Mapping[str, Any] = {}

    def reset(self, task: Mapping[str, Any]) -> Reset:
        meta = task.get("metadata")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("table"), Mapping):
            raise ValueError("task.metadata.table: a lookup task needs its table")
        self.task, self.called = task, False
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": str(task["prompt"])}]
        return Reset(tuple(msgs), (LOOKUP_TOOL,) if task.get("declare_tools", True) else None)

    def _lookup(self, key: str) -> str:
        self.called = True
        table = self.task["metadata"]["table"]
        key = key.strip()
        if key not in table:
            return f"error: no key {key!r}"
        return _observation(key, table[key])

    def score_answer(self, turn: Optional[AssistantTurn]) -> tuple[float, str]:
        if turn is None:
            return 0.0, "truncated"
        meta = {**self.task["metadata"], "called": self.called}
        s = score_lookup(self.task["prompt"], turn.answer, meta)
        return s.value, s.reason
