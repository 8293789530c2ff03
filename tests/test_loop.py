"""The continuous-training loop's parts, in process (no Serve): the request log's writer and
format, ``join-labels``, ``check-consistency``, the rollout's gate and its metric arithmetic.

Each is checked against an independent reference: the log against the requests as sent (dicts
merged by hand), the join against a Python dict join, the consistency check against a tampered
log, the shadow's correlation against ``numpy.corrcoef``, the histogram quantile against a
hand-made histogram.
"""

from __future__ import annotations

import json
import math
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from ranking.data.errors import DataError
from ranking.errors import UserError


@pytest.fixture(scope="module")
def art_paths(tmp_path_factory):
    from benchmarks.artifacts import make_artifact

    d = tmp_path_factory.mktemp("loop")
    return make_artifact(d / "a0", seed=0), make_artifact(d / "a1", seed=1)


@pytest.fixture(scope="module")
def art0(art_paths):
    from ranking.export import load_artifact

    return load_artifact(art_paths[0])


def _served(art, n_requests: int, n_cand: int = 7, seed: int = 0, t: float | None = None):
    """``n_requests`` requests parsed and scored as the Ranker does, as ``Served`` items."""
    from ranking.data.encode import merged_batch
    from ranking.data.servedlog import Served
    from serving.loadtest import synthetic_request
    from serving.request import Limits, parse_json

    out, bodies = [], []
    for i in range(n_requests):
        body = synthetic_request(art.schema, n_cand, seed=seed * 1000 + i)
        body["request_id"] = f"s{seed}-r{i}"
        if i % 3 == 0:  # a context value a candidate overrides, and an integer categorical
            body["candidates"][0]["item"] = 12345
            body["context"]["item"] = "ctx-item"
        req = parse_json(json.dumps(body).encode(), art.schema, Limits())
        probs = art.predict(merged_batch(art.schema, [req.features])).numpy()
        out.append(
            Served(
                req.request_id,
                t or time.time(),
                art.model_version,
                art.schema,
                req.context,
                req.candidates,
                probs,
            )
        )
        bodies.append(body)
    return out, bodies


def _write_log(directory, items, **kw):
    from serving.reqlog import RequestLog

    rl = RequestLog(str(directory), flush_seconds=0.2, **kw)
    for s in items:
        assert rl.offer(s)
    assert rl.close()
    return rl


# ----------------------------------------------------------------------------- the log
def test_log_rows_are_the_requests_as_sent(tmp_path, art0):
    from ranking.data.servedlog import read_logs

    items, bodies = _served(art0, 6)
    rl = _write_log(tmp_path / "logs", items)
    assert rl.written_rows == 6 * 7 and rl.dropped == 0
    t = (
        read_logs(str(tmp_path / "logs"))
        .to_table()
        .sort_by([("request_id", "ascending"), ("candidate", "ascending")])
    )
    rows = t.to_pylist()
    by_id = {b["request_id"]: b for b in bodies}
    probs = {s.request_id: s.probs for s in items}
    assert len(rows) == 42
    for r in rows:
        body = by_id[r["request_id"]]
        merged = {**body["context"], **body["candidates"][r["candidate"]]}
        for f in art0.schema.features:
            want = merged.get(f.column)
            want = None if want is None else str(want)  # categoricals as their string form
            assert r[f.column] == want, (f.column, r["request_id"], r["candidate"])
        assert r["model_version"] == art0.model_version
        assert r["score_click"] == pytest.approx(float(probs[r["request_id"]][r["candidate"], 0]))


def test_log_files_are_partitioned_and_never_partial(tmp_path, art0):
    items, _ = _served(art0, 4)
    hour0 = 1_700_000_000.0  # 2023-11-14 22:13 UTC
    for i, s in enumerate(items):
        s.served_at = hour0 + 3600 * (i % 2)
    _write_log(tmp_path / "logs", items)
    files = sorted(p.relative_to(tmp_path / "logs") for p in (tmp_path / "logs").rglob("*"))
    parquet = [p for p in files if p.suffix == ".parquet"]
    assert {p.parts[0] for p in parquet} == {"hour=2023-11-14-22", "hour=2023-11-14-23"}
    assert {p.parts[1] for p in parquet} == {f"model_version={art0.model_version}"}
    assert not [p for p in files if p.name.startswith(".")]  # no temporary file left
    for p in parquet:
        pq.read_table(tmp_path / "logs" / p)  # every file complete


