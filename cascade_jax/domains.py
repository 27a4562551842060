"""Canonical domain names of the cascade.

One home for the names that configs, data, teacher routing, rewards and reports use. Import the
constants (``from cascade_jax.domains import MATH``) or validate a name with :func:`check_domain`.
Integer ids (``RLBatch.domain_ids``, prompt batches) are the positions in :data:`DOMAINS`:
:func:`domain_id` / :func:`domain_name` convert, :data:`DOMAIN_IDS` is the table.

=====================  =========================================================
name                   what is verified
=====================  =========================================================
math                   final answer, equivalence via ``math-verify``
instruction_following  IFEval/IFBench-style rule checks on the answer
mcq                    STEM multiple-choice answer letter
structured_output      JSON validated against a JSON schema
tool_call              tool calls in the chat template's Qwen3-Coder XML format
code                   programs run against test cases in the sandbox
rlhf                   pairwise GenRM preferences, aggregated to win rates
long_context           judged QA over long inputs
swe                    judged agentless repair patches
=====================  =========================================================
"""

from __future__ import annotations

__all__ = [
    "MATH", "INSTRUCTION_FOLLOWING", "MCQ", "STRUCTURED_OUTPUT", "TOOL_CALL", "CODE", "RLHF",
    "LONG_CONTEXT", "SWE", "DOMAINS", "DOMAIN_IDS", "check_domain", "domain_id", "domain_name",
]

MATH = "math"
INSTRUCTION_FOLLOWING = "instruction_following"
MCQ = "mcq"
STRUCTURED_OUTPUT = "structured_output"
TOOL_CALL = "tool_call"
CODE = "code"
RLHF = "rlhf"
LONG_CONTEXT = "long_context"
SWE = "swe"

#: All canonical domains, in cascade order of first appearance.
DOMAINS: tuple[str, ...] = (
    INSTRUCTION_FOLLOWING, MCQ, TOOL_CALL, STRUCTURED_OUTPUT, MATH, RLHF, LONG_CONTEXT, CODE, SWE,
)


def check_domain(name: str) -> str:
    """Return ``name`` if it is a canonical domain, else raise ``ValueError`` listing the valid ones."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; valid domains: {', '.join(sorted(DOMAINS))}")
    return name


#: name -> int32 id used in batches (``RLBatch.domain_ids``); the position in :data:`DOMAINS`.
#: Append new domains at the end of :data:`DOMAINS` so stored ids keep their meaning.
DOMAIN_IDS: dict[str, int] = {name: i for i, name in enumerate(DOMAINS)}


def domain_id(name: str) -> int:
    """Integer id of a canonical domain name (error listing the valid names if unknown)."""
    return DOMAIN_IDS[check_domain(name)]


def domain_name(i: int) -> str:
    """Canonical domain name of an integer id (error if out of range)."""
    i = int(i)
    if not 0 <= i < len(DOMAINS):
        raise ValueError(f"unknown domain id {i}; valid ids: 0..{len(DOMAINS) - 1} ({', '.join(DOMAINS)})")
    return DOMAINS[i]
