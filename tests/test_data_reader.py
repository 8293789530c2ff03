"""ParquetBatches: every row exactly once per epoch over ranks x workers, shuffling, resume."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ranking.data.errors import DataError
from ranking.data.reader import ParquetBatches, resume_plan
from ranking.features import FeatureSchema

SCHEMA = FeatureSchema.from_dict(
    {
        "name": "rows",
        "tasks": [{"name": "click", "label": "label"}],
        "features": [
            {"name": "rid", "kind": "dense", "group": "g"},  # the row id, exact in float32
            {"name": "cat", "kind": "categorical", "num_buckets": 1000, "dim": 4, "group": "g"},
            {"name": "tags", "kind": "id_list", "num_buckets": 50, "dim": 4, "group": "g"},
        ],
    }
)
N_ROWS = 5000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Three files of uneven sizes and row-group sizes; row r has rid r and len(tags) = r % 4."""
    d = tmp_path_factory.mktemp("rows")
    start = 0
    for i, (n, rg) in enumerate([(2100, 700), (1700, 1000), (1200, 1200)]):
        rid = np.arange(start, start + n)
        t = pa.table(
            {
                "rid": rid,
                "cat": pa.array([str(r) for r in rid]),
                "tags": pa.array([[str(r)] * (r % 4) for r in rid], pa.list_(pa.string())),
                "label": pa.array(rid % 2, pa.int8()),
            }
        )
        pq.write_table(t, d / f"part-{i}.parquet", row_group_size=rg)
        start += n
    return d


def row_ids(batches) -> list[int]:
    out = []
    for b in batches:
        rid = b.dense[:, 0].long()
        # every batch is internally consistent: the other columns belong to the same rows
        assert b.sparse["tags"].lengths().tolist() == (rid % 4).tolist()
        assert b.labels[:, 0].long().tolist() == (rid % 2).tolist()
        out += rid.tolist()
    return out


def make(data_dir, **kw):
    kw = {"batch_size": 64, "unit_rows": 300, "shuffle_buffer": 500, **kw}
    return ParquetBatches(SCHEMA, data_dir, **kw)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_the_dataset(data_dir, world_size):
    shards = [
        row_ids(make(data_dir, rank=r, world_size=world_size, seed=5)) for r in range(world_size)
    ]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == list(range(N_ROWS))  # exactly once: union is everything, no repeats
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 2 * 300 + 1  # balanced up to a couple of units


def test_ranks_times_dataloader_workers_partition_the_dataset(data_dir):
    seen = []
    for rank in range(2):
        ds = make(data_dir, rank=rank, world_size=2, seed=1)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        seen += row_ids(dl)
    assert sorted(seen) == list(range(N_ROWS))