def test_log_drops_when_full_and_never_blocks(tmp_path, art0):
    from serving.reqlog import RequestLog

    items, _ = _served(art0, 3)
    rl = RequestLog(str(tmp_path / "logs"), queue_size=2, flush_seconds=60)
    gate = threading.Event()
    orig = rl._write
    rl._write = lambda batch: (gate.wait(10), orig(batch))  # a slow disk
    rl._queue.put(items[0])  # the writer takes it and ... waits at its flush
    t0 = time.perf_counter()
    offered = [rl.offer(items[i % 3]) for i in range(50)]
    assert time.perf_counter() - t0 < 0.5  # offers never wait for the writer
    assert sum(offered) <= 2 and rl.dropped == 50 - sum(offered)
    gate.set()
    assert rl.close()
    assert rl.written_rows == (1 + sum(offered)) * 7


def test_sampling_is_stable_by_request_id():
    from serving.reqlog import sampled

    ids = [f"req-{i}" for i in range(20000)]
    picked = [i for i in ids if sampled(i, 0.1)]
    assert picked == [i for i in ids if zlib.crc32(i.encode()) < 0.1 * 2**32]
    assert abs(len(picked) / len(ids) - 0.1) < 0.01
    assert all(sampled(i, 1.0) for i in ids[:10]) and not any(sampled(i, 0.0) for i in ids[:10])


def test_log_settings_name_the_key():
    from serving.settings import RankerSettings

    for bad, key in [
        ({"log_sample_rate": 1.5}, "log_sample_rate"),
        ({"log_flush_seconds": 0}, "log_flush_seconds"),
        ({"log_queue_size": 0}, "log_queue_size"),
        ({"canary_fraction": 0.2}, "canary_fraction"),
        ({"canary_fraction": 2.0, "canary_artifact": "/x"}, "canary_fraction"),
    ]:
        with pytest.raises(ValueError, match=key):
            RankerSettings.from_user_config({"artifact": "/a", **bad})


