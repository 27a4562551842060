"""``structured_output``: JSON validated against a JSON schema (``jsonschema``).

Metadata: ``schema`` (a dict, or its JSON text); optional ``strict`` (default ``True``).

Rules (reward is binary):
1. The final answer (after ``</think>``) must be one JSON document — bare, or alone inside one
   ```` ```json ```` fence. Prose around it scores 0 (the consumer of structured output parses the
   whole reply).
2. It must validate against ``schema`` (the schema's own ``$schema`` draft, default 2020-12).
3. ``strict``: objects that declare ``properties`` but say nothing about ``additionalProperties``
   or ``patternProperties`` are closed (``additionalProperties: false``), so extra keys fail.
   A schema that explicitly allows extra keys keeps allowing them.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any, Mapping

from cascade_jax.rewards.base import NO_ANSWER, MetadataError, Score, final_answer, require

__all__ = ["score_structured", "close_schema", "extract_json"]

_FENCE = re.compile(r"^```[a-zA-Z]*[ \t]*\n(.*?)\n?```$", re.S)


def close_schema(schema: Any) -> Any:
    """Copy of ``schema`` where every object schema with ``properties`` and no
    ``additionalProperties``/``patternProperties``/``unevaluatedProperties`` forbids extra keys."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not any(k in node for k in (
                    "additionalProperties", "patternProperties", "unevaluatedProperties")):
                node["additionalProperties"] = False
            for k, v in node.items():
                if k in ("enum", "const", "default", "examples"):
                    continue
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)
    return schema


def extract_json(text: str) -> Any:
    """Parse ``text`` (optionally one fenced block) as a single JSON document; raises ValueError."""
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    return json.loads(body)


@functools.lru_cache(maxsize=1024)
def _validator(schema_text: str, strict: bool):
    """Checked validator of one schema (JSON text), cached: the rollouts of a prompt share their
    schema, and checking it against its metaschema is most of the cost of scoring an item."""
    import jsonschema

    try:
        schema = json.loads(schema_text)
    except ValueError as e:
        raise MetadataError(f"field 'schema': not valid JSON: {e}") from e
    if strict:
        schema = close_schema(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise MetadataError(f"field 'schema': invalid JSON schema: {e.message}") from e
    return cls(schema)


def score_structured(prompt: str, response: str, meta: Mapping[str, Any]) -> Score:
    schema = require(meta, "schema", (dict, str, bool))
    validator = _validator(schema if isinstance(schema, str) else json.dumps(schema),
                           bool(meta.get("strict", True)))
    final = final_answer(response)
    if final is None:
        return Score(0.0, NO_ANSWER)
    try:
        doc = extract_json(final)
    except ValueError as e:
        return Score(0.0, f"final answer is not a single JSON document: {e}")
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "<root>"
        return Score(0.0, f"schema violation at {where}: {errors[0].message} "
                          f"({len(errors)} error(s))", {"n_errors": float(len(errors))})
    return Score(1.0, "valid JSON matching the schema")