def test_shuffle_changes_order_not_content_and_is_deterministic(data_dir):
    plain = row_ids(make(data_dir, shuffle=False))
    assert plain == list(range(N_ROWS))  # no shuffle: file order
    a = row_ids(make(data_dir, seed=3))
    b = row_ids(make(data_dir, seed=3))
    c = row_ids(make(data_dir, seed=4))
    assert a == b
    assert a != plain and a != c
    assert sorted(a) == sorted(c) == plain
    # the first batch mixes rows from more than one unit (the buffer really shuffles)
    assert len({r // 300 for r in a[:64]}) > 1


def test_epochs_reshuffle(data_dir):
    ds = make(data_dir, seed=3)
    e0 = row_ids(ds)
    ds.set_epoch(1)
    e1 = row_ids(ds)
    assert e0 != e1 and sorted(e0) == sorted(e1)


def test_batch_sizes_and_drop_last(data_dir):
    sizes = [b.size for b in make(data_dir, batch_size=128, seed=0)]
    assert all(s == 128 for s in sizes[:-1]) and sum(sizes) == N_ROWS and sizes[-1] == N_ROWS % 128
    dropped = [b.size for b in make(data_dir, batch_size=128, drop_last=True)]
    assert dropped == [128] * (N_ROWS // 128)


@pytest.mark.parametrize("skip", [0, 1, 9, 40, 78])
def test_skip_batches_resumes_exactly(data_dir, skip):
    full = [b.dense[:, 0].tolist() for b in make(data_dir, seed=8)]
    ds = make(data_dir, seed=8)
    ds.load_state_dict({"epoch": 0, "batches": skip})
    rest = [b.dense[:, 0].tolist() for b in ds]
    assert rest == full[skip:]
    assert ds.state_dict() == {"epoch": 0, "batches": len(full)}


@pytest.mark.parametrize("num_workers, drop_last", [(2, True), (3, False)])
def test_skip_batches_resumes_exactly_through_dataloader_workers(data_dir, num_workers, drop_last):
    """Resuming at any batch of a DataLoader with workers, also after some workers ran out of
    data (their shards are uneven here): the batches are the rest of the uninterrupted pass."""

    def batches(skip):
        ds = make(data_dir, seed=8, batch_size=96, unit_rows=700, drop_last=drop_last)
        ds.skip_batches(skip)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        return [b.dense[:, 0].long().tolist() for b in dl]

    full = batches(0)
    ds = make(data_dir, seed=8, batch_size=96, unit_rows=700, drop_last=drop_last)
    counts = [ds._shard_batches(0, w, num_workers) for w in range(num_workers)]
    assert ds.rank_batches(0, num_workers) == sum(counts)
    assert len(set(counts)) > 1, counts  # some worker runs out before the others
    assert len(full) == sum(counts)
    ends = range(len(full) - 2 * num_workers - 2, len(full) + 1)
    for skip in sorted({1, num_workers + 1, *ends}):
        assert batches(skip) == full[skip:], skip


def test_resume_plan_against_a_slow_round_robin():
    import itertools
    import random

    rnd = random.Random(0)
    for _ in range(300):
        counts = [rnd.randint(0, 6) for _ in range(rnd.randint(1, 4))]
        order, left = [], list(counts)
        for w in itertools.cycle(range(len(counts))):
            if not any(left):
                break
            if left[w]:
                order.append(w)
                left[w] -= 1
        for n in range(len(order) + 1):
            taken, nxt = resume_plan(counts, n)
            assert taken == [order[:n].count(w) for w in range(len(counts))], (counts, n)
            # the rest of the slow order is the round-robin over `nxt` with what remains
            rest, left = [], [counts[w] - taken[w] for w in nxt]
            for i in itertools.cycle(range(len(nxt))):
                if not any(left):
                    break
                if left[i]:
                    rest.append(nxt[i])
                    left[i] -= 1
            assert rest == order[n:], (counts, n, nxt)


def test_bounded_memory_units(data_dir):
    # no unit is larger than unit_rows, whatever the row-group size
    ds = make(data_dir, unit_rows=256)
    assert max(u.rows for u in ds.units) <= 256
    assert sum(u.rows for u in ds.units) == N_ROWS == ds.num_rows


def test_reader_errors(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"nothing\*.parquet: no files match"):
        make(str(tmp_path / "nothing*.parquet"))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"rid": pa.array([], pa.int64()), "cat": pa.array([], pa.string()),
                             "tags": pa.array([], pa.list_(pa.string())), "label": pa.array([], pa.int8())}), empty)  # fmt: skip
    with pytest.raises(DataError, match=r"empty.parquet: the data set has no rows"):
        make(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"corrupt.parquet: not a readable Parquet file"):
        make(corrupt)
    nolabel = tmp_path / "nolabel.parquet"
    pq.write_table(pq.read_table(data_dir / "part-0.parquet").drop_columns(["label"]), nolabel)
    with pytest.raises(DataError, match=r"nolabel.parquet: column 'label': missing"):
        make(nolabel)
    assert sum(b.size for b in make(nolabel, with_labels=False)) == 2100
    badtype = tmp_path / "badtype.parquet"
    t = pq.read_table(data_dir / "part-2.parquet")
    pq.write_table(
        t.set_column(0, "rid", pa.array([str(x) for x in t.column("rid").to_pylist()])), badtype
    )
    with pytest.raises(
        DataError, match=r"badtype.parquet: column 'rid': dense feature 'rid' has type string"
    ):
        list(make(badtype))


def test_reads_real_frappe(shared_data):
    from ranking.features import load_schema

    ds = ParquetBatches(
        load_schema("frappe"), shared_data / "frappe" / "valid.parquet", 8192, seed=0
    )
    sizes = [b.size for b in ds]
    assert sum(sizes) == 57721


@pytest.mark.parametrize(
    "column, array, message",
    [
        ("n", pa.array(["1.5"]), "column 'n': dense feature 'n' has type string, expected a number"),
        ("tags", pa.array(["x"]), "column 'tags': id_list feature 'tags' has type string, expected a list"),
        ("tags", pa.array([[True]]), "column 'tags': id_list feature 'tags' has type list<element: bool>, expected a list of strings"),
        ("kcol", pa.array([[1]]), "column 'kcol': categorical feature 'k' has type list<element: int64>"),
        ("u", pa.array([b"x"]), "column 'u': categorical feature 'u' has type binary"),
        ("y", pa.array(["1"]), "column 'y': label has type string, expected 0/1 numbers"),
        ("y", pa.array([None], pa.int8()), "column 'y': label has 1 null(s) by the file's column statistics"),
    ],
)  # fmt: skip
def test_footer_check_names_file_and_column(tmp_path, column, array, message):
    """The reader checks every file's footer (types against the schema, label nulls from the
    column statistics) before reading a row; the message names the file and the column."""
    import pyarrow.parquet as pq
    from test_features import SCHEMA, _table

    path = tmp_path / "f.parquet"
    pq.write_table(_table(**{column: array}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        ParquetBatches(SCHEMA, str(path), batch_size=4, rank=0, world_size=1)
