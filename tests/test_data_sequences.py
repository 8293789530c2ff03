"""``mixrank data sequences``: point-in-time histories against a slow per-row reference.

The reference walks every event and collects, by hand, the same user's events with a strictly
earlier time in input order (files as given, rows in order), most recent first. Ties, users and
items of both types, nulls, several files and directories, truncation to ``--length``, the
label-restricted histories, and the real MovieLens files (skipped without ../shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ranking.cli import main as cli
from ranking.data.errors import DataError
from ranking.data.sequences import build_histories

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def reference(events: list[dict], length: int, label: str | None) -> list[dict]:
    """Per event (input order): ``{"hist", "pos", "neg"}`` lists, collected one by one."""
    out = []
    for e in events:
        if e["user"] is None:
            out.append({"hist": [], "pos": [], "neg": []})
            continue
        earlier = [
            (j, o)
            for j, o in enumerate(events)
            if o["user"] == e["user"] and o["time"] < e["time"] and o["item"] is not None
        ]
        # most recent first: later time first; among equal times, later input position first
        earlier.sort(key=lambda jo: (jo[1]["time"], jo[0]), reverse=True)
        row = {"hist": [o["item"] for _, o in earlier][:length]}
        if label:
            row["pos"] = [o["item"] for _, o in earlier if o[label] == 1][:length]
            row["neg"] = [o["item"] for _, o in earlier if o[label] == 0][:length]
        out.append(row)
    return out


def _log(rng, n: int, users: int, items: int, times: int, string_ids: bool) -> pa.Table:
    user = rng.integers(0, users, n)
    item = rng.integers(0, items, n)
    t = rng.integers(0, times, n)  # few distinct times: many ties
    label = rng.integers(0, 2, n)
    cols = {
        "user": pa.array([f"u{x}" for x in user]) if string_ids else pa.array(user),
        "item": pa.array([f"i{x}" for x in item]) if string_ids else pa.array(item),
        "ts": pa.array(t),
        "click": pa.array(label, pa.int8()),
        "other": pa.array(rng.random(n)),  # carried through untouched
    }
    return pa.table(cols)


def _read_events(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        t = pq.read_table(p)
        for r in t.to_pylist():
            rows.append(
                {"user": r["user"], "item": r["item"], "time": r["ts"], "click": r["click"]}
            )
    return rows


@pytest.mark.parametrize("string_ids", [False, True])
def test_histories_equal_the_per_row_reference(tmp_path, string_ids):
    rng = np.random.default_rng(3 if string_ids else 4)
    # three inputs: two files and a directory of two files, times interleaved across them
    train = _log(rng, 300, 12, 40, 25, string_ids)
    valid = _log(rng, 80, 12, 40, 25, string_ids)
    test_a = _log(rng, 60, 14, 40, 30, string_ids)
    test_b = _log(rng, 50, 14, 40, 30, string_ids)
    # nulls: an event without an item, one without a user
    items = train.column("item").to_pylist()
    items[5] = None
    train = train.set_column(1, "item", pa.array(items, train.schema.field("item").type))
    users = valid.column("user").to_pylist()
    users[7] = None
    valid = valid.set_column(0, "user", pa.array(users, valid.schema.field("user").type))
    src = tmp_path / "src"
    (src / "test").mkdir(parents=True)
    pq.write_table(train, src / "train.parquet", row_group_size=64)
    pq.write_table(valid, src / "valid.parquet")
    pq.write_table(test_a, src / "test" / "a.parquet")
    pq.write_table(test_b, src / "test" / "b.parquet")
    inputs = [src / "train.parquet", src / "valid.parquet", src / "test"]
    out = tmp_path / "out"
    rc = cli(
        [
            *("data", "sequences", *map(str, inputs), "--out", str(out), "--user", "user"),
            *("--item", "item", "--time", "ts", "--label", "click", "--length", "4", "--quiet"),
        ]
    )
    assert rc == 0
    written = [out / "train.parquet", out / "valid.parquet", out / "test/a.parquet"]
    written.append(out / "test/b.parquet")
    originals = [src / "train.parquet", src / "valid.parquet"]
    originals += [src / "test/a.parquet", src / "test/b.parquet"]
    want = reference(_read_events(originals), 4, "click")
    got = []
    for w, o in zip(written, originals, strict=True):
        t = pq.read_table(w)
        src_t = pq.read_table(o)
        assert t.select(src_t.column_names).equals(src_t)  # every input column unchanged
        assert pq.ParquetFile(w).num_row_groups == pq.ParquetFile(o).num_row_groups
        got += [
            {"hist": h, "pos": p, "neg": n}
            for h, p, n in zip(
                t.column("item_hist").to_pylist(),
                t.column("item_hist_pos").to_pylist(),
                t.column("item_hist_neg").to_pylist(),
            )
        ]
    assert got == want
    # the data set really has ties and truncation (the test exercises both)
    assert any(len(r["hist"]) == 4 for r in want)
    events = _read_events(originals)
    assert len({(e["user"], e["time"]) for e in events}) < len(events)


def _build(path: Path, out: Path, **kw) -> list[Path]:
    """``build_histories`` of one log with the test's column names."""
    return build_histories(
        [str(path)], out, user="user", item="item", time="ts", progress=False, **kw
    )


