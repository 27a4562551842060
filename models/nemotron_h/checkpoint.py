"""Hugging Face Hub checkpoint I/O for NemotronH (docs/model.md §9).

``load_checkpoint(path)`` reads a Hub-layout directory (``config.json`` plus ``model.safetensors``,
or ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``) into the
param pytree of ``params.py``; ``save_checkpoint(params, cfg, path)`` writes that layout back.
Files are read and written with the ``safetensors`` library (numpy framework, bf16 as
``ml_dtypes.bfloat16``); a load reads each leaf (with a ``sharding``: each device's slice of it)
straight from the file with ``safe_open(...).get_slice(name)[index]``.

Hub names and layout versus ours (``M.`` = ``backbone.layers.{i}.mixer.``, ``L`` = ``layers[i]``)::

    Hub                                          ours
    backbone.embeddings.weight  [V, H]           embed        [V, H]
    lm_head.weight              [V, H]           lm_head      [H, V]      transposed
    M.{q,k,v,o,up,down,out}_proj.weight [out,in] L.mixer.*    [in, out]   transposed
    M.gate.weight [E, H], M.shared_experts.{up,down}_proj.weight -> gate, shared_up/down (transposed)
    M.in_proj.weight  [Di + C + Hm, H]           in_z | in_x | in_B | in_C | in_dt  [H, width]
                       (row blocks z | x | B | C | dt, each transposed; C = conv_dim = Di + 2 G N)
    M.conv1d.weight   [C, 1, K]                  conv_w       [K, C]
    M.conv1d.bias     [C]                        conv_b       [C]         (zeros if use_conv_bias=False)
    M.experts.{j}.up_proj.weight   [I, H]        experts_up   [E, H, I]   stacked over j, transposed
    M.experts.{j}.down_proj.weight [H, I]        experts_down [E, I, H]
    M.A_log, M.D [Hm], M.gate.e_score_correction_bias [E]   fp32 always (other tensors keep their dtype)
    backbone.layers.{i}.norm.weight, M.norm.weight, backbone.norm_f.weight, M.dt_bias   copied

On load, ``model.`` for ``backbone.``, the singular ``backbone.embedding.weight`` and transformers-5
stacked experts ``M.experts.up_proj`` ``[E, I, H]`` / ``M.experts.down_proj`` ``[E, H, I]`` are
accepted; ``mtp.*`` tensors are ignored.

**Params layout** (``save_checkpoint(..., layout="params")``; the trainer -> server disk weight
sync, docs/rollout-protocol.md §5.1): the same directory shape and safetensors format, but one
tensor per param leaf, named by its pytree path (``embed``, ``layers.3.mixer.in_z``, ...), in
the layout and dtype we hold, with ``"layout": "cascade-jax-params"`` in the safetensors
metadata. Nothing is transposed, fused or split either way: a save writes each host buffer as
it is (no copy on CPU) and an unsharded load reads each tensor's bytes straight into an aligned
host buffer that JAX adopts without a copy on CPU (with a :class:`HostBuffers` pool: a buffer
an earlier load already faulted in), so a sync costs about a sequential write + read of the
bytes. ``load_checkpoint`` recognises it from the metadata. Any safetensors reader
reads these files, but only this module maps them to the model: Hub exports (SGLang, vLLM,
transformers) always use the default ``layout="hub"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import gc
import json
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy (safetensors' numpy framework needs it)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .config import ModelConfig, ModelConfigError, _HF_ALIASES, _JAX_ONLY
from .params import param_specs

__all__ = ["CheckpointError", "HostBuffers", "load_checkpoint", "save_checkpoint", "hub_tensors",
           "params_from_hub_tensors", "TOKENIZER_FILE_PATTERNS", "PARAMS_LAYOUT", "LAYOUTS"]


class CheckpointError(ValueError):
    """A checkpoint directory (or the params being exported) is invalid; the message names the
    tensor or config key and the file."""


# safetensors dtype names we load and save. Anything else is rejected.
_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}
INDEX_FILE = "model.safetensors.index.json"
#: safetensors metadata value of ``"layout"`` for the params layout (module doc)
PARAMS_LAYOUT = "cascade-jax-params"
LAYOUTS = ("hub", "params")
SINGLE_FILE = "model.safetensors"
# Files copied verbatim from the source checkpoint on export (besides config.json).
TOKENIZER_FILE_PATTERNS = (
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "*.jinja", "chat_template*", "preprocessor_config.json",
    "processor_config.json", "*.py",
)


# ---------------------------------------------------------------------------------------------
# Leaf plans: where each param leaf lives in the Hub layout (used by load and, reversed, by save)


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str  # canonical Hub name
    shape: tuple  # Hub shape


@dataclasses.dataclass
class _Plan:
    """One param leaf of ``shape``: ours = Hub.transpose(perm), i.e. our dim d is Hub dim
    ``perm[d]`` (Hub dims not in ``perm`` have size 1 and are dropped), Hub rows offset by ``row0``.
    With several sources (per-expert tensors) our dim 0 picks the source and ``perm`` maps the
    rest. No sources: zeros, in the dtype of tensor ``like``."""
    shape: tuple
    fp32: bool
    sources: list  # list[_Source]
    perm: tuple
    row0: int = 0
    like: Optional[str] = None


def _plan(spec, name: str, perm: tuple) -> _Plan:
    """The leaf of ``spec`` read from the one Hub tensor ``name``, ours = Hub.transpose(perm)."""
    hub = [1] * (max(perm) + 1)
    for d, p in enumerate(perm):
        hub[p] = spec.shape[d]
    return _Plan(tuple(spec.shape), spec.fp32, [_Source(name, tuple(hub))], perm)


# Our mixer leaf -> Hub name under backbone.layers.{i}.mixer. where it is not "{leaf}.weight"
# (matrices) or "{leaf}" (vectors).
_HUB_NAME = {"norm": "norm.weight", "conv_b": "conv1d.bias", "gate": "gate.weight",
             "e_score_correction_bias": "gate.e_score_correction_bias",
             "shared_up": "shared_experts.up_proj.weight", "shared_down": "shared_experts.down_proj.weight"}
_FUSED = ("in_z", "in_x", "in_B", "in_C", "in_dt")  # row blocks of the Hub's in_proj, in order


def _mixer_plans(cfg: ModelConfig, pre: str, specs: dict, stacked_experts: bool) -> dict:
    plans = {}
    for leaf, spec in specs.items():
        s = tuple(spec.shape)
        if leaf == "conv_w":  # [C, 1, K] -> [K, C]
            plans[leaf] = _plan(spec, pre + "conv1d.weight", (2, 0))
        elif leaf in ("experts_up", "experts_down"):
            hub = leaf.replace("experts_", "") + "_proj"
            if stacked_experts:  # transformers 5: [E, out, in]
                plans[leaf] = _plan(spec, pre + f"experts.{hub}", (0, 2, 1))
            else:
                plans[leaf] = _Plan(s, False, [_Source(pre + f"experts.{j}.{hub}.weight", (s[2], s[1]))
                                               for j in range(s[0])], (1, 0))
        elif leaf not in _FUSED:
            name = _HUB_NAME.get(leaf, f"{leaf}.weight" if len(s) == 2 else leaf)
            plans[leaf] = _plan(spec, pre + name, (1, 0) if len(s) == 2 else (0,))
    if "in_z" in specs:
        fused = _Source(pre + "in_proj.weight", (sum(specs[k].shape[1] for k in _FUSED), cfg.hidden_size))
        row = 0
        for leaf in _FUSED:
            plans[leaf] = _Plan(tuple(specs[leaf].shape), False, [fused], (1, 0), row0=row)
            row += specs[leaf].shape[1]
        if not cfg.use_conv_bias:
            plans["conv_b"] = _Plan(tuple(specs["conv_b"].shape), False, [], (0,), like=fused.name)
    return plans


def _plans(cfg: ModelConfig, stored: set) -> dict:
    """Pytree (structure of the params) of :class:`_Plan`; ``stored`` (canonical names present)
    selects per-expert or stacked expert tensors."""
    specs = param_specs(cfg)
    layers = []
    for i, layer in enumerate(specs["layers"]):
        pre = f"backbone.layers.{i}."
        stacked = pre + "mixer.experts.up_proj" in stored
        layers.append({"norm": _plan(layer["norm"], pre + "norm.weight", (0,)),
                       "mixer": _mixer_plans(cfg, pre + "mixer.", layer["mixer"], stacked)})
    return {"embed": _plan(specs["embed"], "backbone.embeddings.weight", (0, 1)),
            "norm_f": _plan(specs["norm_f"], "backbone.norm_f.weight", (0,)),
            "lm_head": _plan(specs["lm_head"], "lm_head.weight", (1, 0)),
            "layers": layers}


def _params_plans(cfg: ModelConfig) -> dict:
    """Pytree of :class:`_Plan` for the params layout: each leaf is the stored tensor named by
    its pytree path (:func:`_leaf_names`), same shape, no transpose."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: hasattr(x, "fp32"))
    return jax.tree.unflatten(treedef, [
        _Plan(tuple(spec.shape), spec.fp32, [_Source(name, tuple(spec.shape))], tuple(range(len(spec.shape))))
        for name, spec in zip(_leaf_names(specs), leaves)])