# ----------------------------------------------------------------------------- join-labels
def _events(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_join_labels_against_a_dict_join(tmp_path, art0):
    from ranking.data.join import join_labels

    day1, _ = _served(art0, 5, seed=1, t=1_700_000_000.0)  # 2023-11-14
    day2, _ = _served(art0, 4, seed=2, t=1_700_100_000.0)  # 2023-11-16
    _write_log(tmp_path / "logs", day1 + day2)
    rng = np.random.default_rng(0)
    events = []
    for s in day1 + day2:
        for c in range(7):
            if rng.random() < 0.3:
                events += [{"request_id": s.request_id, "candidate": c, "label": 1}] * int(
                    rng.integers(1, 3)
                )  # duplicated events count once
    events.append({"request_id": "never-served", "candidate": 0, "label": 1})
    labels = _events(tmp_path / "events.parquet", events)
    res = join_labels(str(tmp_path / "logs"), labels, str(tmp_path / "out"), quiet=True)
    positives = {(e["request_id"], e["candidate"]) for e in events}
    assert res["rows"] == 63 and res["days"] == ["2023-11-14", "2023-11-16"]
    assert res["labelled"] == len(positives) - 1
    got = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert got.num_rows == 63
    for r in got.to_pylist():
        assert r["label"] == float((r["request_id"], r["candidate"]) in positives)
        want_day = "2023-11-14" if r["request_id"].startswith("s1-") else "2023-11-16"
        assert r["dt"] == want_day
    # the files read as training rows in the model's schema
    from ranking.data.convert import batch_from_arrow

    part = pq.read_table(next((tmp_path / "out" / "dt=2023-11-14").glob("*.parquet")))
    b = batch_from_arrow(art0.schema, part)
    assert b.labels.shape == (part.num_rows, 1)

    # --missing drop keeps the served rows with an event only; a day written again is replaced
    res = join_labels(
        str(tmp_path / "logs"), labels, str(tmp_path / "out"), missing="drop", quiet=True
    )
    got = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert got.num_rows == len(positives) - 1 and set(got["label"].to_pylist()) == {1.0}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_join_labels_by_a_configured_key(tmp_path, art0):
    from ranking.data.join import join_labels

    items, _ = _served(art0, 3)
    _write_log(tmp_path / "logs", items)
    s = items[1]
    item = s.candidates[2].get("item", s.context.get("item"))
    labels = _events(
        tmp_path / "ev.parquet", [{"request_id": s.request_id, "item": str(item), "label": 1.0}]
    )
    res = join_labels(
        str(tmp_path / "logs"), labels, str(tmp_path / "o"), key=["request_id", "item"], quiet=True
    )
    want = sum(1 for c in s.candidates if str(c.get("item", s.context.get("item"))) == str(item))
    assert res["labelled"] == want >= 1


def test_join_labels_errors_name_the_column(tmp_path, art0):
    from ranking.data.join import join_labels

    items, _ = _served(art0, 2)
    _write_log(tmp_path / "logs", items)
    bad = _events(tmp_path / "a.parquet", [{"request_id": "x", "label": 1}])
    with pytest.raises(DataError, match=r"lack the key column\(s\) \['candidate'\]"):
        join_labels(str(tmp_path / "logs"), bad, str(tmp_path / "o"), quiet=True)
    bad = _events(tmp_path / "b.parquet", [{"request_id": "x", "candidate": 0, "label": "yes"}])
    with pytest.raises(DataError, match="label column 'label': expected numbers"):
        join_labels(str(tmp_path / "logs"), bad, str(tmp_path / "o"), quiet=True)
    with pytest.raises(DataError, match="no such file"):
        join_labels(str(tmp_path / "logs"), str(tmp_path / "none"), str(tmp_path / "o"))
    with pytest.raises(DataError, match="request log"):
        join_labels(str(tmp_path / "nolog"), bad, str(tmp_path / "o"))


@pytest.mark.slow
def test_join_labels_on_ray_data_equals_arrow(tmp_path, art0):
    from ranking.data.join import join_labels

    items, _ = _served(art0, 6)
    _write_log(tmp_path / "logs", items)
    labels = _events(
        tmp_path / "ev.parquet",
        [{"request_id": s.request_id, "candidate": 1, "label": 1} for s in items[::2]],
    )
    a = join_labels(str(tmp_path / "logs"), labels, str(tmp_path / "a"), quiet=True)
    r = join_labels(str(tmp_path / "logs"), labels, str(tmp_path / "r"), engine="ray", quiet=True)
    assert (a["rows"], a["labelled"], a["days"]) == (r["rows"], r["labelled"], r["days"])
    cols = ["request_id", "candidate", "label", "item"]

    def rows(d):
        t = ds.dataset(d, format="parquet", partitioning="hive").to_table(columns=cols)
        return sorted(map(tuple, (row.values() for row in t.to_pylist())))

    assert rows(tmp_path / "a") == rows(tmp_path / "r")


# ----------------------------------------------------------------------------- consistency
def test_check_consistency_passes_and_catches_skew(tmp_path, art0, art_paths):
    from ranking.consistency import check_consistency
    from ranking.data.servedlog import read_logs

    items, _ = _served(art0, 5)
    other = [
        type(s)(
            s.request_id + "o",
            s.served_at,
            "someoneelse",
            s.schema,
            s.context,
            s.candidates,
            s.probs,
        )
        for s in items[:2]
    ]
    _write_log(tmp_path / "logs", items + other)
    rep = check_consistency(str(art_paths[0]), str(tmp_path / "logs"), quiet=True)
    assert rep["ok"] and rep["rows"] == 35 and rep["other_versions"] == {"someoneelse": 14}
    assert rep["tasks"]["click"]["max_abs"] <= 1e-5
    # skew: one logged score off by 1e-3 -> one row over tolerance, exit 1 from the CLI
    t = read_logs(str(tmp_path / "logs")).to_table()
    scores = t["score_click"].to_numpy().copy()
    i = int(
        np.flatnonzero(t["model_version"].to_numpy(zero_copy_only=False) == art0.model_version)[3]
    )
    scores[i] += 1e-3
    t = t.set_column(t.schema.get_field_index("score_click"), "score_click", pa.array(scores))
    (tmp_path / "skew").mkdir()
    pq.write_table(t, tmp_path / "skew" / "part.parquet")
    rep = check_consistency(str(art_paths[0]), str(tmp_path / "skew"), quiet=True)
    assert not rep["ok"] and rep["tasks"]["click"]["over_tolerance"] == 1
    assert rep["tasks"]["click"]["max_abs"] == pytest.approx(1e-3, rel=1e-2)
    from ranking.cli import main

    assert main(["check-consistency", "--artifact", str(art_paths[0]), "--logs",
                 str(tmp_path / "skew"), "--quiet"]) == 1  # fmt: skip
    # a log of another model only: a clear error naming the version
    _write_log(tmp_path / "only", other)
    with pytest.raises(UserError, match=f"no logged rows of model_version {art0.model_version}"):
        check_consistency(str(art_paths[0]), str(tmp_path / "only"), quiet=True)


# ----------------------------------------------------------------------------- rollout pieces
def gate_rows(art, path, seed: int = 500) -> str:
    """Labelled rows whose labels are model ``art``'s own ranking (above its median score):
    ``art`` is the better model on them by construction. Written to ``path``."""
    from ranking.data.convert import batch_from_rows
    from serving.loadtest import synthetic_request

    rows = []
    for i in range(40):
        body = synthetic_request(art.schema, 25, seed=seed + i)
        rows += [{**body["context"], **c} for c in body["candidates"]]
    probs = art.predict(batch_from_rows(art.schema, rows)).numpy()[:, 0]
    labels = (probs > np.median(probs)).astype(float)
    t = pa.Table.from_pylist([{**r, "label": float(y)} for r, y in zip(rows, labels)])
    pq.write_table(t, path)
    return str(path)


def test_gate_refuses_a_worse_model(tmp_path, art0, art_paths):
    from serving.rollout import RolloutRefused, gate

    data = gate_rows(art0, tmp_path / "gate.parquet")
    rep = gate(str(art_paths[0]), str(art_paths[0]), data, 0.002, None)
    assert rep["new"]["auc"] == rep["serving"]["auc"] > 0.99
    with pytest.raises(RolloutRefused, match=r"gate refused .*a1.*--max-auc-drop 0.002"):
        gate(str(art_paths[1]), str(art_paths[0]), data, 0.002, None)


def _scr(name, value, **labels):
    return {(name, frozenset(labels.items())): value}


def test_shadow_report_correlation_is_numpys():
    from serving.metrics import PREFIX, SHADOW_SUMS

    rng = np.random.default_rng(1)
    x = rng.random(500)
    y = 0.7 * x + 0.3 * rng.random(500)
    sums = {"n": 500, "x": x.sum(), "y": y.sum(), "xx": (x * x).sum(), "yy": (y * y).sum(),
            "xy": (x * y).sum()}  # fmt: skip
    after = {}
    for stat, v in sums.items():
        after.update(_scr(PREFIX + SHADOW_SUMS, v, model_version="v", stat=stat))
    from serving.rollout import shadow_report

    rep = shadow_report(after, {}, "v")
    assert rep["correlation"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-9)
    assert rep["mean_shift"] == pytest.approx(y.mean() - x.mean())


def test_histogram_quantile_interpolates_like_promql():
    from serving.rollout import quantile

    # 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.02], 10 in (0.02, 0.05]
    after = {}
    for le, c in (("0.01", 50), ("0.02", 90), ("0.05", 100), ("+Inf", 100)):
        after.update(_scr("h_bucket", c, le=le))
    assert quantile(after, {}, "h", 0.5) == pytest.approx(0.01)
    assert quantile(after, {}, "h", 0.7) == pytest.approx(0.01 + 0.01 * 20 / 40)
    assert quantile(after, {}, "h", 0.99) == pytest.approx(0.02 + 0.03 * 9 / 10)
    assert quantile({}, {}, "h", 0.99) is None
    assert math.isfinite(quantile(after, {}, "h", 1.0))


# ----------------------------------------------------------------------------- simulated clicks
def test_click_probability_is_the_docstring_formula():
    """``Generator.click_probability`` against the module docstring's logit written out with
    explicit loops over field pairs; day 0 of a drifting signal is the undrifted signal."""
    from ranking.data.synth import Generator

    g = Generator("frappe", seed=5)
    t = g.chunk(0, 40)
    p = g.click_probability(t)
    rows = t.to_pylist()
    cats = [f for f in g.fields if f.kind == "categorical"]
    for r, prob in zip(rows[:10], p[:10]):
        us, bs = [], []
        for f in cats:
            vec, bias = g.hidden[f.column][0], g.hidden[f.column][1]
            i = f.names.to_pylist().index(str(r[f.column]))
            us.append(vec[i])
            bs.append(bias[i])
        pair = sum(float(us[a] @ us[b]) for a in range(len(us)) for b in range(a + 1, len(us)))
        logit = g.scale[0] * pair + g.scale[1] * sum(bs) + g.bias
        assert prob == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-9)
    assert np.allclose(Generator("frappe", seed=5, day=0, drift=0.3).click_probability(t), p)
    moved = Generator("frappe", seed=5, day=3, drift=0.3).click_probability(t)
    assert not np.allclose(moved, p)


