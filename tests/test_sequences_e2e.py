"""Behaviour sequences end to end (#21): trained by ``mixrank train`` on 2 torchrun ranks (the
history's table shared with the candidate item in a sharded TorchRec EmbeddingCollection),
exported, served by a real Ray Serve on localhost over HTTP and gRPC with the histories in
``context``, and scored offline from Parquet rows that carry the history on every row: the
online scores equal the offline ones (1e-5), alone and when concurrent requests are batched
together (one history row per request). Bad sequence inputs get a 422 naming the field.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.client import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from ranking.cli import main as cli

    root = tmp_path_factory.mktemp("seqe2e")
    for split, rows, seed in (("train", 4096, 1), ("valid", 1024, 2)):
        args = ["data", "synth", "--preset", "sequence", "--rows", str(rows), "--seed", str(seed)]
        assert cli([*args, "--out", str(root / split), "--quiet"]) == 0
    run = root / "run"
    rc = cli(
        [
            "train",
            "--config",
            str(REPO / "configs/synth_sequence_target_attention.yaml"),
            "--nproc",
            "2",
            "--run-dir",
            str(run),
            f"data.train={root / 'train'}",
            f"data.valid={root / 'valid'}",
            "data.batch_size=256",
            "train.epochs=1",
            "train.threads=1",
        ]
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["click"]["auc"] > 0.5
    return run / "artifact"


@pytest.fixture(scope="module")
def svc(artifact):
    from serving import config
    from serving.client import GRPCClient, HTTPClient

    http, grpc_ = free_port(), free_port()
    cfg = config.load_config(
        artifact=artifact,
        http_port=http,
        grpc_port=grpc_,
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": 1, "user_config": {"batch_wait_timeout_s": 0.05}}},
    )
    try:
        config.start(cfg, metrics_port=free_port(), num_cpus=4)
        yield HTTPClient("127.0.0.1", http), GRPCClient("127.0.0.1", grpc_), http
    finally:
        config.stop()


def _offline(artifact, req: dict, tmp_path: Path) -> np.ndarray:
    """The request's rows (context merged into every candidate, so each row carries the
    history), written to Parquet and scored by the artifact through the training data path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ranking.data.convert import batch_from_arrow
    from ranking.export import load_artifact

    art = load_artifact(artifact)
    rows = [{**req["context"], **c} for c in req["candidates"]]
    cols = {
        c: pa.array([r.get(c) for r in rows]) for c in dict.fromkeys(k for r in rows for k in r)
    }
    path = tmp_path / f"{req['request_id']}.parquet"
    pq.write_table(pa.table(cols), path)
    batch = batch_from_arrow(art.schema, pq.read_table(path), with_labels=False)
    assert batch.seq_of is None  # one history per row offline
    return art.predict(batch).numpy()


def _request(i: int, n: int, history: int | None = None) -> dict:
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    req = synthetic_request(load_schema("synth_sequence"), n, seed=i, history=history)
    # ids as strings and integers both hash through their decimal form
    req["context"]["item_hist"] = [str(x) for x in req["context"]["item_hist"]]
    return req


def test_online_scores_equal_offline_with_histories(artifact, svc, tmp_path):
    http, grpc_, _ = svc
    req = _request(1, 40, history=30)
    want = _offline(artifact, req, tmp_path)
    for client in (http, grpc_):
        got = client.rank(req)
        np.testing.assert_allclose(got["scores"], want[:, 0], rtol=0, atol=ATOL)
        np.testing.assert_allclose(got["task_scores"]["conversion"], want[:, 1], atol=ATOL)
    # an empty history scores like no history at all
    empty = {**req, "context": {**req["context"], "item_hist": [], "act_hist": []}}
    none = {**req, "context": {k: v for k, v in req["context"].items() if "hist" not in k}}
    np.testing.assert_allclose(http.rank(empty)["scores"], http.rank(none)["scores"], atol=ATOL)


def test_concurrent_requests_batched_with_one_history_each(artifact, svc, tmp_path):
    from serving.client import HTTPClient

    port = svc[2]
    reqs = [_request(10 + i, 5 + 7 * i) for i in range(8)]
    want = [_offline(artifact, r, tmp_path)[:, 0] for r in reqs]
    with ThreadPoolExecutor(8) as pool:  # one connection per request
        got = list(pool.map(lambda r: HTTPClient("127.0.0.1", port).rank(r), reqs))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["scores"], w, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["candidates"][2].update(item_hist=[1, 2]), "candidates[2].item_hist"),
        (lambda r: r["context"].update(act_hist=[1]), "context.act_hist"),
        (lambda r: r["context"].update(item_hist="1,2,3"), "context.item_hist"),
        (lambda r: r["context"].update(item_hist=[[1]]), "context.item_hist[0]"),
    ],
)
def test_bad_sequences_get_422_naming_the_field(svc, change, field):
    http = svc[0]
    req = _request(3, 4, history=3)
    change(req)
    status, body = http.rank_raw(json.dumps(req).encode())
    assert status == 422, body
    assert body["error"]["field"] == field, body
    assert http.rank(_request(4, 3))["scores"]  # the replica still answers