def _leaf_names(tree) -> list:
    """Pytree paths of the param leaves as ``layers.3.mixer.in_z`` (the params layout's names)."""
    with_paths = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: _is_plan(x) or hasattr(x, "fp32"))[0]
    return [jax.tree_util.keystr(kp, simple=True, separator=".") for kp, _ in with_paths]


def _is_plan(x) -> bool:
    return isinstance(x, _Plan)


def _full_index(shape: tuple, index=()) -> tuple:
    """``index`` (slices, maybe open-ended or fewer than dims) as explicit start:stop:step slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _hub_index(plan: _Plan, index: tuple) -> tuple:
    """The Hub index (of one source) behind our full ``index``."""
    hub: list[Any] = [0] * len(plan.sources[0].shape)
    for s, p in zip(index, plan.perm):
        hub[p] = s
    if plan.row0:
        hub[0] = slice(hub[0].start + plan.row0, hub[0].stop + plan.row0, hub[0].step)
    return tuple(hub)


def _axes(plan: _Plan) -> list:
    """Transpose axes from a Hub block (kept dims in Hub order) to our layout."""
    kept = sorted(plan.perm)
    return [kept.index(p) for p in plan.perm]


_TILE = 128


def _assign(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` (with a dtype cast), tiled when ``src`` is a transposed view: a plain
    strided copy of a transposed bf16 matrix is ~3x slower (cache misses)."""
    if src.ndim >= 2 and not src.flags.c_contiguous and min(src.shape[-2:]) > _TILE:
        for i in range(0, src.shape[-2], _TILE):
            for j in range(0, src.shape[-1], _TILE):
                out[..., i:i + _TILE, j:j + _TILE] = src[..., i:i + _TILE, j:j + _TILE]
    else:
        out[...] = src