def test_equal_times_never_see_each_other(tmp_path):
    t = pa.table(
        {
            "user": [1, 1, 1, 1],
            "item": [10, 11, 12, 13],
            "ts": [5, 5, 6, 6],
            "click": [1, 0, 1, 1],
        }
    )
    pq.write_table(t, tmp_path / "log.parquet")
    (f,) = _build(tmp_path / "log.parquet", tmp_path / "out", label="click")
    r = pq.read_table(f)
    assert r.column("item_hist").to_pylist() == [[], [], [11, 10], [11, 10]]
    assert r.column("item_hist_pos").to_pylist() == [[], [], [10], [10]]
    assert r.column("item_hist_neg").to_pylist() == [[], [], [11], [11]]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.drop(["ts"]), "column 'ts': missing"),
        (
            lambda t: t.set_column(2, "ts", pa.array([None, 1, 2, 3], pa.int64())),
            "time is null at row 0",
        ),
        (
            lambda t: t.set_column(2, "ts", pa.array(["a", "b", "c", "d"])),
            "expected numbers or timestamps",
        ),
        (lambda t: t.set_column(1, "item", pa.array([[1]] * 4)), "column 'item': has type list"),
        (
            lambda t: t.append_column("item_hist", pa.array([1, 2, 3, 4])),
            "'item_hist': already exists",
        ),
    ],
)
def test_bad_logs_name_the_file_and_column(tmp_path, change, message):
    t = pa.table(
        {"user": [1, 1, 2, 2], "item": [1, 2, 3, 4], "ts": [1, 2, 3, 4], "click": [0, 1, 0, 1]}
    )
    pq.write_table(change(t), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=message) as e:
        _build(tmp_path / "bad.parquet", tmp_path / "out", label="click")
    assert str(tmp_path / "bad.parquet") in str(e.value)
    assert not list((tmp_path / "out").glob("*.parquet")) if (tmp_path / "out").exists() else True


def test_two_inputs_with_one_name_are_refused(tmp_path):
    t = pa.table({"user": [1], "item": [1], "ts": [1]})
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        pq.write_table(t, tmp_path / d / "part.parquet")
    with pytest.raises(DataError, match="give distinct names"):
        build_histories(
            [str(tmp_path / "a/part.parquet"), str(tmp_path / "b/part.parquet")],
            tmp_path / "out",
            user="user",
            item="item",
            time="ts",
            progress=False,
        )


@pytest.mark.skipif(not (SHARED / "movielens100k").is_dir(), reason="needs ../shared/data")
def test_movielens_histories_hold_only_earlier_ratings(tmp_path, capsys):
    """The MovieLens train, valid and test files as one log: every history item is one the user
    rated strictly earlier (checked per row against a lookup), and the lengths match counts."""
    src = SHARED / "movielens100k"
    files = [str(src / f"{s}.parquet") for s in ("train", "valid", "test")]
    rc = cli(
        [
            *("data", "sequences", *files, "--out", str(tmp_path), "--user", "user_id"),
            *("--item", "item_id", "--time", "timestamp", "--label", "label", "--length", "50"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["files"]) == 3
    events = []
    for f in files:
        events += pq.read_table(f, columns=["user_id", "item_id", "timestamp"]).to_pylist()
    first_time = {}
    count_before = {}
    by_user: dict = {}
    for e in events:
        by_user.setdefault(e["user_id"], []).append(e["timestamp"])
        key = (e["user_id"], e["item_id"])
        first_time[key] = min(first_time.get(key, e["timestamp"]), e["timestamp"])
    for u, ts in by_user.items():
        ts.sort()
        count_before[u] = np.asarray(ts)
    hist = []
    for name in ("train", "valid", "test"):
        hist += (
            pq.read_table(tmp_path / f"{name}.parquet", columns=["item_id_hist"])
            .column(0)
            .to_pylist()
        )
    assert len(hist) == len(events) == 100_000
    for e, h in zip(events, hist):
        n_before = int(np.searchsorted(count_before[e["user_id"]], e["timestamp"]))
        assert len(h) == min(50, n_before)
        assert all(first_time[(e["user_id"], i)] < e["timestamp"] for i in h)
