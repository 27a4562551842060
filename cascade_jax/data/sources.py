"""Random-access row sources (grain ``RandomAccessDataSource`` protocol: ``len`` + ``[i]``).

Every source returns ``(location, row)`` for index ``i``: ``location`` is ``"file:line"`` (JSONL,
1-based line), ``"file:row N"`` (Parquet, ArrayRecord; 0-based) or ``"tiny:domain:N"``, and
``row`` the parsed JSON object or a :class:`~cascade_jax.data.rows.BadRow` when the record does
not parse (reported or skipped downstream, per ``data.on_bad_row``).

* JSONL (``.jsonl``/``.json``, plain or ``.gz``): a byte-offset index of the non-blank lines is
  built once on open (plain files are memory-mapped; gzip files are decompressed into memory, so
  convert very large gzip files to ArrayRecord with :mod:`cascade_jax.data.convert`).
* Parquet: rows by row group through pyarrow (the last few row groups cached). Random access
  over large files is slow; for globally shuffled multi-TB data prefer ArrayRecord.
* ArrayRecord: grain's ``ArrayRecordDataSource``; each record is one UTF-8 JSON row.
* TFDS: a prepared TFDS dataset directory (the one holding ``dataset_info.json``) stored as
  ArrayRecord, read with ``tensorflow_datasets`` without TensorFlow (split ``source.split``).
  Decoded features are the row (bytes -> str, arrays -> lists); a dataset whose only feature is
  a text ``json`` holds the row as JSON text (what :func:`cascade_jax.data.convert.write_tfds`
  writes).
* tiny: the built-in tiny domains (``cascade_jax.data.tiny``), ``tiny_rows_per_domain`` rows
  per domain, as ``{"prompt", "response", "domain", "metadata", "tools"}`` rows.
* generated: the list of rows ``module:function(seed=seed, **source.args)`` returns (the
  function imported by name when the source opens), e.g. the canonical agentic episodes
  ``cascade_jax.agentic.swe:swe_sft_rows`` as ``{"messages", "tools"}`` SFT rows.

A missing path, a glob matching nothing, or a source with no rows is a :class:`DataError` when
the source is opened, before any training starts.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import importlib
import json
import mmap
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from cascade_jax.data.rows import BadRow, DataError
from cascade_jax import domains as D
from cascade_jax.data.rows import CANONICAL_FIELDS
from cascade_jax.data.tiny import NEAR_MISS_RATE, tiny_examples

__all__ = ["open_source", "resolve_files", "JsonlSource", "ParquetSource", "ArrayRecordSource",
           "TfdsSource", "TinySource", "TINY_TOOL", "TINY_REASONING"]

_EXT = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz"),
        "parquet": (".parquet",),
        "array_record": (".array_record",)}


def resolve_files(path: str, fmt: str) -> list[str]:
    """The sorted files of ``path`` (a file, a glob, or a directory searched recursively for the
    format's extensions, or for ArrayRecord shards ``*.array_record-NNNNN-of-NNNNN``)."""
    exts = _EXT[fmt]

    def matches(name: str) -> bool:
        return name.endswith(exts) or (fmt == "array_record" and ".array_record-" in name)

    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and matches(p.name))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory ({fmt} source)")
    if not files:
        raise DataError(f"{path}: no {fmt} files found")
    return files


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return BadRow(f"malformed JSON ({e})")


class _Concat:
    """Index ``i`` over several per-file sources (cumulative lengths)."""

    def __init__(self, parts: Sequence[Any]):
        self._parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self._parts]).tolist()

    def __len__(self):
        return self._starts[-1]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        return self._parts[k][i - self._starts[k]]


class _JsonlFile:
    def __init__(self, path: str):
        self.path = path
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                self._buf = f.read()
        else:
            with open(path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
        arr = np.frombuffer(self._buf, dtype=np.uint8) if len(self._buf) else np.zeros(0, np.uint8)
        ends = np.flatnonzero(arr == 10)
        if len(arr) and (len(ends) == 0 or ends[-1] != len(arr) - 1):
            ends = np.append(ends, len(arr))
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
        # keep non-blank lines (any byte other than space/tab/CR)
        blank = np.array([not self._buf[s:e].strip() for s, e in zip(starts, ends)], bool) \
            if len(ends) else np.zeros(0, bool)
        keep = ~blank
        self._starts, self._ends = starts[keep], ends[keep]
        self._lines = np.flatnonzero(keep) + 1

    def __len__(self):
        return len(self._starts)

    def __getitem__(self, i):
        s, e = int(self._starts[i]), int(self._ends[i])
        where = f"{self.path}:{int(self._lines[i])}"
        return where, _parse_json(self._buf[s:e])


class JsonlSource(_Concat):
    def __init__(self, files: Sequence[str]):
        super().__init__([_JsonlFile(f) for f in files])


class _ParquetFile:
    def __init__(self, path: str, cache: int = 4):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        md = self._file.metadata
        self._starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]).tolist()
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache

    def __len__(self):
        return self._starts[-1]

    def _group(self, g: int) -> list:
        rows = self._cache.get(g)
        if rows is None:
            rows = self._file.read_row_group(g).to_pylist()
            self._cache[g] = rows
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return rows

    def __getitem__(self, i):
        g = bisect.bisect_right(self._starts, i) - 1
        return f"{self.path}:row {i}", self._group(g)[i - self._starts[g]]


