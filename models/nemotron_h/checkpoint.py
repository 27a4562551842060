"""Hugging Face Hub checkpoint I/O for NemotronH (model.md §9).

``load_checkpoint(path)`` reads a Hub-layout directory (``config.json`` plus ``model.safetensors`` or
sharded ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``) into the param
pytree of ``params.py``; ``save_checkpoint(params, cfg, path)`` writes the same layout back.

Hub layout versus ours:

* names start with ``backbone.`` (``model.`` and the singular ``backbone.embedding.weight`` are
  accepted on load; ``mtp.*`` tensors are ignored); ``lm_head.weight`` has no prefix;
* PyTorch ``[out, in]`` matrices become ``[in, out]``;
* the fused Mamba ``in_proj.weight`` ``[Di + conv_dim + Hm, H]`` (rows z | x | B | C | dt) is split
  into ``in_z``, ``in_x``, ``in_B``, ``in_C``, ``in_dt``;
* ``conv1d.weight`` ``[conv_dim, 1, K]`` becomes ``conv_w`` ``[K, conv_dim]``;
* per-expert ``mixer.experts.{j}.up_proj.weight`` / ``down_proj.weight`` are stacked into
  ``experts_up`` ``[E, H, I]`` / ``experts_down`` ``[E, I, H]`` (transformers-5 stacked tensors
  ``mixer.experts.up_proj`` ``[E, I, H]`` / ``down_proj`` ``[E, H, I]`` are accepted too);
* ``A_log``, ``D`` and ``e_score_correction_bias`` are fp32.

Safetensors files are parsed directly (8-byte header length, JSON header, raw little-endian data)
and memory-mapped, so a tensor is read only when its leaf is materialized, bf16 needs no torch or
framework round trip (``ml_dtypes.bfloat16``), and with a ``sharding`` each device reads only its
own slice (``jax.make_array_from_callback``). At most one leaf is held on the host at a time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig, ModelConfigError, _HF_ALIASES, _JAX_ONLY
from .params import ParamSpec, param_specs

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "TOKENIZER_FILE_PATTERNS"]


class CheckpointError(ValueError):
    """A checkpoint directory (or the params being exported) is invalid; the message names the
    tensor or config key and the file."""


# safetensors dtype names -> numpy dtypes we load. Anything else is rejected.
_FLOAT_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16),
                 "F32": np.dtype(np.float32)}
_ST_NAME = {v: k for k, v in _FLOAT_DTYPES.items()}
# Byte sizes of every safetensors dtype (to validate offsets of tensors we then reject by dtype).
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2,
                "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                "F64": 8, "C64": 8}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied verbatim from the source checkpoint on export (besides config.json).
TOKENIZER_FILE_PATTERNS = (
    "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "*.jinja", "chat_template*", "preprocessor_config.json",
    "processor_config.json", "*.py",
)


# ---------------------------------------------------------------------------------------------
# safetensors headers


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    name: str  # full name as stored
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple
    start: int  # absolute byte offsets in the file
    end: int


def _read_header(file: Path) -> dict[str, _TensorRef]:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 1 << 30):
                raise CheckpointError(f"{file}: corrupt safetensors header length {n}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
        if dt not in _ST_ITEMSIZE:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dt!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dt]
        if any(s < 0 for s in shape) or e - b != nbytes or b < 0 or base + e > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} has inconsistent data offsets {[b, e]} for shape "
                f"{list(shape)} {dt} (file size {size}; truncated file?)")
        out[name] = _TensorRef(name, file, dt, shape, base + b, base + e)
    return out


def _list_tensors(path: Path) -> dict[str, _TensorRef]:
    """All tensors of the checkpoint by stored name, validated against the index if present."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index (needs a 'weight_map' object; {e!r})") from None
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{path}: no {SINGLE_FILE}, no {INDEX_FILE} and no *.safetensors files")
        weight_map, files = None, found
    tensors: dict[str, _TensorRef] = {}
    for fname in files:
        file = path / fname
        if Path(fname).name != fname or not file.is_file():
            raise CheckpointError(f"{index}: shard {fname!r} listed in the index does not exist in {path}")
        for name, ref in _read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is stored twice ({tensors[name].file.name} "
                                      f"and {fname})")
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointError(f"{file}: tensor {name!r} is not mapped to this file by {INDEX_FILE} "
                                      f"(index says {weight_map.get(name)!r})")
            tensors[name] = ref
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{index}: tensor {name!r} is listed for {fname} but that file does not "
                                      "contain it")
    return tensors