def test_check_consistency_of_a_bf16_artifact_has_its_own_tolerance(tmp_path):
    """A bf16 artifact is served in bf16 and re-scored in fp32: its log passes at the bf16
    tolerance and not at fp32's (the tolerance is what makes it pass)."""
    from benchmarks.artifacts import make_artifact
    from ranking.consistency import BF16_TOLERANCE, FP32_TOLERANCE, check_consistency
    from ranking.export import load_artifact

    path = make_artifact(tmp_path / "bf16", seed=3, dtype="bf16")
    art = load_artifact(path)
    assert art.dtype == "bf16"
    items, _ = _served(art, 6, n_cand=20)
    _write_log(tmp_path / "logs", items)
    rep = check_consistency(str(path), str(tmp_path / "logs"), quiet=True)
    assert rep["tolerance"] == BF16_TOLERANCE and rep["ok"]
    strict = check_consistency(
        str(path), str(tmp_path / "logs"), tolerance=FP32_TOLERANCE, quiet=True
    )
    assert not strict["ok"] and strict["tasks"]["click"]["max_abs"] > FP32_TOLERANCE


# ----------------------------------------------------------------------------- every shipped config
REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(
    [*REPO.glob("configs/frappe_*.yaml"), *REPO.glob("configs/movielens_*.yaml"),
     *REPO.glob("configs/synth_sequence_*.yaml"), *REPO.glob("configs/scale_*.yaml"),
     REPO / "configs/demo.yaml"]
)  # fmt: skip
SCALE_ROWS = 4096  # the scale configs' tables (10^7, 10^8 rows) capped for a test


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_served_and_logged_requests_rescore_exactly_for_every_shipped_config(tmp_path, config):
    """Train/serve consistency over every shipped config's model, schema and vocabulary mode
    (the scale configs' tables capped at ``SCALE_ROWS`` rows):
    requests parsed and scored as the Ranker does (several merged into one formed batch, the
    serving lowering), logged, then re-scored by ``check-consistency`` through the training
    path: at most 1e-5 apart. With ``vocab_from_train`` the vocabularies come from the first
    requests' values, so later requests also send values out of the vocabulary."""
    from benchmarks.artifacts import make_artifact
    from ranking.consistency import check_consistency
    from ranking.data.convert import table_from_rows
    from ranking.data.encode import merged_batch
    from ranking.data.servedlog import Served
    from ranking.data.vocab import build_vocabs
    from ranking.export import load_artifact
    from ranking.train.config import load_experiment
    from serving.loadtest import synthetic_request
    from serving.request import Limits, parse_json

    exp = load_experiment(config, require_data=False)
    bodies = [synthetic_request(exp.schema, 12, seed=40 + i) for i in range(4)]
    schema_ref: str = str(exp.raw["schema"])
    if not schema_ref.endswith((".yaml", ".yml")) or config.stem.startswith("scale_"):
        d = exp.schema.to_dict()
        for f in d["features"] if config.stem.startswith("scale_") else []:
            if f.get("num_buckets"):
                f["num_buckets"] = min(f["num_buckets"], SCALE_ROWS)
        schema_ref = str(tmp_path / "schema.yaml")
        Path(schema_ref).write_text(yaml.safe_dump(d))
    if exp.data.vocab_from_train:
        rows = [{**b["context"], **c} for b in bodies[:2] for c in b["candidates"]]
        pq.write_table(table_from_rows(exp.schema, rows), tmp_path / "seen.parquet")
        build_vocabs(exp.schema, [str(tmp_path / "seen.parquet")], tmp_path / "vocab")
        schema_ref = str(tmp_path / "vocab" / "schema.yaml")
    path = make_artifact(tmp_path / "art", schema=schema_ref, model=exp.raw["model"], seed=1)
    art = load_artifact(path)
    assert bool(exp.data.vocab_from_train) == any(f.vocab for f in art.schema.features)
    reqs = [
        parse_json(json.dumps({**b, "request_id": f"q{i}"}).encode(), art.schema, Limits())
        for i, b in enumerate(bodies)
    ]
    probs = art.predict(merged_batch(art.schema, [r.features for r in reqs])).numpy()
    items, start = [], 0
    for r in reqs:
        p = probs[start : start + r.size]
        start += r.size
        items.append(
            Served(
                r.request_id, time.time(), art.model_version, art.schema, r.context, r.candidates, p
            )
        )
    _write_log(tmp_path / "logs", items)
    rep = check_consistency(str(path), str(tmp_path / "logs"), quiet=True)
    assert rep["rows"] == 48 and rep["ok"], rep
    assert max(t["max_abs"] for t in rep["tasks"].values()) <= 1e-5


def test_a_schema_whose_columns_clash_with_the_log_is_refused_by_name():
    from ranking.data.servedlog import arrow_schema
    from ranking.features import FeatureSchema, load_schema

    d = load_schema("frappe").to_dict()
    d["features"][0]["column"] = "request_id"
    with pytest.raises(ValueError, match=r"\['request_id'\] clash"):
        arrow_schema(FeatureSchema.from_dict(d))
