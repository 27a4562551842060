"""The cascade's stage order, per-stage configs and the resumable state file.

Order (the paper's): SFT -> IF-RL -> multi-domain RL -> MOPD -> RLHF -> long-context RL -> code
RL -> SWE RL, plus the side branch MOPD needs: an RLHF run started from the SFT checkpoint
(``rlhf_teacher``). Each stage starts from the final Hub export of the stage named in its
``start`` field; the first starts from the preset (random init) or a given base checkpoint.

A cascade dir holds one run dir per stage (``<cascade_dir>/<stage>/``), ``teachers.json`` (the
registry), ``cascade_state.json`` (this module) and the report. The state file records, per stage,
``status`` (``"running"`` once started, ``"trained"`` once its run finished, ``"done"`` once its
final export was evaluated and registered), its Hub export, wall-clock seconds and eval scores.
Rerunning the cascade skips ``"done"`` stages and hands unfinished ones to the stage runner with
the same run dir, which resumes from the stage's own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Optional, Sequence, Union

import configs
from cascade_jax import config as C

__all__ = ["StageSpec", "CASCADE", "STAGE_NAMES", "STATE_FILE", "CONFIG_ROOT", "PRESET_DIRS",
           "stage_config_path", "load_stage_config", "stage_config", "load_state",
           "save_state", "update_stage_state"]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One cascade stage: ``name`` is its config file stem and run-dir name; ``start`` the stage
    whose final export it starts from (``None``: the base model); ``branch`` marks a side branch
    (trained and registered as a teacher, but no main-line stage starts from it)."""

    name: str
    start: Optional[str]
    branch: bool = False


#: Execution order. The side branch runs right after SFT, so every MOPD teacher exists before MOPD.
CASCADE: tuple[StageSpec, ...] = (
    StageSpec("sft", None),
    StageSpec("rlhf_teacher", "sft", branch=True),
    StageSpec("if_rl", "sft"),
    StageSpec("multi_domain_rl", "if_rl"),
    StageSpec("mopd", "multi_domain_rl"),
    StageSpec("rlhf", "mopd"),
    StageSpec("long_context_rl", "rlhf"),
    StageSpec("code_rl", "long_context_rl"),
    StageSpec("swe_rl", "code_rl"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in CASCADE)
STATE_FILE = "cascade_state.json"
CONFIG_ROOT = configs.root()  # the packaged configs (installed as package data)
#: Model preset -> folder of its stage configs (under ``configs/``).
PRESET_DIRS = {"nano-30b-a3b": ".", "tiny": "tiny"}


def stage_config_path(name: str, preset: str = "tiny", root: pathlib.Path = CONFIG_ROOT) -> pathlib.Path:
    if name not in STAGE_NAMES:
        raise C.ConfigError(f"unknown cascade stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    if preset not in PRESET_DIRS:
        raise C.ConfigError(f"--preset: unknown cascade preset {preset!r}; valid: "
                            f"{', '.join(sorted(PRESET_DIRS))}")
    return (root / PRESET_DIRS[preset] / f"{name}.json").resolve()


def load_stage_config(name: str, preset: str = "tiny", root: pathlib.Path = CONFIG_ROOT) -> C.Config:
    path = stage_config_path(name, preset, root)
    if not path.exists():
        raise C.ConfigError(f"cascade stage {name!r}: config {path} does not exist")
    return C.load(str(path))


def stage_config(name: str, *, preset: str = "tiny", cascade_dir: Union[str, os.PathLike],
                 start_checkpoint: Optional[str] = None, teachers: Optional[dict] = None,
                 overrides: Sequence[str] = (), root: pathlib.Path = CONFIG_ROOT) -> C.Config:
    """The resolved config of stage ``name`` inside a cascade: its file, then ``overrides``
    (``--set`` values common to all stages, e.g. ``stage.steps=2``), then the cascade's wiring:
    ``model.checkpoint`` = the start stage's export, ``run.out_dir`` = ``<cascade_dir>/<name>``,
    ``stage.teachers`` (MOPD) from the registry."""
    cfg = C.apply_overrides(load_stage_config(name, preset, root), list(overrides))
    wiring = [("run.out_dir", str(pathlib.Path(cascade_dir) / name))]
    if start_checkpoint is not None:
        wiring.append(("model.checkpoint", str(start_checkpoint)))
    if teachers is not None:
        wiring.append(("stage.teachers", dict(teachers)))
    for key, value in wiring:
        cfg = C.replace_path(cfg, key, value)
    return cfg


# --------------------------------------------------------------------------------------------
# State file


def load_state(cascade_dir: Union[str, os.PathLike]) -> dict:
    path = pathlib.Path(cascade_dir) / STATE_FILE
    if not path.exists():
        return {"version": 1, "stages": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise C.ConfigError(f"{path}: not valid JSON ({e}); delete it to restart the cascade") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise C.ConfigError(f"{path}: expected {{\"version\": 1, \"stages\": {{...}}}}")
    unknown = set(state["stages"]) - set(STAGE_NAMES)
    if unknown:
        raise C.ConfigError(f"{path}: unknown stage(s) {', '.join(sorted(unknown))}; "
                            f"stages: {', '.join(STAGE_NAMES)}")
    return state


def save_state(cascade_dir: Union[str, os.PathLike], state: dict) -> None:
    """Atomic write (temp file + rename): a kill never leaves a half-written state file."""
    d = pathlib.Path(cascade_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".state.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, d / STATE_FILE)


def update_stage_state(cascade_dir, name: str, **fields) -> dict:
    state = load_state(cascade_dir)
    state["stages"].setdefault(name, {}).update(fields)
    save_state(cascade_dir, state)
    return state