def _canonical(name: str) -> Optional[str]:
    """Stored name -> canonical ``backbone.``/``lm_head`` name; None for ignored (``mtp.*``) tensors."""
    body = None
    for prefix in ("backbone.", "model."):
        if name.startswith(prefix):
            body = name[len(prefix):]
            break
    if body is None:
        if name.startswith("mtp."):
            return None
        return name  # lm_head.weight, or unknown (reported later)
    if body.startswith("mtp."):
        return None
    if body == "embedding.weight":
        body = "embeddings.weight"
    if body == "lm_head.weight":
        return "lm_head.weight"
    return "backbone." + body


# ---------------------------------------------------------------------------------------------
# Leaf plans: how each param leaf maps to Hub tensors


@dataclasses.dataclass
class _Source:
    name: str  # canonical Hub name
    shape: tuple  # Hub shape


@dataclasses.dataclass
class _Plan:
    """One param leaf: its Hub sources and how an index into our layout reads them."""
    shape: tuple  # our shape
    fp32: bool
    sources: list  # list[_Source]; alternatives handled before planning
    kind: str  # "copy", "T" (transpose), "rows" (transposed slice of rows), "conv", "experts",
    #            "experts_stacked", "zeros"
    row0: int = 0
    like: Optional[str] = None  # "zeros" only: take the dtype of this tensor when dtype=None


