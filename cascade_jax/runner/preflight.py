"""Checks a stage passes before anything large is built or compiled: every input on disk is
there (teachers, data sources, tokenizer, the initial checkpoint) -- all missing ones named in
one error -- and the train state fits the machine's memory.

:func:`check_inputs` runs right after :func:`cascade_jax.runner.build.validate` (the config's
cross-field checks) in ``launch/run.py`` and :func:`cascade_jax.runner.run_stage`; :func:`check_memory` runs in
:func:`cascade_jax.runner.build.build` after the tokenizer and data and before the weights.
:func:`resolve_init` turns an ``--init`` / teacher path into its Hub checkpoint directory.
"""

from __future__ import annotations

import glob
import os
import pathlib

import jax

from cascade_jax import config as C
from cascade_jax.runner.errors import CheckpointLoadError, ConfigError, InputFileError
from models import nemotron_h as nh

__all__ = ["check_inputs", "check_memory", "resolve_init", "TRAIN_STATE_BYTES_PER_PARAM", "available_bytes"]

#: bytes per parameter of the train state at the least: fp32 master weights + Adam's two fp32
#: moments (gradients, the compute copy and activations come on top)
TRAIN_STATE_BYTES_PER_PARAM = 12


def resolve_init(path: str, what: str = "--init") -> str:
    """``--init`` target (or a teacher; ``what`` names it in errors) → a Hub checkpoint
    directory: a Hub dir (has ``config.json``) as is; a run dir (has ``run_config.json``) → its
    final export ``<run>/hub``."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputFileError(f"{what} {path}: no such file or directory")
    if not p.is_dir():
        raise InputFileError(f"{what} {path}: not a directory (expected a Hub checkpoint or a run dir)")
    if (p / "config.json").is_file():
        return str(p)
    if (p / "run_config.json").is_file():
        hub = p / "hub"
        if (hub / "config.json").is_file():
            return str(hub)
        raise CheckpointLoadError(f"{what} {path}: run dir has no final Hub export ({hub}); "
                                  f"finish the run first")
    raise InputFileError(f"{what} {path}: neither a Hub checkpoint (config.json) nor a run dir "
                         f"(run_config.json)")


def _exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return bool(glob.glob(path, recursive=True))
    return os.path.exists(path)


def check_inputs(config: C.Config) -> None:
    """Every path the stage reads exists; else one :class:`InputFileError` naming all missing
    ones by group (``teachers``, ``data``, ``tokenizer``, ``init``)."""
    missing: dict = {}
    if config.model.checkpoint and not os.path.exists(config.model.checkpoint):
        missing.setdefault("init", []).append(f"model.checkpoint {config.model.checkpoint}")
    if config.stage.objective == "mopd":
        for dom, path in sorted(config.stage.teachers.items()):
            if not os.path.exists(path):
                missing.setdefault("teachers", []).append(f"stage.teachers.{dom} {path}")
    for i, s in enumerate(config.data.sources):
        if s.format not in ("tiny", "generated") and s.path and not _exists(s.path):
            missing.setdefault("data", []).append(f"data.sources[{i}].path {s.path}")
    if config.data.tokenizer and not os.path.exists(config.data.tokenizer):
        missing.setdefault("tokenizer", []).append(f"data.tokenizer {config.data.tokenizer}")
    if missing:
        parts = [f"{group}: {', '.join(items)}" for group, items in missing.items()]
        raise InputFileError(f"stage {config.stage.name} cannot start: no such file or directory -- "
                             + "; ".join(parts))
    if config.stage.objective == "mopd":  # present, but each must be a checkpoint or a run dir
        for dom, path in sorted(config.stage.teachers.items()):
            resolve_init(path, f"stage.teachers.{dom}")


def available_bytes() -> tuple[int, str]:
    """``(bytes, description)`` of the memory the job's devices offer: the sum of the
    accelerators' limits, or the host's physical memory for CPU devices (which share it)."""
    devs = jax.devices()
    total, known = 0, True
    for d in devs:
        stats = None
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = None
        if stats and stats.get("bytes_limit"):
            total += int(stats["bytes_limit"])
        else:
            known = False
            break
    kinds = f"{len(devs)} {devs[0].platform} device(s)"
    if known and total:
        return total, kinds
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * jax.process_count()
    except (ValueError, OSError, AttributeError):
        return 0, kinds
    return host, f"{kinds} sharing {jax.process_count()} host(s)' memory"


def check_memory(config: C.Config, model_cfg) -> None:
    """The train state (:data:`TRAIN_STATE_BYTES_PER_PARAM` per parameter) plus MOPD teachers
    (one copy each in ``model.dtype``) must fit the memory of the job's devices; else a
    :class:`ConfigError` with both numbers, before weights are made or anything compiles."""
    total, _ = nh.param_counts(model_cfg)
    need = total * TRAIN_STATE_BYTES_PER_PARAM
    what = f"{total / 1e9:.2f}B parameters x {TRAIN_STATE_BYTES_PER_PARAM} bytes (train state)"
    if config.stage.objective == "mopd":
        teachers = len({str(pathlib.Path(p)) for p in config.stage.teachers.values()})
        if teachers:
            size = jax.numpy.dtype(config.model.dtype).itemsize
            need += teachers * total * size
            what += f" + {teachers} teacher(s) x {total / 1e9:.2f}B x {size} bytes"
    have, desc = available_bytes()
    if have and need > have:
        gib = 2 ** 30
        raise ConfigError(f"devices: stage {config.stage.name} needs at least {need / gib:,.0f} GiB "
                          f"({what}); {desc} have {have / gib:,.0f} GiB -- run it on more devices "
                          f"(mesh.*; launch/plan.py sizes a mesh) or with a smaller model.preset")