class ParquetSource(_Concat):
    def __init__(self, files: Sequence[str]):
        super().__init__([_ParquetFile(f) for f in files])


class _ArrayRecordFile:
    def __init__(self, path: str):
        import grain

        self.path = path
        try:
            self._src = grain.sources.ArrayRecordDataSource([path])
        except Exception as e:
            raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        where = f"{self.path}:row {i}"
        return where, _parse_json(self._src[i])


class ArrayRecordSource(_Concat):
    def __init__(self, files: Sequence[str]):
        super().__init__([_ArrayRecordFile(f) for f in files])


def _plain_feature(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_plain_feature(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain_feature(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_feature(x) for x in v]
    return v


class TfdsSource:
    """A prepared TFDS dataset (ArrayRecord files) through ``tfds.builder_from_directory``."""

    def __init__(self, path: str, split: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(f"{path}: format 'tfds' needs tensorflow-datasets ({e})") from None
        if not os.path.isfile(os.path.join(path, "dataset_info.json")):
            raise DataError(f"{path}: not a prepared TFDS dataset directory (no dataset_info.json)")
        builder = tfds.builder_from_directory(path)
        if split not in builder.info.splits:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(builder.info.splits)}")
        self.path, self._src = path, builder.as_data_source(split=split)
        self._json = set(builder.info.features.keys()) == {"json"}

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        where = f"{self.path}:row {i}"
        ex = self._src[int(i)]
        if self._json:
            return where, _parse_json(ex["json"])
        return where, _plain_feature(ex)


#: the tool the tiny ``tool_call`` domain declares (``square(n)``)
TINY_TOOL = {"type": "function", "function": {
    "name": "square", "description": "Square an integer.",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "description": "the integer to square"}}, "required": ["n"]}}}


#: the reasoning of every tiny SFT row in thinking mode: short, so the tiny model learns the
#: shape ``<think>\n...\n</think>\nanswer`` that thinking-mode RL prompts open
TINY_REASONING = "I know the answer."


class TinySource:
    """The tiny domains as rows (``prompt``, ``response`` = the example's ``sft_response``: the
    reference, or in some rows its near miss, see :mod:`cascade_jax.data.tiny`; ``domain``,
    ``metadata``, ``tools`` = [square] for ``tool_call``, and with ``thinking`` the ``reasoning``
    :data:`TINY_REASONING`; without, SFT renders ``<think></think>answer`` as non-thinking RL
    prompts expect)."""

    def __init__(self, domains: Sequence[str], rows_per_domain: int, seed: int,
                 thinking: bool = True, near_miss_rate: Optional[float] = None):
        rate = NEAR_MISS_RATE if near_miss_rate is None else near_miss_rate
        self._rows = []
        for dom in (domains or D.DOMAINS):
            for j, ex in enumerate(tiny_examples(D.check_domain(dom), n=rows_per_domain, seed=seed,
                                                    near_miss_rate=rate)):
                row = {"prompt": ex.prompt, "response": ex.sft_response, "domain": ex.domain,
                       "metadata": ex.metadata}
                if thinking:
                    row["reasoning"] = TINY_REASONING
                if ex.domain == D.TOOL_CALL:
                    row["tools"] = [TINY_TOOL]
                self._rows.append((f"tiny:{dom}:{j}", row))

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows[i]


class GeneratedSource:
    """The rows ``function(seed=seed, **args)`` returns, ``function`` named ``module:function``
    (module doc); locations ``"<module:function>:N"``."""

    def __init__(self, ref: str, args: dict, seed: int):
        mod, _, name = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise DataError(f"{ref}: cannot import the generated source's function ({e})") from None
        try:
            rows = fn(seed=seed, **args)
        except TypeError as e:
            raise DataError(f"{ref}: args: {e}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{ref}: expected a list of row dicts, got {type(rows).__name__}")
        self._rows = [(f"{ref}:{j}", r) for j, r in enumerate(rows)]

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return self._rows[i]


def open_source(source, *, domains: Sequence[str] = (), tiny_rows_per_domain: int = 1024,
                tiny_near_miss_rate: Optional[float] = None, seed: int = 0, thinking: bool = True):
    """A random-access source for one ``DataSource`` config; errors if missing or empty, or if
    its field mapping names an unknown canonical field."""
    bad = sorted(k for k in source.fields if k.split(".")[0] not in CANONICAL_FIELDS
                 or (k.startswith("metadata.") and len(k) == len("metadata.")))
    if bad:
        raise DataError(f"{source.path or source.format}: fields: unknown canonical field(s) {bad}; "
                        f"valid: {', '.join(CANONICAL_FIELDS)} (and metadata.KEY)")
    fmt = source.format
    if fmt == "tiny":
        src = TinySource(domains, tiny_rows_per_domain, seed, thinking, tiny_near_miss_rate)
    elif fmt == "generated":
        src = GeneratedSource(source.path, dict(source.args), seed)
    elif fmt == "tfds":
        if not os.path.isdir(source.path):
            raise DataError(f"{source.path}: no such TFDS dataset directory")
        src = TfdsSource(source.path, source.split)
    else:
        files = resolve_files(source.path, fmt)
        if fmt == "jsonl":
            src = JsonlSource(files)
        elif fmt == "parquet":
            src = ParquetSource(files)
        else:
            src = ArrayRecordSource(files)
    if len(src) == 0:
        raise DataError(f"{source.path or 'tiny'}: the {fmt} source has no rows")
    return src