def _layer_plans(cfg: ModelConfig, i: int, kind: str, stacked_experts: bool) -> dict:
    pre = f"backbone.layers.{i}.mixer."
    H = cfg.hidden_size
    specs = param_specs(cfg)["layers"][i]["mixer"]

    def T(name, leaf):  # Hub [out, in] -> ours [in, out]
        s = specs[leaf].shape
        return _Plan(s, specs[leaf].fp32, [_Source(pre + name, (s[1], s[0]))], "T")

    def vec(name, leaf):
        s = specs[leaf].shape
        return _Plan(s, specs[leaf].fp32, [_Source(pre + name, s)], "copy")

    if kind == "M":
        Di, GN, Hm, C, K = cfg.d_inner, cfg.n_groups * cfg.ssm_state_size, cfg.mamba_num_heads, cfg.conv_dim, cfg.conv_kernel
        fused = _Source(pre + "in_proj.weight", (Di + C + Hm, H))
        plans = {}
        row = 0
        for leaf, width in (("in_z", Di), ("in_x", Di), ("in_B", GN), ("in_C", GN), ("in_dt", Hm)):
            plans[leaf] = _Plan((H, width), False, [fused], "rows", row0=row)
            row += width
        plans["conv_w"] = _Plan((K, C), False, [_Source(pre + "conv1d.weight", (C, 1, K))], "conv")
        plans["conv_b"] = (vec("conv1d.bias", "conv_b") if cfg.use_conv_bias
                           else _Plan((C,), False, [], "zeros", like=fused.name))
        plans["dt_bias"] = vec("dt_bias", "dt_bias")
        plans["A_log"] = vec("A_log", "A_log")
        plans["D"] = vec("D", "D")
        plans["norm"] = vec("norm.weight", "norm")
        plans["out_proj"] = T("out_proj.weight", "out_proj")
        return plans
    if kind == "*":
        return {k: T(f"{k}.weight", k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if kind == "-":
        return {"up_proj": T("up_proj.weight", "up_proj"), "down_proj": T("down_proj.weight", "down_proj")}
    # E
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    plans = {"gate": T("gate.weight", "gate"),
             "e_score_correction_bias": vec("gate.e_score_correction_bias", "e_score_correction_bias")}
    if stacked_experts:
        plans["experts_up"] = _Plan((E, H, I), False, [_Source(pre + "experts.up_proj", (E, I, H))],
                                    "experts_stacked")
        plans["experts_down"] = _Plan((E, I, H), False, [_Source(pre + "experts.down_proj", (E, H, I))],
                                      "experts_stacked")
    else:
        plans["experts_up"] = _Plan((E, H, I), False, [
            _Source(pre + f"experts.{j}.up_proj.weight", (I, H)) for j in range(E)], "experts")
        plans["experts_down"] = _Plan((E, I, H), False, [
            _Source(pre + f"experts.{j}.down_proj.weight", (H, I)) for j in range(E)], "experts")
    if cfg.n_shared_experts:
        plans["shared_up"] = T("shared_experts.up_proj.weight", "shared_up")
        plans["shared_down"] = T("shared_experts.down_proj.weight", "shared_down")
    return plans


def _plans(cfg: ModelConfig, stored: set) -> dict:
    """Pytree (structure of the params) of :class:`_Plan`."""
    H, V = cfg.hidden_size, cfg.vocab_size
    layers = []
    for i, kind in enumerate(cfg.pattern):
        stacked = f"backbone.layers.{i}.mixer.experts.up_proj" in stored
        layers.append({"norm": _Plan((H,), False, [_Source(f"backbone.layers.{i}.norm.weight", (H,))], "copy"),
                       "mixer": _layer_plans(cfg, i, kind, stacked)})
    return {
        "embed": _Plan((V, H), False, [_Source("backbone.embeddings.weight", (V, H))], "copy"),
        "norm_f": _Plan((H,), False, [_Source("backbone.norm_f.weight", (H,))], "copy"),
        "lm_head": _Plan((H, V), False, [_Source("lm_head.weight", (V, H))], "T"),
        "layers": layers,
    }


def _is_plan(x) -> bool:
    return isinstance(x, _Plan)


class _Reader:
    """Memory-maps checkpoint files lazily and reads (slices of) tensors as numpy views."""

    def __init__(self, refs: dict[str, _TensorRef]):
        self.refs = refs
        self._maps: dict[Path, np.memmap] = {}

    def view(self, name: str) -> np.ndarray:
        ref = self.refs[name]
        mm = self._maps.get(ref.file)
        if mm is None:
            mm = self._maps[ref.file] = np.memmap(ref.file, dtype=np.uint8, mode="r")
        return mm[ref.start:ref.end].view(_FLOAT_DTYPES[ref.dtype].newbyteorder("<")).reshape(ref.shape)

    def read(self, plan: _Plan, index: tuple, dtype) -> np.ndarray:
        """Our-layout slice ``index`` (tuple of slices, one per dim) of ``plan``, as a fresh
        C-contiguous array of ``dtype`` (never a view of the file)."""
        index = tuple(index) + (slice(None),) * (len(plan.shape) - len(index))
        k = plan.kind
        if k == "zeros":
            return np.zeros(_sliced_shape(plan.shape, index), dtype)
        if k == "copy":
            src = self.view(plan.sources[0].name)[index]
        elif k == "T":
            src = self.view(plan.sources[0].name)[index[1], index[0]].T
        elif k == "rows":
            r = index[1].indices(plan.shape[1])
            rows = slice(plan.row0 + r[0], plan.row0 + r[1], r[2])
            src = self.view(plan.sources[0].name)[rows, index[0]].T
        elif k == "conv":  # [C, 1, K] -> [K, C]
            src = self.view(plan.sources[0].name)[index[1], 0, index[0]].T
        elif k == "experts_stacked":  # [E, out, in] -> [E, in, out]
            src = self.view(plan.sources[0].name)[index[0], index[2], index[1]].transpose(0, 2, 1)
        elif k == "experts":
            js = range(*index[0].indices(plan.shape[0]))
            out = np.empty(_sliced_shape(plan.shape, index), dtype)
            for n, j in enumerate(js):
                _assign(out[n], self.view(plan.sources[j].name)[index[2], index[1]].T)
            return out
        else:  # pragma: no cover
            raise AssertionError(k)
        out = np.empty(src.shape, dtype)
        _assign(out, src)
        return out

    def close(self):
        self._maps.clear()


_TILE = 64


def _assign(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src`` (with a dtype cast), tiled when ``src`` is a transposed view: a plain
    strided copy of a transposed bf16 matrix is ~3x slower (cache misses)."""
    if src.ndim >= 2 and not src.flags.c_contiguous and min(src.shape[-2:]) > _TILE:
        for i in range(0, src.shape[-2], _TILE):
            for j in range(0, src.shape[-1], _TILE):
                out[..., i:i + _TILE, j:j + _TILE] = src[..., i:i + _TILE, j:j + _TILE]
    else:
        out[...] = src


def _sliced_shape(shape, index):
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def _validate(cfg: ModelConfig, path: Path, refs_by_canon: dict[str, _TensorRef], plans) -> list[str]:
    problems = []
    used = set()
    for plan in jax.tree.leaves(plans, is_leaf=_is_plan):
        for src in plan.sources:
            ref = refs_by_canon.get(src.name)
            if ref is None:
                problems.append(f"missing tensor {src.name!r} (expected shape {list(src.shape)})")
                continue
            used.add(src.name)
            where = f"{ref.name!r} in {ref.file.name}"
            if ref.shape != tuple(src.shape):
                problems.append(f"tensor {where}: shape {list(ref.shape)}, expected {list(src.shape)}")
            if ref.dtype not in _FLOAT_DTYPES:
                problems.append(f"tensor {where}: dtype {ref.dtype} not supported (expected BF16, F16 or F32)")
    for canon, ref in sorted(refs_by_canon.items()):
        if canon not in used:
            problems.append(f"unknown tensor {ref.name!r} in {ref.file.name} (not part of the "
                            f"{cfg.pattern!r} NemotronH layout)")
    return problems


# ---------------------------------------------------------------------------------------------
# load


def load_checkpoint(path, *, dtype=None, sharding=None) -> tuple[ModelConfig, dict]:
    """Loads a Hub-layout NemotronH checkpoint directory.

    Args:
      path: directory with ``config.json`` and safetensors weights (single file or sharded + index).
      dtype: ``None`` keeps each tensor's stored dtype (``A_log``, ``D`` and
        ``e_score_correction_bias`` are always fp32); otherwise every other leaf is cast to it.
      sharding: ``None`` (default device), one ``jax.sharding.Sharding`` for every leaf, or a
        pytree of shardings (``None`` leaves = default device) with the structure of the params.
        Each device reads only its own slice of each tensor.

    Returns:
      ``(cfg, params)``; ``cfg.hf_source`` is set to ``path`` so that :func:`save_checkpoint`
      copies the original config and tokenizer files.

    Raises:
      CheckpointError: malformed config.json or index, a missing / unknown tensor, a shape
        mismatch or a non-float dtype. All headers are validated before any tensor is read, and
        nothing is returned unless every leaf loaded.
    """
    path = Path(path)
    target = None if dtype is None else jnp.dtype(dtype)
    if target is not None and not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"load_checkpoint: dtype must be a floating dtype, got {target}")
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
    cfg = dataclasses.replace(cfg, hf_source=str(path))

    refs = _list_tensors(path)
    by_canon: dict[str, _TensorRef] = {}
    for name, ref in refs.items():
        canon = _canonical(name)
        if canon is None:
            continue
        if canon in by_canon:
            raise CheckpointError(f"{path}: tensors {by_canon[canon].name!r} and {name!r} both map to {canon!r}")
        by_canon[canon] = ref
    plans = _plans(cfg, set(by_canon))
    problems = _validate(cfg, path, by_canon, plans)
    if problems:
        head = f"cannot load checkpoint {path}: "
        if len(problems) == 1:
            raise CheckpointError(head + problems[0])
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{head}{len(problems)} problems:\n  - {shown}{more}")

    leaves, treedef = jax.tree.flatten(plans, is_leaf=_is_plan)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding] * len(leaves)
    else:
        try:
            shardings = treedef.flatten_up_to(sharding)
        except (ValueError, TypeError) as e:
            raise ValueError(f"load_checkpoint: `sharding` must be None, a Sharding, or a pytree with "
                             f"the structure of the params ({e})") from None
    reader = _Reader(by_canon)
    out = []
    try:
        for plan, shd in zip(leaves, shardings):
            if plan.fp32:
                dt = np.dtype(np.float32)
            elif target is not None:
                dt = target
            elif plan.sources:
                dt = _FLOAT_DTYPES[by_canon[plan.sources[0].name].dtype]
            else:  # zero conv bias of a use_conv_bias=False checkpoint: the in_proj dtype
                dt = _FLOAT_DTYPES[by_canon[plan.like].dtype]
            out.append(_materialize(reader, plan, dt, shd))
    except OSError as e:
        raise CheckpointError(f"{path}: read failed ({e})") from None
    finally:
        reader.close()
    return cfg, jax.tree.unflatten(treedef, out)


def _materialize(reader: _Reader, plan: _Plan, dt, sharding) -> jax.Array:
    if sharding is None:
        full = tuple(slice(None) for _ in plan.shape)
        return jax.device_put(reader.read(plan, full, dt))
    cache: dict = {}

    def cb(index):
        index = tuple(index) + (slice(None),) * (len(plan.shape) - len(index))
        key = tuple(s.indices(n) for s, n in zip(index, plan.shape))
        if key not in cache:
            cache[key] = reader.read(plan, index, dt)
        return cache[key]

    return jax.make_array_from_callback(plan.shape, sharding, cb)


# ---------------------------------------------------------------------------------------------
# save


@dataclasses.dataclass
class _Out:
    name: str
    shape: tuple
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise CheckpointError("save_checkpoint: params span several processes; gather them to one host first")
    return np.asarray(jax.device_get(x))


def _contig(a: np.ndarray, dt) -> np.ndarray:
    out = np.empty(a.shape, dt)
    _assign(out, a)
    return out


def _fuse_rows(parts, dt) -> np.ndarray:
    """Our [H, w_k] projections -> the Hub's fused [sum w_k, H] ``in_proj.weight``."""
    out = np.empty((sum(p.shape[1] for p in parts), parts[0].shape[0]), dt)
    row = 0
    for p in parts:
        _assign(out[row:row + p.shape[1]], _host(p).T)
        row += p.shape[1]
    return out


def _out_dtype(x, fp32: bool, leaf: str) -> np.dtype:
    if fp32:
        return np.dtype(np.float32)
    dt = np.dtype(x.dtype)
    if dt not in _ST_NAME:
        raise CheckpointError(f"save_checkpoint: param {leaf} has dtype {dt}, expected bfloat16, float16 or float32")
    return dt


def _check_params(params, cfg: ModelConfig) -> None:
    specs = param_specs(cfg)
    spec_leaves, spec_def = jax.tree.flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
    try:
        p_leaves = spec_def.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"save_checkpoint: params do not have the layout of cfg ({cfg.pattern!r}): {e}") from None
    for (kp, spec), x in zip(spec_leaves, p_leaves):
        if tuple(getattr(x, "shape", ())) != tuple(spec.shape):
            raise CheckpointError(f"save_checkpoint: param {jax.tree_util.keystr(kp)} has shape "
                                  f"{tuple(getattr(x, 'shape', ()))}, expected {tuple(spec.shape)}")


def _export_entries(params, cfg: ModelConfig) -> list[_Out]:
    entries: list[_Out] = []
    cache: dict = {}

    def host_cached(x):  # one stacked expert tensor at a time on the host
        if cache.get("id") is not x:
            cache.clear()
            cache.update(id=x, arr=_host(x))
        return cache["arr"]

    def add(name, x, fn, shape, fp32=False, leaf=None):
        dt = _out_dtype(x, fp32, leaf or name)
        entries.append(_Out(name, tuple(shape), dt, lambda: _contig(fn(_host(x)), dt)))

    def lin(name, x, leaf):  # ours [in, out] -> Hub [out, in]
        add(name, x, lambda a: a.T, (x.shape[1], x.shape[0]), leaf=leaf)

    def vec(name, x, leaf, fp32=False):
        add(name, x, lambda a: a, x.shape, fp32=fp32, leaf=leaf)

    H, V = cfg.hidden_size, cfg.vocab_size
    vec("backbone.embeddings.weight", params["embed"], "embed")
    for i, (kind, layer) in enumerate(zip(cfg.pattern, params["layers"])):
        pre, m = f"backbone.layers.{i}.mixer.", layer["mixer"]
        lp = f"layers[{i}].mixer."
        vec(f"backbone.layers.{i}.norm.weight", layer["norm"], f"layers[{i}].norm")
        if kind == "M":
            parts = [m[k] for k in ("in_z", "in_x", "in_B", "in_C", "in_dt")]
            dt = np.dtype(jnp.result_type(*[p.dtype for p in parts]))
            if dt not in _ST_NAME:
                raise CheckpointError(f"save_checkpoint: param {lp}in_* has dtype {dt}")
            width = sum(p.shape[1] for p in parts)
            entries.append(_Out(pre + "in_proj.weight", (width, H), dt,
                                lambda parts=parts, dt=dt: _fuse_rows(parts, dt)))
            add(pre + "conv1d.weight", m["conv_w"], lambda a: a.T[:, None, :],
                (cfg.conv_dim, 1, cfg.conv_kernel), leaf=lp + "conv_w")
            if cfg.use_conv_bias:
                vec(pre + "conv1d.bias", m["conv_b"], lp + "conv_b")
            elif np.any(_host(m["conv_b"]) != 0):
                raise CheckpointError(f"save_checkpoint: param {lp}conv_b is non-zero but cfg.use_conv_bias is "
                                      "False (the Hub layout would drop it)")
            vec(pre + "dt_bias", m["dt_bias"], lp + "dt_bias")
            vec(pre + "A_log", m["A_log"], lp + "A_log", fp32=True)
            vec(pre + "D", m["D"], lp + "D", fp32=True)
            vec(pre + "norm.weight", m["norm"], lp + "norm")
            lin(pre + "out_proj.weight", m["out_proj"], lp + "out_proj")
        elif kind == "*":
            for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin(pre + f"{k}.weight", m[k], lp + k)
        elif kind == "-":
            lin(pre + "up_proj.weight", m["up_proj"], lp + "up_proj")
            lin(pre + "down_proj.weight", m["down_proj"], lp + "down_proj")
        else:
            lin(pre + "gate.weight", m["gate"], lp + "gate")
            vec(pre + "gate.e_score_correction_bias", m["e_score_correction_bias"],
                lp + "e_score_correction_bias", fp32=True)
            for leaf, hub in (("experts_up", "up_proj"), ("experts_down", "down_proj")):
                x = m[leaf]
                dt = _out_dtype(x, False, lp + leaf)
                for j in range(x.shape[0]):
                    entries.append(_Out(pre + f"experts.{j}.{hub}.weight", (x.shape[2], x.shape[1]), dt,
                                        lambda x=x, j=j, dt=dt: _contig(host_cached(x)[j].T, dt)))
            if cfg.n_shared_experts:
                lin(pre + "shared_experts.up_proj.weight", m["shared_up"], lp + "shared_up")
                lin(pre + "shared_experts.down_proj.weight", m["shared_down"], lp + "shared_down")
    vec("backbone.norm_f.weight", params["norm_f"], "norm_f")
    lin("lm_head.weight", params["lm_head"], "lm_head")
    return entries


def _write_safetensors(file: Path, entries: list[_Out]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_NAME[e.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for e in entries:
            a = e.produce()
            if a.shape != e.shape or a.dtype != e.dtype:  # pragma: no cover - internal invariant
                raise AssertionError(f"{e.name}: produced {a.shape} {a.dtype}, declared {e.shape} {e.dtype}")
            a.tofile(f)
            del a
        f.flush()
        os.fsync(f.fileno())


def _hf_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _JAX_ONLY]


def _source_config(src: Path, cfg: ModelConfig) -> tuple[bytes | None, dict | None]:
    """(verbatim bytes, None) when the source config.json describes ``cfg``; else (None, patched
    dict): the source dict with the fields that differ rewritten."""
    file = src / "config.json"
    try:
        raw = file.read_bytes()
        d = json.loads(raw)
        src_cfg = ModelConfig.from_hf_dict(d)
    except (OSError, json.JSONDecodeError, ModelConfigError) as e:
        raise CheckpointError(f"save_checkpoint: cannot use {file} of cfg.hf_source ({e}); "
                              "set hf_source=None to write a fresh config.json") from None
    diff = [f for f in _hf_fields() if getattr(src_cfg, f) != getattr(cfg, f)]
    if not diff:
        return raw, None
    new = cfg.to_hf_dict()
    for f in diff:
        for alias in [a for a, t in _HF_ALIASES.items() if t == f]:
            d.pop(alias, None)
        if f == "pattern":
            if "hybrid_override_pattern" in d:
                d["hybrid_override_pattern"] = cfg.pattern
            for k in ("layers_block_type", "layer_types"):
                if k in d:
                    d[k] = new["layers_block_type"]
            if "num_hidden_layers" in d:
                d["num_hidden_layers"] = cfg.num_hidden_layers
        else:
            d[f] = new[f]
    warnings.warn(f"save_checkpoint: cfg differs from {file} in {diff}; writing its config.json with "
                  "those fields updated", stacklevel=3)
    return None, d


def save_checkpoint(params, cfg: ModelConfig, path, *, max_shard_bytes: float = 5e9) -> None:
    """Writes ``params`` as a Hub-layout checkpoint directory at ``path`` (replacing it atomically).

    Tensors use the Hub names, fused ``in_proj``, ``conv1d.weight`` ``[C, 1, K]`` and per-expert
    weights; ``A_log``, ``D``, ``e_score_correction_bias`` are written fp32, every other tensor in
    its param dtype (bf16, fp16 or fp32). Files: ``model.safetensors`` when everything fits in one
    shard of ``max_shard_bytes``, else ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. With ``cfg.hf_source`` set, ``config.json`` (verbatim unless
    ``cfg`` changed an HF field), the generation config and tokenizer files are copied from there;
    otherwise ``cfg.to_hf_dict()`` is written. Everything goes to a temporary sibling directory that
    is renamed into place at the end, so a crash leaves any previous checkpoint intact.
    """
    path = Path(path)
    _check_params(params, cfg)
    entries = _export_entries(params, cfg)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"save_checkpoint: {path} exists and is not a directory")
    src = Path(cfg.hf_source) if cfg.hf_source else None
    if src is not None and not src.is_dir():
        raise CheckpointError(f"save_checkpoint: cfg.hf_source {src} is not a directory (set hf_source=None "
                              "to write a fresh config.json without tokenizer files)")

    shards: list[list[_Out]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if src is not None:
            raw, patched = _source_config(src, cfg)
            if raw is not None:
                (tmp / "config.json").write_bytes(raw)
            else:
                (tmp / "config.json").write_text(json.dumps(patched, indent=2) + "\n")
            for p in sorted(src.iterdir()):
                if p.is_file() and p.name != "config.json" and any(
                        fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_FILE_PATTERNS):
                    shutil.copyfile(p, tmp / p.name)
        else:
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        for fname, shard in zip(names, shards):
            _write_safetensors(tmp / fname, shard)
        if n > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: f for f, s in zip(names, shards) for e in s}}
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
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