# ---------------------------------------------------------------------------------------------
# load


@dataclasses.dataclass(frozen=True)
class _Stored:
    name: str  # name as stored
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple
    data: Any  # the safetensors slice handle (reads nothing until indexed)
    offset: Optional[int] = None  # byte offset of the tensor's data in ``file`` (None: in memory)


def _data_offsets(file: Path) -> dict[str, int]:
    """``{name: absolute byte offset of its data}`` from a safetensors header (the format: an
    8-byte little-endian header length N, N bytes of JSON with each tensor's ``data_offsets``
    relative to the end of the header). Called after ``safe_open`` validated the header."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _open(file: Path, stack: contextlib.ExitStack) -> tuple[dict[str, _Stored], str]:
    """The tensors of one safetensors file (header only; the library validates its offsets) and
    its layout (``"params"`` when its metadata says :data:`PARAMS_LAYOUT`, else ``"hub"``)."""
    try:
        f = stack.enter_context(safe_open(file, framework="numpy"))
        offsets = _data_offsets(file)
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = _Stored(name, file, sl.get_dtype(), tuple(sl.get_shape()), sl, offsets[name])
        return out, "params" if (f.metadata() or {}).get("layout") == PARAMS_LAYOUT else "hub"
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a safetensors file, or truncated or corrupt ({e})") from None


def _weight_files(path: Path) -> tuple[list[str], Optional[dict]]:
    """(safetensors file names, the index's weight_map or None)."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("not an object of file names")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index (needs a 'weight_map' object; {e!r})") from None
        return sorted(set(weight_map.values())), weight_map
    if (path / SINGLE_FILE).exists():
        return [SINGLE_FILE], None
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no {SINGLE_FILE}, no {INDEX_FILE} and no *.safetensors files")
    return found, None


def _list_tensors(path: Path, stack: contextlib.ExitStack) -> tuple[dict[str, _Stored], str]:
    """All tensors of the checkpoint by canonical name (``mtp.*`` left out; params layout: as
    stored), checked against the index if there is one, and the layout (``"hub"``/``"params"``)."""
    files, weight_map = _weight_files(path)
    tensors: dict[str, _Stored] = {}  # by stored name
    layouts = {}
    for fname in files:
        if Path(fname).name != fname or not (path / fname).is_file():
            raise CheckpointError(f"{path / INDEX_FILE}: shard {fname!r} listed in the index does not exist "
                                  f"in {path}")
        found, layouts[fname] = _open(path / fname, stack)
        for name, st in found.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is stored twice ({tensors[name].file.name} "
                                      f"and {fname})")
            tensors[name] = st
    if weight_map is not None:
        stored_in = {name: st.file.name for name, st in tensors.items()}
        for name in sorted(stored_in.keys() | weight_map.keys()):
            if weight_map.get(name) != stored_in.get(name):
                raise CheckpointError(f"{path / INDEX_FILE}: maps tensor {name!r} to {weight_map.get(name)!r} "
                                      f"but it is stored in {stored_in.get(name)!r}")
    if len(set(layouts.values())) > 1:
        raise CheckpointError(f"{path}: shards mix the Hub and the params layout ({dict(sorted(layouts.items()))})")
    layout = next(iter(layouts.values()))
    if layout == "params":
        return tensors, layout
    out: dict[str, _Stored] = {}
    for name, st in tensors.items():
        canon = _canonical(name)
        if canon in out:
            raise CheckpointError(f"{path}: tensors {out[canon].name!r} and {name!r} both map to {canon!r}")
        if canon is not None:
            out[canon] = st
    return out, layout


def _canonical(name: str) -> Optional[str]:
    """Stored name -> canonical ``backbone.``/``lm_head`` name; None for ignored (``mtp.*``) tensors."""
    for prefix in ("backbone.", "model."):
        if name.startswith(prefix):
            body = name[len(prefix):]
            if body.startswith("mtp."):
                return None
            if body == "lm_head.weight":
                return body
            return "backbone." + ("embeddings.weight" if body == "embedding.weight" else body)
    return None if name.startswith("mtp.") else name  # lm_head.weight, or unknown (reported later)


def _validate(cfg: ModelConfig, path: Path, stored: dict[str, _Stored], plans) -> None:
    """One CheckpointError listing every problem of the stored tensors against the plans
    (missing, unknown, shape, dtype)."""
    problems, used = [], set()
    for plan in jax.tree.leaves(plans, is_leaf=_is_plan):
        for src in plan.sources:
            st = stored.get(src.name)
            if st is None:
                problems.append(f"missing tensor {src.name!r} (expected shape {list(src.shape)})")
                continue
            used.add(src.name)
            where = f"{st.name!r} in {st.file.name}"
            if st.shape != src.shape:
                problems.append(f"tensor {where}: shape {list(st.shape)}, expected {list(src.shape)}")
            if st.dtype not in _DTYPES:
                problems.append(f"tensor {where}: dtype {st.dtype} not supported (expected BF16, F16 or F32)")
    for canon, st in sorted(stored.items()):
        if canon not in used:
            problems.append(f"unknown tensor {st.name!r} in {st.file.name} (not part of the "
                            f"{cfg.pattern!r} NemotronH layout)")
    head = f"cannot load checkpoint {path}: "
    if len(problems) == 1:
        raise CheckpointError(head + problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{head}{len(problems)} problems:\n  - " + "\n  - ".join(problems[:20]) + more)


def _read(stored: dict[str, _Stored], plan: _Plan, index: tuple, dtype, alloc=None) -> np.ndarray:
    """Block ``index`` of the leaf in our layout, as a new C-contiguous ``dtype`` array, reading
    only the Hub bytes behind it (``get_slice(name)[hub_index]``). ``alloc(shape, dtype)``: where
    a whole tensor read as stored goes (default a fresh aligned buffer)."""
    index = _full_index(plan.shape, index)
    shape = tuple(len(range(s.start, s.stop, s.step)) for s in index)
    if not plan.sources:
        return np.zeros(shape, dtype)
    st = stored[plan.sources[0].name]
    if (shape == plan.shape and st.offset is not None and len(plan.sources) == 1 and not plan.row0
            and plan.perm == tuple(range(len(shape)))):
        return _read_whole(st, dtype, alloc)  # the whole tensor as stored: its bytes straight from the file

    def block(src, index):  # what ``index`` covers of one source, as a view in our layout
        return stored[src.name].data[_hub_index(plan, index)].transpose(_axes(plan))

    out = _aligned_empty(shape, dtype)
    if len(plan.sources) > 1:  # per-expert tensors: our dim 0 picks the tensor
        for n, src in enumerate(plan.sources[index[0]]):
            _assign(out[n], block(src, index[1:]))
        return out
    b = block(plan.sources[0], index)
    if b.dtype == dtype and b.flags.c_contiguous:
        return b  # the library's fresh array already is the block
    _assign(out, b)
    return out


_ALIGN = 64


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` with its data ``_ALIGN``-byte aligned: JAX on CPU adopts such a
    host buffer (``device_put(..., may_alias=True)``) instead of copying it."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


class HostBuffers:
    """Host memory reused across loads (the server's disk weight updates): up to ``slabs``
    aligned slabs, each holding every whole tensor of one load back to back.

    A tensor read into fresh host memory pays a page fault per page (on a VM as much as the read
    itself, or more); read into a slab that an earlier load already touched it costs the copy
    from the page cache. :meth:`take` hands out a *free* slab, one nothing references any more
    (a ``jax.Array`` adopted from it by ``device_put(..., may_alias=True)`` keeps it referenced
    until the array and every computation on it are gone), else a new one. An engine serving
    version N from slab A thus reads version N+1 into slab B while A keeps serving, and N+2 back
    into A once N is dropped (double-buffering); a slab still held elsewhere (e.g. the old
    params kept by a caller) is never written. Thread-safe."""

    def __init__(self, slabs: int = 2):
        if slabs < 1:
            raise ValueError(f"slabs: must be >= 1, got {slabs}")
        self.slabs = slabs
        self._pool: list = []  # raw uint8 slabs; nothing else may hold a slab that is free
        self._lock = threading.Lock()
        self.reused = 0  # slab requests answered with an already-touched slab
        self.allocated = 0  # slabs allocated
        self.last_gc = (0, 0.0)  # (oldest generation collected, seconds) by the last slab request

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self._pool[i]) == 2  # the pool's list + the argument

    def _slab(self, nbytes: int, touch: bool) -> np.ndarray:
        """A free slab of at least ``nbytes`` (+ alignment), else a new one (``touch``: every
        page faulted in now); it goes (back) to the end of the pool."""
        with self._lock:
            # a dropped jax.Array lets go of its host buffer through a young reference cycle: a
            # generation-0 collection finds it (cheap); a full one only before allocating
            found = None
            t0 = time.perf_counter()
            for generation in (0, 2):
                gc.collect(generation)
                self.last_gc = (generation, time.perf_counter() - t0)
                found = next((i for i in range(len(self._pool))
                              if self._free(i) and self._pool[i].size >= nbytes + _ALIGN), None)
                if found is not None:
                    break
            if found is not None:
                self.reused += 1
                raw = self._pool.pop(found)
            else:
                if len(self._pool) >= self.slabs:  # forget one (a busy one: its holders free it)
                    busy = [i for i in range(len(self._pool)) if not self._free(i)]
                    self._pool.pop(busy[0] if busy else 0)
                raw = np.empty(nbytes + _ALIGN, np.uint8)
                if touch:
                    raw[::4096] = 0
                self.allocated += 1
            self._pool.append(raw)
            return raw

    def reserve(self, like) -> None:
        """Allocate and touch a slab for a load of arrays shaped like the leaves of ``like`` now
        (e.g. in the background after start-up), so that the first load into this pool also
        reads into touched memory."""
        self._slab(_slab_bytes((x.shape, x.dtype) for x in jax.tree.leaves(like)), touch=True)

    def take(self, nbytes: int) -> Callable[[tuple, Any], np.ndarray]:
        """An ``alloc(shape, dtype)`` carving aligned arrays out of one slab of at least
        ``nbytes`` (plus alignment; past its end fresh buffers): the slab returns to the pool
        and is reused once no array carved from it is referenced any more."""
        raw = self._slab(nbytes, touch=False)
        pos = (-raw.ctypes.data) % _ALIGN

        def alloc(shape: tuple, dtype) -> np.ndarray:
            nonlocal pos
            dtype = np.dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if pos + n > raw.size:
                return _aligned_empty(shape, dtype)
            out = raw[pos:pos + n].view(dtype).reshape(shape)
            pos += n + (-n) % _ALIGN
            return out
        return alloc


def _slab_bytes(shapes_dtypes) -> int:
    """Slab bytes for whole tensors ``[(shape, dtype)]`` carved one after another (each start
    ``_ALIGN``-aligned)."""
    sizes = (int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in shapes_dtypes)
    return sum(n + (-n) % _ALIGN for n in sizes)


def _read_whole(st: _Stored, dtype, alloc=None) -> np.ndarray:
    """The whole stored tensor ``st`` as a ``dtype`` array: its bytes read (``readinto``, no
    mmap, no intermediate copy) into an aligned buffer (``alloc(shape, dtype)``, default a fresh
    one), cast only when ``dtype`` differs."""
    buf = (alloc or _aligned_empty)(st.shape, _DTYPES[st.dtype])
    view = memoryview(buf.reshape(-1).view(np.uint8))
    with open(st.file, "rb", buffering=0) as f:
        f.seek(st.offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{st.file}: tensor {st.name!r} is truncated")
            got += n
    return buf if buf.dtype == dtype else buf.astype(dtype)


def _materialize(stored, plan: _Plan, dtype, sharding, alloc=None) -> jax.Array:
    if sharding is None:
        return jax.device_put(_read(stored, plan, (), dtype, alloc), may_alias=True)
    cache: dict = {}  # replicated blocks are read once

    def cb(index):
        key = tuple((s.start, s.stop, s.step) for s in _full_index(plan.shape, index))
        if key not in cache:
            cache[key] = _read(stored, plan, index, dtype)
        return cache[key]

    return jax.make_array_from_callback(plan.shape, sharding, cb)


def _load_config(path: Path) -> ModelConfig:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        cfg = ModelConfig.from_json_file(cfg_file)
    except ModelConfigError as e:
        raise CheckpointError(f"invalid config: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
    return dataclasses.replace(cfg, hf_source=str(path))


def load_checkpoint(path, *, dtype=None, sharding=None,
                    host_buffers: Optional[HostBuffers] = None) -> tuple[ModelConfig, dict]:
    """Loads a NemotronH checkpoint directory, Hub layout or params layout (module doc; told
    apart by the safetensors metadata).

    Args:
      path: directory with ``config.json`` and safetensors weights (single file or sharded + index).
      dtype: ``None`` keeps each tensor's stored dtype (``A_log``, ``D`` and
        ``e_score_correction_bias`` are always fp32); otherwise every other leaf is cast to it.
      sharding: ``None`` (default device), one ``jax.sharding.Sharding`` for every leaf, or a
        pytree of shardings (``None`` leaves = default device) with the structure of the params.
        Each device reads only its own slice of each tensor.
      host_buffers: a :class:`HostBuffers` pool; without a ``sharding`` every tensor read as
        stored goes into one of its slabs (already touched memory when one is free) instead of
        fresh host memory; on CPU the params then live in that slab until dropped.

    Returns:
      ``(cfg, params)``; ``cfg.hf_source`` is set to ``path`` so that :func:`save_checkpoint`
      copies the original config and tokenizer files.

    Raises:
      CheckpointError: malformed config.json, index or safetensors file, a missing / unknown
        tensor, a shape mismatch or a non-float dtype. All headers are validated before any
        tensor is read, and nothing is returned unless every leaf loaded.
    """
    path = Path(path)
    target = None if dtype is None else jnp.dtype(dtype)
    if target is not None and not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"load_checkpoint: dtype must be a floating dtype, got {target}")
    cfg = _load_config(path)
    with contextlib.ExitStack() as stack:
        stored, layout = _list_tensors(path, stack)
        try:
            return cfg, _build_params(cfg, path, stored, target, sharding, layout, host_buffers)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path}: read failed ({e})") from None


def _build_params(cfg: ModelConfig, where, stored: dict[str, _Stored], target, sharding,
                  layout: str = "hub", host_buffers: Optional[HostBuffers] = None) -> dict:
    """Validate ``stored`` (by canonical name, or by leaf name in the params layout) against
    ``cfg`` and materialise the param pytree (unsharded whole tensors into a slab of
    ``host_buffers`` when given)."""
    plans = _params_plans(cfg) if layout == "params" else _plans(cfg, set(stored))
    _validate(cfg, where, stored, plans)
    leaves, treedef = jax.tree.flatten(plans, is_leaf=_is_plan)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding] * len(leaves)
    else:
        try:
            shardings = treedef.flatten_up_to(sharding)
        except (ValueError, TypeError) as e:
            raise ValueError(f"load_checkpoint: `sharding` must be None, a Sharding, or a pytree with "
                             f"the structure of the params ({e})") from None
    dts = []
    for plan in leaves:
        stored_dt = _DTYPES[stored[plan.sources[0].name if plan.sources else plan.like].dtype]
        dts.append(np.dtype(np.float32) if plan.fp32 else (target if target is not None else stored_dt))
    alloc = None
    if host_buffers is not None and all(shd is None for shd in shardings):
        alloc = host_buffers.take(_slab_bytes((plan.shape, dt) for plan, dt in zip(leaves, dts)))
    out = [_materialize(stored, plan, dt, shd, alloc) for plan, dt, shd in zip(leaves, dts, shardings)]
    return jax.tree.unflatten(treedef, out)


def params_from_hub_tensors(tensors: dict, cfg: ModelConfig, *, dtype=None, sharding=None) -> dict:
    """The param pytree of ``cfg`` from in-memory Hub tensors ``{Hub name: np.ndarray}`` (the
    names and layouts :func:`save_checkpoint` writes; e.g. received over a weight-sync channel).
    Same validation, ``dtype`` and ``sharding`` semantics as :func:`load_checkpoint`."""
    target = None if dtype is None else jnp.dtype(dtype)
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    stored: dict[str, _Stored] = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        canon = _canonical(name)
        if canon is None:
            continue
        if canon in stored:
            raise CheckpointError(f"tensors {stored[canon].name!r} and {name!r} both map to {canon!r}")
        stored[canon] = _Stored(name, Path("<memory>"), names.get(arr.dtype, str(arr.dtype)),
                                tuple(arr.shape), arr)
    return _build_params(cfg, "<memory>", stored, target, sharding)


def hub_tensors(params, cfg: ModelConfig) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """``[(Hub name, nbytes, produce)]``, one per tensor :func:`save_checkpoint` would write, in
    file order; ``produce()`` builds that tensor on the host (Hub layout and dtype) on demand,
    so a caller can stream them in buckets without holding all of them."""
    return _hub_tensors(params, cfg)


# ---------------------------------------------------------------------------------------------
# save


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError("save_checkpoint: params span several processes; gather them to one host first")
    return np.asarray(jax.device_get(x))


def _hub_tensors(params, cfg: ModelConfig) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """``(Hub name, nbytes, produce)`` for each Hub tensor of ``params`` (the per-expert load plans
    run backwards; ``produce()`` makes the array). Checks the params' layout and dtypes first."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(_plans(cfg, set()), is_leaf=_is_plan)
    paths = [jax.tree_util.keystr(kp, simple=True, separator=".") for kp, _ in with_paths]
    plans = [plan for _, plan in with_paths]
    try:
        xs = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"save_checkpoint: params do not have the layout of cfg ({cfg.pattern!r}): {e}") from None
    host = functools.lru_cache(maxsize=1)(lambda k: _host(xs[k]))  # a stacked expert leaf: once
    parts: dict[str, list] = {}  # Hub name -> [(leaf k, expert j or None)]
    shapes, dtypes = {}, {}
    for k, (plan, x, leaf) in enumerate(zip(plans, xs, paths)):
        if tuple(getattr(x, "shape", ())) != plan.shape:
            raise CheckpointError(f"save_checkpoint: param {leaf} has shape {tuple(getattr(x, 'shape', ()))}, "
                                  f"expected {plan.shape}")
        if not plan.sources:
            if np.any(host(k) != 0):
                raise CheckpointError(f"save_checkpoint: param {leaf} is non-zero but cfg.use_conv_bias is "
                                      "False (the Hub layout would drop it)")
            continue
        dt = np.dtype(np.float32) if plan.fp32 else np.dtype(x.dtype)
        if dt not in _DTYPES.values():
            raise CheckpointError(f"save_checkpoint: param {leaf} has dtype {dt}, expected bfloat16, float16 "
                                  "or float32")
        for j, src in enumerate(plan.sources):
            dtypes[src.name] = np.dtype(jnp.promote_types(dtypes.get(src.name, dt), dt))
            shapes[src.name] = src.shape
            parts.setdefault(src.name, []).append((k, j if len(plan.sources) > 1 else None))

    def produce(name):
        out = np.empty(shapes[name], dtypes[name])
        for k, j in parts[name]:
            a = host(k) if j is None else host(k)[j]
            b = a.transpose(np.argsort(_axes(plans[k])))  # in Hub dim order
            if b.shape == out.shape and b.dtype == out.dtype and b.flags.c_contiguous:
                return b  # the host copy already is the Hub tensor
            _assign(out[_hub_index(plans[k], _full_index(a.shape))], b)
        return out

    return [(name, int(np.prod(shapes[name])) * dtypes[name].itemsize, functools.partial(produce, name))
            for name in parts]


def _params_tensors(params, cfg: ModelConfig) -> list[tuple[str, int, Callable[[], np.ndarray]]]:
    """``(leaf name, nbytes, produce)`` per param leaf for the params layout: ``produce()`` is
    the leaf's host buffer as it is (no transpose; on CPU no copy). Checks the layout and dtypes."""
    plans, treedef = jax.tree.flatten(_params_plans(cfg), is_leaf=_is_plan)
    try:
        xs = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"save_checkpoint: params do not have the layout of cfg ({cfg.pattern!r}): {e}") from None
    out = []
    for plan, x in zip(plans, xs):
        name = plan.sources[0].name
        if tuple(getattr(x, "shape", ())) != plan.shape:
            raise CheckpointError(f"save_checkpoint: param {name} has shape {tuple(getattr(x, 'shape', ()))}, "
                                  f"expected {plan.shape}")
        dt = np.dtype(x.dtype)
        if dt not in _DTYPES.values():
            raise CheckpointError(f"save_checkpoint: param {name} has dtype {dt}, expected bfloat16, float16 "
                                  "or float32")
        out.append((name, int(np.prod(plan.shape)) * dt.itemsize, functools.partial(_host, x)))
    return out


def _write_shards(tmp: Path, tensors: list, max_shard_bytes: float, metadata: dict) -> None:
    """``model.safetensors``, or shards plus the index; one shard's tensors on the host at a time."""
    shards: list[list] = [[]]
    size = 0
    for name, nbytes, produce in tensors:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, nbytes, produce))
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for fname, shard in zip(names, shards):
        save_file({name: produce() for name, _, produce in shard}, tmp / fname, metadata=metadata)
        with open(tmp / fname, "rb") as f:
            os.fsync(f.fileno())
    if n > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        index = {"metadata": {"total_size": sum(nbytes for _, nbytes, _ in tensors)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(tmp: Path, cfg: ModelConfig, src: Optional[Path]) -> None:
    """Writes ``tmp/config.json``: ``cfg.to_hf_dict()`` without ``src``; else ``src``'s config.json,
    verbatim when it describes ``cfg`` or with the differing fields rewritten, plus its tokenizer files."""
    if src is None:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        return
    file = src / "config.json"
    try:
        raw = file.read_bytes()
        d = json.loads(raw)
        src_cfg = ModelConfig.from_hf_dict(d)
    except (OSError, json.JSONDecodeError, ModelConfigError) as e:
        raise CheckpointError(f"save_checkpoint: cannot use {file} of cfg.hf_source ({e}); "
                              "set hf_source=None to write a fresh config.json") from None
    diff = [f.name for f in dataclasses.fields(ModelConfig)
            if f.name not in _JAX_ONLY and getattr(src_cfg, f.name) != getattr(cfg, f.name)]
    if not diff:
        (tmp / "config.json").write_bytes(raw)
    else:
        new = cfg.to_hf_dict()
        for f in diff:
            for alias in [a for a, t in _HF_ALIASES.items() if t == f]:
                d.pop(alias, None)
            if f != "pattern":
                d[f] = new[f]
                continue
            for k, v in (("hybrid_override_pattern", cfg.pattern), ("layers_block_type", new["layers_block_type"]),
                         ("layer_types", new["layers_block_type"]), ("num_hidden_layers", cfg.num_hidden_layers)):
                if k in d:
                    d[k] = v
        warnings.warn(f"save_checkpoint: cfg differs from {file} in {diff}; writing its config.json with "
                      "those fields updated", stacklevel=3)
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != "config.json" and any(fnmatch.fnmatch(p.name, pat)
                                                           for pat in TOKENIZER_FILE_PATTERNS):
            shutil.copyfile(p, tmp / p.name)


def save_checkpoint(params, cfg: ModelConfig, path, *, max_shard_bytes: float = 5e9, layout: str = "hub") -> None:
    """Writes ``params`` as a Hub-layout checkpoint directory at ``path`` (replacing it atomically).

    ``layout="params"`` writes the params layout instead (module doc: one tensor per leaf, as
    held, no transposes; for :func:`load_checkpoint` only, e.g. the trainer -> server disk sync);
    everything else below (config, shards, atomic rename) is the same.

    Tensors use the Hub names, fused ``in_proj``, ``conv1d.weight`` ``[C, 1, K]`` and per-expert
    weights; ``A_log``, ``D``, ``e_score_correction_bias`` are written fp32, every other tensor in
    its param dtype (bf16, fp16 or fp32). Files: ``model.safetensors`` when everything fits in one
    shard of ``max_shard_bytes``, else ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``; at most one shard's tensors are held on the host. With
    ``cfg.hf_source`` set, ``config.json`` (verbatim unless ``cfg`` changed an HF field), the
    generation config and tokenizer files are copied from there; otherwise ``cfg.to_hf_dict()`` is
    written. Everything goes to a temporary sibling directory that is renamed into place at the
    end, so a crash leaves any previous checkpoint intact.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"save_checkpoint: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "params":
        tensors, metadata = _params_tensors(params, cfg), {"format": "np", "layout": PARAMS_LAYOUT}
    else:
        tensors, metadata = _hub_tensors(params, cfg), {"format": "pt"}
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save_checkpoint: {path} exists and is not a directory")
    src = Path(cfg.hf_source) if cfg.hf_source else None
    if src is not None and not src.is_dir():
        raise CheckpointError(f"save_checkpoint: cfg.hf_source {src} is not a directory (set hf_source=None "
                              "to write a fresh config.json without tokenizer files)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_config(tmp, cfg, src)
        _write_shards(tmp, tensors, max_shard_bytes, metadata)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
