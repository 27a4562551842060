"""Kernel tuning table: block sizes per kernel, shape bucket and device kind.

The Pallas kernels ask :func:`lookup` for their tunable parameters when the caller passes none
(an explicit argument always wins). The table is ``kernels/tuning.json`` (or the file named by
the environment variable ``CASCADE_KERNEL_TUNING``), written by ``launch/tune_kernels.py`` on a
device::

    {"version": 1,
     "entries": [{"kernel": "gmm_triton", "device": "H100",
                  "shape": {"m": 65536, "k": 2688, "n": 1856},
                  "params": {"block_m": 128, "block_k": 64, "block_n": 128},
                  "measured": {"tflops": ..., "default_tflops": ..., "device_kind": ..., "jax": ...}}]}

Lookup ``lookup(kernel, **shape)``:

1. *device*: an entry applies when its ``device`` string occurs (case-insensitively) in the
   device kind of the traced-for device (:func:`device_kind`: the abstract mesh's device when a
   mesh with one is set, else ``jax.devices()[0]``; e.g. ``"NVIDIA H100 80GB HBM3"``,
   ``"TPU v5 lite"``, ``"cpu"``);
2. *shape*: every key of the entry's ``shape`` must equal the call's value after bucketing —
   the keys in :data:`BUCKETED` (row / sequence counts) are rounded up to a power of two, the
   others (widths) compared exactly; keys the entry leaves out match anything;
3. the matching entry with the most shape keys wins (ties: the later entry);
4. no match: ``{}`` — the kernel keeps today's defaults (:data:`DEFAULTS`).

Only the keys of :data:`KERNELS` [kernel] are returned; anything else in ``params`` is refused
when the table is loaded (a typo must not silently fall back).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Optional

import jax

__all__ = ["KERNELS", "DEFAULTS", "SHAPE_KEYS", "BUCKETED", "TABLE_PATH", "lookup", "device_kind",
           "bucket", "load_table", "use_table", "table_path", "merge_entries", "write_table"]

#: tunable parameters per kernel (what an entry's ``params`` may hold)
KERNELS = {
    "gmm_triton": ("block_m", "block_k", "block_n"),   # kernels.pallas_gmm, variant "gpu"
    "gmm_tpu": ("block_m", "block_k", "block_n"),      # kernels.pallas_gmm, variant "tpu"
    "gmm_mosaic": ("block_m", "block_k"),              # kernels.pallas_gmm_mgpu
    "attention": ("block_q", "block_k"),               # kernels.pallas_attention
    "ssd": ("num_warps_fwd", "num_warps_bwd"),         # kernels.pallas_ssd (no block sizes: chunk = model's)
}

#: today's defaults, used when no entry matches (documented here; each kernel applies its own)
DEFAULTS = {
    "gmm_triton": {"block_m": 128, "block_k": 128, "block_n": 128},
    "gmm_tpu": {"block_m": 128, "block_k": 128, "block_n": 128},
    "gmm_mosaic": {"block_m": "64 if M <= 32768 else 128", "block_k": 64},
    "attention": {"block_q": 128, "block_k": 128},
    "ssd": {"num_warps_fwd": 4, "num_warps_bwd": 8},
}

#: shape keys per kernel: gmm ``m`` rows (tokens × top-k), ``k`` / ``n`` widths; attention ``t``
#: queries, ``s`` keys, ``d`` head dim; ssd ``t`` tokens, ``p`` head dim, ``n`` state
SHAPE_KEYS = {
    "gmm_triton": ("m", "k", "n"), "gmm_tpu": ("m", "k", "n"), "gmm_mosaic": ("m", "k", "n"),
    "attention": ("t", "s", "d"), "ssd": ("t", "p", "n"),
}

#: keys rounded up to a power of two before matching
BUCKETED = frozenset({"m", "t", "s"})

TABLE_PATH = pathlib.Path(__file__).with_name("tuning.json")
ENV = "CASCADE_KERNEL_TUNING"

_override: list = []          # stack of in-memory tables (use_table)
_cache: dict = {}             # path -> (mtime, entries)


def table_path() -> pathlib.Path:
    """The table file: ``$CASCADE_KERNEL_TUNING`` if set, else ``kernels/tuning.json``."""
    return pathlib.Path(os.environ.get(ENV) or TABLE_PATH)


def bucket(key: str, value: int) -> int:
    """``value`` rounded up to a power of two for the :data:`BUCKETED` keys, else unchanged."""
    value = int(value)
    if key in BUCKETED and value > 0:
        return 1 << (value - 1).bit_length()
    return value


def _check_entries(entries, where: str) -> list:
    out = []
    for i, e in enumerate(entries):
        kernel = e.get("kernel")
        if kernel not in KERNELS:
            raise ValueError(f"{where}: entries[{i}].kernel: {kernel!r} not one of {sorted(KERNELS)}")
        if not isinstance(e.get("device"), str) or not e["device"]:
            raise ValueError(f"{where}: entries[{i}].device: must be a non-empty string")
        bad = sorted(set(e.get("shape", {})) - set(SHAPE_KEYS[kernel]))
        if bad:
            raise ValueError(f"{where}: entries[{i}].shape: unknown keys {bad} for {kernel} "
                             f"(valid: {SHAPE_KEYS[kernel]})")
        params = e.get("params") or {}
        bad = sorted(set(params) - set(KERNELS[kernel]))
        if bad or not params:
            raise ValueError(f"{where}: entries[{i}].params: {'unknown keys ' + str(bad) if bad else 'empty'} "
                             f"for {kernel} (valid: {KERNELS[kernel]})")
        if not all(isinstance(v, int) and v > 0 for v in params.values()):
            raise ValueError(f"{where}: entries[{i}].params: values must be positive ints, got {params}")
        out.append(e)
    return out


def load_table(path: Optional[os.PathLike] = None) -> list:
    """The entries of the table file (``[]`` if it does not exist); validated, cached by mtime."""
    p = pathlib.Path(path) if path is not None else table_path()
    try:
        mtime = p.stat().st_mtime
    except FileNotFoundError:
        return []
    hit = _cache.get(str(p))
    if hit and hit[0] == mtime:
        return hit[1]
    doc = json.loads(p.read_text())
    entries = _check_entries(doc.get("entries", []), str(p))
    _cache[str(p)] = (mtime, entries)
    return entries


@contextlib.contextmanager
def use_table(entries):
    """Use ``entries`` (a list of table entries) instead of the file inside the block (tests,
    the tuner's candidates). Lookups happen at trace time: a jitted function traced inside the
    block keeps what it got."""
    _override.append(_check_entries(list(entries), "use_table"))
    try:
        yield
    finally:
        _override.pop()


def device_kind() -> str:
    """Device kind of the traced-for device (abstract mesh's device if set, else the first device)."""
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if dev is not None:
        return str(dev.device_kind)
    return str(jax.devices()[0].device_kind)


def _entries() -> list:
    return _override[-1] if _override else load_table()


def lookup(kernel: str, *, device: Optional[str] = None, **shape) -> dict:
    """Tuned parameters for ``kernel`` at ``shape`` on ``device`` (default :func:`device_kind`),
    or ``{}`` when no entry matches (module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"tuning: unknown kernel {kernel!r}; valid: {sorted(KERNELS)}")
    entries = _entries()
    if not entries:
        return {}
    kind = (device if device is not None else device_kind()).lower()
    call = {k: bucket(k, v) for k, v in shape.items()}
    best, best_n = None, -1
    for e in entries:
        if e["kernel"] != kernel or e["device"].lower() not in kind:
            continue
        want = e.get("shape", {})
        if all(k in call and call[k] == bucket(k, v) for k, v in want.items()) and len(want) >= best_n:
            best, best_n = e, len(want)
    return dict(best["params"]) if best is not None else {}


def merge_entries(entries: list, new: list) -> list:
    """``entries`` with ``new`` added; an old entry with the same kernel, device and shape is replaced."""
    key = lambda e: (e["kernel"], e["device"], json.dumps(e.get("shape", {}), sort_keys=True))
    fresh = {key(e) for e in new}
    return [e for e in entries if key(e) not in fresh] + list(new)


def write_table(entries: list, path: Optional[os.PathLike] = None) -> pathlib.Path:
    """Validate and write ``entries`` as the table file (``path`` default :func:`table_path`)."""
    p = pathlib.Path(path) if path is not None else table_path()
    _check_entries(entries, str(p))
    p.write_text(json.dumps({"version": 1, "entries": entries}, indent=1) + "\n")
    _cache.pop(str(p), None)
    return p
