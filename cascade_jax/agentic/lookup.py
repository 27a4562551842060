"""The tiny multi-turn tool domain: look a code up with a tool, then answer with it.

Task (seeded, :func:`lookup_tasks`): a table of ``n_keys`` keys (``k`` + 2 digits) mapped to
random codes (6 characters from ``A-Z0-9``), hidden from the model; the prompt names one key and
asks for its code, so the only way to the answer is to call ``lookup(key=...)``, read the tool
result and answer with it. Task row::

    {"prompt": "What is the code of key k07? Use the lookup tool, then answer with the code only.",
     "metadata": {"table": {"k07": "Q3ZK8A", ...}, "key": "k07", "answer": "Q3ZK8A"}}

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

__all__ = ["LookupEnv", "lookup_tasks", "score_lookup", "lookup_solution", "LOOKUP_TOOL"]

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

LOOKUP_TOOL = tool_spec("lookup", "Return the code stored under a key.",
                        {"key": ("string", "the key, e.g. k07")}, required=["key"])


def lookup_tasks(n: int, seed: int = 0, n_keys: int = 4) -> list[dict]:
    """``n`` task rows (module doc), deterministic in ``seed``."""
    if n < 0 or n_keys < 1:
        raise ValueError(f"n / n_keys: need n >= 0 and n_keys >= 1, got {n}, {n_keys}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        keys = [f"k{int(i):02d}" for i in rng.choice(100, size=n_keys, replace=False)]
        table = {k: "".join(_ALPHABET[int(j)] for j in rng.integers(0, len(_ALPHABET), 6))
                 for k in keys}
        key = keys[int(rng.integers(0, n_keys))]
        out.append({"prompt": f"What is the code of key {key}? Use the lookup tool, then answer "
                              f"with the code only.",
                    "metadata": {"table": table, "key": key, "answer": table[key]}})
    return out


def lookup_solution(task: Mapping[str, Any]) -> list[str]:
    """The two assistant texts of the canonical solution (non-thinking mode)."""
    meta = task["metadata"]
    return [format_tool_call("lookup", {"key": meta["key"]}), meta["answer"]]


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
        return Reset(tuple(msgs), (LOOKUP_TOOL,))

    def _lookup(self, key: str) -> str:
        self.called = True
        table = self.task["metadata"]["table"]
        key = key.strip()
        if key not in table:
            return f"error: no key {key!r}"
        return f"code of {key}: {table[key]}"

    def score_answer(self, turn: Optional[AssistantTurn]) -> tuple[float, str]:
        if turn is None:
            return 0.0, "truncated"
        meta = {**self.task["metadata"], "called": self.called}
        s = score_lookup(self.task["prompt"], turn.answer, meta)
        return s.value, s.reason
