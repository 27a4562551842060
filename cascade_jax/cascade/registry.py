"""Teacher registry: every cascade checkpoint's eval score per domain, and the MOPD teacher map.

``teachers.json`` (one per cascade dir) holds, per stage checkpoint, where its final Hub export
lives and its evaluation score per canonical domain (mean reward over the eval prompts, in
[0, 1] for the verifiable domains)::

    {"version": 1,
     "checkpoints": {
        "sft":             {"checkpoint": "sft/hub", "scores": {"math": 0.62, "mcq": 0.31, ...}},
        "rlhf_teacher":    {"checkpoint": "rlhf_teacher/hub", "scores": {...}},
        "multi_domain_rl": {"checkpoint": "multi_domain_rl/hub", "scores": {...}}},
     "assignment": {"policy": "paper", "teachers": {"math": "sft/hub", ...}}}

Relative ``checkpoint`` paths are relative to the registry file's directory, so a cascade dir can
be moved. The rows are the score matrix of the report (rows = checkpoints, columns = domains).

Teacher policies (:func:`assign_teachers`) give the ``stage.teachers`` mapping the MOPD stage
consumes (domain -> checkpoint directory); each MOPD prompt is routed to its domain's teacher:

- ``"paper"`` -- the paper's assignment: math -> the SFT checkpoint; rlhf (preference) -> the
  RLHF side branch trained from SFT; instruction_following, mcq, tool_call, structured_output ->
  the checkpoint after multi-domain RL (which itself followed IF-RL).
- ``"best"`` -- per domain, the registered checkpoint with the highest score for that domain
  (ties go to the earlier-registered checkpoint, i.e. the earlier cascade stage).
- an explicit mapping domain -> registered checkpoint name (or an existing directory).
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Mapping, Optional, Sequence, Union

from cascade_jax import domains as D

__all__ = [
    "RegistryError", "PAPER_ASSIGNMENT", "REGISTRY_FILE", "empty_registry", "load_registry",
    "save_registry", "register_checkpoint", "score_matrix", "assign_teachers",
    "record_assignment",
]

REGISTRY_FILE = "teachers.json"

#: The paper's MOPD teacher per domain, by the name of the stage whose final checkpoint teaches it.
PAPER_ASSIGNMENT: dict[str, str] = {
    D.MATH: "sft",
    D.RLHF: "rlhf_teacher",
    D.INSTRUCTION_FOLLOWING: "multi_domain_rl",
    D.MCQ: "multi_domain_rl",
    D.TOOL_CALL: "multi_domain_rl",
    D.STRUCTURED_OUTPUT: "multi_domain_rl",
}


class RegistryError(ValueError):
    """A bad registry file, unknown domain or checkpoint name, or a missing checkpoint directory."""


def empty_registry() -> dict:
    return {"version": 1, "checkpoints": {}}


def _validate(reg: dict, where: str) -> dict:
    if not isinstance(reg, dict) or reg.get("version") != 1:
        raise RegistryError(f"{where}: expected an object with \"version\": 1")
    cks = reg.get("checkpoints")
    if not isinstance(cks, dict):
        raise RegistryError(f"{where}: 'checkpoints' must be an object name -> entry")
    for name, e in cks.items():
        if not isinstance(e, dict) or not isinstance(e.get("checkpoint"), str):
            raise RegistryError(f"{where}: checkpoints.{name}.checkpoint must be a path string")
        scores = e.get("scores")
        if not isinstance(scores, dict):
            raise RegistryError(f"{where}: checkpoints.{name}.scores must be an object domain -> score")
        for dom, s in scores.items():
            if dom not in D.DOMAINS:
                raise RegistryError(f"{where}: checkpoints.{name}.scores: unknown domain {dom!r}; "
                                    f"valid domains: {', '.join(sorted(D.DOMAINS))}")
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise RegistryError(f"{where}: checkpoints.{name}.scores.{dom}: expected a number, "
                                    f"got {s!r}")
    return reg


def load_registry(path: Union[str, os.PathLike]) -> dict:
    """Read and validate ``teachers.json``; a missing file is an empty registry."""
    path = pathlib.Path(path)
    if not path.exists():
        return empty_registry()
    try:
        reg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegistryError(f"{path}: not valid JSON ({e})") from None
    return _validate(reg, str(path))


def save_registry(path: Union[str, os.PathLike], reg: dict) -> None:
    """Write atomically (temp file + rename), so a killed run never leaves half a file."""
    path = pathlib.Path(path)
    _validate(reg, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".teachers.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(reg, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def register_checkpoint(path: Union[str, os.PathLike], name: str, checkpoint: str,
                        scores: Mapping[str, float], **extra) -> dict:
    """Add or replace checkpoint ``name`` (its Hub dir and per-domain scores) in the registry file.

    ``checkpoint`` is stored relative to the registry's directory when it lies inside it.
    """
    path = pathlib.Path(path)
    reg = load_registry(path)
    ck = pathlib.Path(checkpoint)
    try:
        ck = ck.resolve().relative_to(path.parent.resolve())
    except ValueError:
        pass
    entry = {"checkpoint": str(ck), "scores": {k: float(v) for k, v in scores.items()}, **extra}
    reg["checkpoints"][name] = entry
    save_registry(path, reg)
    return reg


def _abs(reg_dir: pathlib.Path, p: str) -> str:
    q = pathlib.Path(p)
    return str(q if q.is_absolute() else reg_dir / q)


def score_matrix(reg: dict, domains: Optional[Sequence[str]] = None):
    """``(names, domains, rows)``: rows[i][j] is checkpoint i's score on domain j (None if not
    evaluated). Domains default to every scored domain in canonical order."""
    names = list(reg["checkpoints"])
    if domains is None:
        seen = {d for e in reg["checkpoints"].values() for d in e["scores"]}
        domains = [d for d in D.DOMAINS if d in seen]
    rows = [[reg["checkpoints"][n]["scores"].get(d) for d in domains] for n in names]
    return names, list(domains), rows


def assign_teachers(reg: dict, domains: Sequence[str], policy: Union[str, Mapping[str, str]] = "paper",
                    *, reg_dir: Union[str, os.PathLike] = ".", check_exists: bool = True) -> dict:
    """The MOPD ``stage.teachers`` mapping ``{domain: checkpoint_dir}`` for ``domains``.

    ``policy`` is ``"paper"``, ``"best"`` or a mapping domain -> registered checkpoint name (an
    existing directory is accepted too). Raises :class:`RegistryError` for an unknown domain, a
    domain without a teacher under the policy, an unregistered checkpoint name, or (with
    ``check_exists``) a checkpoint directory that does not exist.
    """
    reg_dir = pathlib.Path(reg_dir)
    cks = reg["checkpoints"]
    for dom in domains:
        if dom not in D.DOMAINS:
            raise RegistryError(f"unknown domain {dom!r}; valid domains: {', '.join(sorted(D.DOMAINS))}")
    if policy == "paper":
        chosen = {}
        for dom in domains:
            if dom not in PAPER_ASSIGNMENT:
                raise RegistryError(f"domain {dom!r} has no teacher in the paper's assignment "
                                    f"(covers {', '.join(sorted(PAPER_ASSIGNMENT))}); pass an "
                                    f"explicit map or policy 'best'")
            chosen[dom] = PAPER_ASSIGNMENT[dom]
    elif policy == "best":
        chosen = {}
        for dom in domains:
            scored = [(e["scores"][dom], -i, n) for i, (n, e) in enumerate(cks.items())
                      if dom in e["scores"]]
            if not scored:
                raise RegistryError(f"policy 'best': no registered checkpoint has a score for "
                                    f"domain {dom!r}")
            chosen[dom] = max(scored)[2]
    elif isinstance(policy, Mapping):
        for dom in policy:
            if dom not in D.DOMAINS:
                raise RegistryError(f"teacher map: unknown domain {dom!r}; valid domains: "
                                    f"{', '.join(sorted(D.DOMAINS))}")
        missing = [d for d in domains if d not in policy]
        if missing:
            raise RegistryError(f"teacher map: no teacher for domain(s) {', '.join(missing)}")
        chosen = {d: policy[d] for d in domains}
    else:
        raise RegistryError(f"unknown teacher policy {policy!r}; use 'paper', 'best' or a "
                            f"mapping domain -> checkpoint name")
    out = {}
    for dom, name in chosen.items():
        if name in cks:
            ck = _abs(reg_dir, cks[name]["checkpoint"])
        elif isinstance(policy, Mapping) and pathlib.Path(name).is_dir():
            ck = str(name)
        else:
            raise RegistryError(f"teacher for domain {dom!r}: checkpoint {name!r} is not in the "
                                f"registry (registered: {', '.join(cks) or 'none'})")
        if check_exists and not pathlib.Path(ck).is_dir():
            raise RegistryError(f"teacher for domain {dom!r}: checkpoint directory {ck} "
                                f"({name}) does not exist")
        out[dom] = ck
    return out


def record_assignment(path: Union[str, os.PathLike], policy, teachers: Mapping[str, str]) -> dict:
    """Store the assignment a MOPD stage used (policy name or map, and domain -> dir)."""
    path = pathlib.Path(path)
    reg = load_registry(path)
    reg["assignment"] = {"policy": policy if isinstance(policy, str) else dict(policy),
                         "teachers": dict(teachers)}
    save_registry(path, reg)
    return reg
