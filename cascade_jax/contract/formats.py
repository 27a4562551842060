"""Text formats that data (the chat template, the tiny tasks' references) and rewards (the
parsers) must agree on.

Tool calls (docs/algorithms.md §9, Qwen3-Coder style), one block per call, calls back to back::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

:func:`format_tool_call` writes one; ``cascade_jax.rewards.tool_call.parse_tool_calls`` reads them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["format_tool_call"]


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """Render one call in the template's format (non-string values as JSON)."""
    lines = ["<tool_call>", f"<function={name}>"]
    for k, v in arguments.items():
        lines += [f"<parameter={k}>", v if isinstance(v, str) else json.dumps(v), "</parameter>"]
    lines += ["</function>", "</tool_call>"]
    return "\n".join(lines)
