"""Write rows as JSONL (plain / gzip), Parquet or ArrayRecord, and convert between them.

::

    python -m cascade_jax.data.convert --from jsonl data/sft.jsonl.gz --to array_record out/sft.array_record

Parquet: scalar columns stay typed; nested values (lists, objects) are stored as JSON text so
rows with different keys round-trip exactly (the readers parse JSON-text ``messages``, ``tools``
and ``metadata``; struct columns written by other tools are read as they are). ArrayRecord: one
UTF-8 JSON row per record, ``group_size:1`` for fast random access. TFDS: a dataset (written
without TensorFlow, ``file_format="array_record"``, rows in their given order) whose single text
feature ``json`` holds the row.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
from typing import Iterable, Mapping

from cascade_jax.config import DataSource
from cascade_jax.data.rows import BadRow
from cascade_jax.data.sources import open_source

__all__ = ["write_jsonl", "write_parquet", "write_array_record", "write_tfds", "write_rows", "main"]


def write_jsonl(rows: Iterable[Mapping], path: str) -> int:
    opener = gzip.open if str(path).endswith(".gz") else open
    n = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_parquet(rows: Iterable[Mapping], path: str, row_group_size: int = 1024) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    nested = {k for k in keys if any(isinstance(r.get(k), (list, dict)) for r in rows)}
    cols = {k: [json.dumps(r[k], ensure_ascii=False) if k in nested and r.get(k) is not None
                else r.get(k) for r in rows] for k in keys}
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return len(rows)


def write_array_record(rows: Iterable[Mapping], path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    try:
        for row in rows:
            w.write(json.dumps(row, ensure_ascii=False).encode("utf-8"))
            n += 1
    finally:
        w.close()
    return n


@functools.lru_cache(maxsize=None)
def _rows_builder_class():
    import tensorflow_datasets as tfds

    class CascadeRows(tfds.core.GeneratorBasedBuilder):
        """Rows as JSON text, in their given order (no TensorFlow needed)."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, rows, split, **kw):
            self._rows, self._split = rows, split
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"json": tfds.features.Text()}),
                disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            for i, r in enumerate(self._rows):
                yield i, {"json": json.dumps(r, ensure_ascii=False)}

    return CascadeRows


def write_tfds(rows: Iterable[Mapping], data_dir: str, split: str = "train") -> str:
    """Store ``rows`` as a TFDS dataset (ArrayRecord files) under ``data_dir``; returns the builder
    directory (the ``path`` of a ``format: tfds`` source)."""
    builder = _rows_builder_class()(rows=list(rows), split=split, data_dir=str(data_dir),
                                    file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def write_rows(rows: Iterable[Mapping], path: str, fmt: str) -> int:
    """Write ``rows`` to ``path`` in ``fmt`` (``jsonl``, ``parquet``, ``array_record``)."""
    writers = {"jsonl": write_jsonl, "parquet": write_parquet, "array_record": write_array_record}
    if fmt not in writers:
        raise ValueError(f"format {fmt!r}: valid formats {', '.join(writers)}")
    return writers[fmt](rows, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src_fmt", required=True, choices=["jsonl", "parquet", "array_record"])
    ap.add_argument("src")
    ap.add_argument("--to", dest="dst_fmt", required=True, choices=["jsonl", "parquet", "array_record"])
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    src = open_source(DataSource(path=args.src, format=args.src_fmt))

    def rows():
        for i in range(len(src)):
            where, row = src[i]
            if isinstance(row, BadRow):
                raise SystemExit(f"{where}: {row}")
            yield row

    n = write_rows(rows(), args.dst, args.dst_fmt)
    print(json.dumps({"rows": n, "out": args.dst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
