"""Vocabulary files for sparse features: one value per line, most frequent first.

``build_vocabs`` streams the data once per feature column and writes ``DIR/<feature>.txt`` plus
``DIR/schema.yaml``: the input schema with ``vocab`` set on every sparse feature and
``num_buckets`` set to the vocabulary size + 2 (id 0: missing, id 1: out of vocabulary).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ranking.data.errors import DataError
from ranking.data.hashing import HashTypeError, canonical_strings
from ranking.features import CATEGORICAL, FeatureSchema


def count_values(files: list[str], column: str, is_list: bool) -> pa.Table:
    """Counts of each canonical value of one column over all files: table ``(value, count)``."""
    import pyarrow.parquet as pq

    parts: list[pa.Table] = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            batches = pf.iter_batches(batch_size=1 << 18, columns=[column])
            for b in batches:
                col = b.column(0)
                if is_list:
                    col = pc.list_flatten(col)
                vc = pc.value_counts(canonical_strings(col))
                parts.append(pa.table({"value": vc.field("values"), "count": vc.field("counts")}))
                if len(parts) >= 16:
                    parts = [_merge(parts)]
        except HashTypeError as e:
            raise DataError(f"{f}: column {column!r}: {e}") from None
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise DataError(f"{f}: column {column!r}: cannot read: {e}") from None
    return _merge(parts)


def _merge(parts: list[pa.Table]) -> pa.Table:
    t = (
        pa.concat_tables(parts)
        if parts
        else pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    )
    t = t.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])
    return t.filter(pc.is_valid(t.column("value")))


def build_vocabs(
    schema: FeatureSchema, files: list[str], out: str | Path, min_count: int = 1
) -> dict[str, int]:
    """Write one vocabulary per embedding table (``<feature>.txt``, or ``<table>.txt`` for a
    table several features share, e.g. a history and its candidate item: the values of all of
    them counted together, so that an id means one row) and the updated schema; returns the
    size of each feature's vocabulary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    files_of: dict[str, str] = {}
    for table in schema.tables:
        feats = [schema.feature(n) for n in table.feature_names]
        counts = _merge(
            [count_values(files, f.column, is_list=f.kind != CATEGORICAL) for f in feats]
        )
        counts = counts.filter(pc.greater_equal(counts.column("count"), min_count))
        counts = counts.sort_by([("count", "descending"), ("value", "ascending")])
        values = counts.column("value").to_pylist()
        bad = [v for v in values if "\n" in v or "\r" in v]
        if bad:
            print(
                f"mixrank: warning: {table.name}: {len(bad)} values with line breaks left out",
                file=sys.stderr,
            )
            values = [v for v in values if v not in set(bad)]
        name = f"{feats[0].name}.txt" if len(feats) == 1 else f"{table.name}.txt"
        (out / name).write_text("".join(v + "\n" for v in values), encoding="utf-8")
        for f in feats:
            sizes[f.name], files_of[f.name] = len(values), name
    d = schema.to_dict()
    for fd in d["features"]:
        if fd["name"] in sizes:
            fd["vocab"] = files_of[fd["name"]]
            fd["num_buckets"] = sizes[fd["name"]] + 2
    (out / "schema.yaml").write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    return sizes
