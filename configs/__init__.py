"""Launch configs as package data: one JSON file per cascade stage (``<name>.json``, the 30B
run), toy-scale variants under ``tiny/`` (``tiny/<name>.json``: each a small diff over the
shared ``tiny/base.json``, composed by ``cascade_jax.config.load``), judge prompts under
``judges/``. Installed with the package, so a non-editable install finds them::

    from configs import stage_names, stage_path
    stage_path("tiny/sft")      # -> path of configs/tiny/sft.json
"""

from __future__ import annotations

import importlib.resources
import pathlib

__all__ = ["root", "stage_names", "stage_path"]


def root() -> pathlib.Path:
    """Directory of the installed configs (a real directory for wheel and editable installs)."""
    return pathlib.Path(str(importlib.resources.files(__name__)))


#: file stem of a preset's shared base config (``tiny/base.json``): extended, never run alone
BASE_STEM = "base"


def stage_names() -> list[str]:
    """Every stage name: ``<name>`` for ``<name>.json``, ``tiny/<name>`` for ``tiny/<name>.json``
    (not the ``base.json`` the stages of a preset extend)."""
    r = root()
    return sorted(p.relative_to(r).with_suffix("").as_posix() for p in r.rglob("*.json")
                  if "judges" not in p.relative_to(r).parts and p.stem != BASE_STEM)


def stage_path(name: str) -> pathlib.Path:
    """Path of stage ``name``'s config; ``KeyError`` listing the valid names if unknown."""
    if name not in stage_names():
        raise KeyError(f"unknown stage {name!r}; valid stages: {', '.join(stage_names())}")
    return root() / f"{name}.json"
