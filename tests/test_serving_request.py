"""Serving without Ray: request validation, context broadcast, answers, the committed proto code.

The references are independent of the code under test: broadcast is checked against
``batch_from_rows`` on the merged dicts, rankings against a plain sort, and the generated
protobuf modules against a fresh ``grpc_tools.protoc`` run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ranking.data import encode as encode_mod
from ranking.data.convert import batch_from_rows
from ranking.data.encode import merged_batch
from ranking.features import FeatureSchema
from serving.errors import RequestError
from serving.request import Limits, parse_json, parse_proto, validate

REPO = Path(__file__).resolve().parents[1]

SCHEMA = FeatureSchema.from_dict(
    {
        "name": "mixed",
        "tasks": [{"name": "click", "label": "label"}, {"name": "like", "label": "like"}],
        "features": [
            {"name": "user", "kind": "categorical", "num_buckets": 64, "dim": 4, "group": "u"},
            {"name": "age", "kind": "dense", "transform": "log1p", "fill": 1.5, "group": "u"},
            {"name": "item", "kind": "categorical", "num_buckets": 128, "dim": 4, "group": "i"},
            {"name": "tags", "kind": "id_list", "num_buckets": 32, "dim": 4, "group": "i"},
            {"name": "price", "kind": "dense", "clip": [0, 50], "group": "i"},
        ],
    }
)
LIMITS = Limits(max_candidates=8, max_string_length=16, max_list_items=4)


def _parse(obj) -> object:
    return parse_json(
        json.dumps(obj).encode() if not isinstance(obj, bytes) else obj, SCHEMA, LIMITS
    )


def _assert_same_batch(a, b) -> None:
    torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values())
    assert torch.equal(a.sparse.lengths(), b.sparse.lengths())


@pytest.fixture(params=["c", "python"])
def scan_path(request, monkeypatch):
    """Validation's one-pass hashing (``ranking.data.fastrows.scan``) through the C extension
    and through its pure-Python fallback."""
    from ranking.data import fastrows

    if request.param == "c" and not fastrows.AVAILABLE:
        pytest.skip("ranking.data._fastrows is not built")
    monkeypatch.setattr(fastrows, "AVAILABLE", request.param == "c")
    return request.param


# ----------------------------------------------------------------------------- context broadcast
CANDIDATES = [
    {"item": "a", "tags": [1, "x"], "price": 3.5},
    {"item": 7, "user": "override", "age": None},  # own user wins; explicit null wins too
    {"item": "c", "tags": None},
    {"item": 9.0, "tags": [], "price": 80},
    {"age": 12, "tags": ["q", None, 5, 6]},
]


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"user": "u1", "age": 33},
        {"user": 5, "tags": [4, 4, "z"], "price": 1.25},  # an id_list and a dense in context
        {"age": 0.5, "item": "ctx-item"},  # every candidate but one overrides item
    ],
)
def test_context_broadcast_equals_merged_dicts(context, scan_path):
    req = _parse({"context": context, "candidates": CANDIDATES})
    got = merged_batch(SCHEMA, [req.features])
    want = batch_from_rows(SCHEMA, [{**context, **c} for c in CANDIDATES])
    _assert_same_batch(got, want)


# Values the column-at-a-time check accepts, so encoding reuses the value lists it gathered
# (``encode.Checked.columns``); a candidate's explicit null still beats the context.
FAST_CANDIDATES = [
    {"item": "a", "tags": [1, 2], "price": 3.5},
    {"item": "b", "user": "override", "age": None},
    {"item": "c", "tags": None},
    {"tags": [], "price": 80},
    {"age": 12, "tags": [3, 4, 5, 6]},
]


@pytest.mark.parametrize(
    "context",
    [{}, {"user": "u1", "age": 33}, {"user": "u2", "tags": [4, 4], "price": 1.25}, {"item": "x"}],
)
@pytest.mark.parametrize("mixed", [False, True])
def test_validated_columns_featurise_like_merged_dicts(context, mixed, scan_path):
    cands = [dict(c) for c in FAST_CANDIDATES]
    if mixed:  # ints, not strings: "item" leaves the one-pass hashing for the table path
        for i, c in enumerate([*cands, context := dict(context)]):
            if "item" in c:
                c["item"] = 10 + i
    req = _parse({"context": context, "candidates": cands})
    checked = encode_mod.check_columns(SCHEMA, context, cands, 16, 4)
    assert checked is not None  # the fast path ran
    sent = {k for c in cands for k in c}
    hashed = {"user", "item"} & (sent | set(context))
    if mixed and "item" in sent:
        hashed.discard("item")
    assert set(checked.hashed) == hashed  # plainly hashed, all strings or null: one pass
    assert set(checked.columns) == sent - hashed  # the others keep their value lists
    got = merged_batch(SCHEMA, [req.features])
    want = batch_from_rows(SCHEMA, [{**context, **c} for c in cands])
    _assert_same_batch(got, want)


def test_several_requests_concatenate_in_order():
    r1 = _parse({"context": {"user": "a"}, "candidates": CANDIDATES[:2]})
    r2 = _parse({"context": {"tags": [1]}, "candidates": CANDIDATES[2:]})
    got = merged_batch(SCHEMA, [r1.features, r2.features])
    rows = [{"user": "a", **c} for c in CANDIDATES[:2]] + [
        {"tags": [1], **c} for c in CANDIDATES[2:]
    ]
    _assert_same_batch(got, batch_from_rows(SCHEMA, rows))


# ----------------------------------------------------------------------------- validation
BAD = [
    (b"{not json", 400, "invalid_json", None),
    (b"\xff\xfe", 400, "invalid_json", None),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None),
    ([1, 2], 422, "invalid_type", None),
    ({"candidates": [{}], "extra": 1}, 422, "unknown_field", "extra"),
    ({}, 422, "missing_field", "candidates"),
    ({"candidates": {}}, 422, "invalid_type", "candidates"),
    ({"candidates": []}, 422, "empty_candidates", "candidates"),
    ({"candidates": [{}] * 9}, 413, "too_many_candidates", "candidates"),
    ({"candidates": [{}, "x"]}, 422, "invalid_type", "candidates[1]"),
    ({"candidates": [{"colour": 1}]}, 422, "unknown_feature", "candidates[0].colour"),
    ({"context": {"colour": 1}, "candidates": [{}]}, 422, "unknown_feature", "context.colour"),
    ({"context": [], "candidates": [{}]}, 422, "invalid_type", "context"),
    ({"candidates": [{"item": True}]}, 422, "invalid_type", "candidates[0].item"),
    ({"candidates": [{"item": {"a": 1}}]}, 422, "invalid_type", "candidates[0].item"),
    ({"candidates": [{"item": [1]}]}, 422, "invalid_type", "candidates[0].item"),
    ({"candidates": [{"item": 1.5}]}, 422, "invalid_value", "candidates[0].item"),
    ({"candidates": [{}, {"item": "x" * 17}]}, 422, "value_too_long", "candidates[1].item"),
    ({"candidates": [{"item": 2**70}]}, 422, "invalid_value", "candidates[0].item"),
    (b'{"candidates": [{"item": "\\ud800"}]}', 422, "invalid_value", "candidates[0].item"),
    ({"candidates": [{"price": "3"}]}, 422, "invalid_type", "candidates[0].price"),
    ({"candidates": [{"price": [1.0]}]}, 422, "invalid_type", "candidates[0].price"),
    (b'{"candidates": [{"price": NaN}]}', 422, "invalid_value", "candidates[0].price"),
    (b'{"candidates": [{"price": Infinity}]}', 422, "invalid_value", "candidates[0].price"),
    (b'{"context": {"age": -Infinity}, "candidates": [{}]}', 422, "invalid_value", "context.age"),
    ({"candidates": [{"price": 10**400}]}, 422, "invalid_value", "candidates[0].price"),
    ({"candidates": [{"tags": "abc"}]}, 422, "invalid_type", "candidates[0].tags"),
    ({"candidates": [{"tags": [1, [2]]}]}, 422, "invalid_type", "candidates[0].tags[1]"),
    ({"candidates": [{"tags": [1, 2, 3, 4, 5]}]}, 422, "value_too_long", "candidates[0].tags"),
    ({"candidates": [{}], "top_k": 0}, 422, "invalid_value", "top_k"),
    ({"candidates": [{}], "top_k": "3"}, 422, "invalid_type", "top_k"),
    ({"candidates": [{}], "top_k": True}, 422, "invalid_type", "top_k"),
    ({"candidates": [{}], "request_id": 5}, 422, "invalid_type", "request_id"),
    ({"candidates": [{}], "request_id": "r" * 300}, 422, "value_too_long", "request_id"),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD)
def test_bad_requests_name_status_code_and_field(body, status, code, field, scan_path):
    with pytest.raises(RequestError) as ei:
        _parse(body)
    e = ei.value
    assert (e.status, e.code, e.field) == (status, code, field), e.message
    assert "Traceback" not in e.message and len(e.message) < 600


def test_valid_values_accepted():
    req = _parse(
        {
            "request_id": "r1",
            "context": {"user": None, "age": 3},
            "candidates": [{"item": -4, "tags": [1, "a", None], "price": 2.5}, {"item": 3.0}],
            "top_k": 5,
        }
    )
    assert (req.request_id, req.size, req.top_k) == ("r1", 2, 5)
    assert len(_parse({"candidates": [{}]}).request_id) == 32  # generated when absent


def test_proto_request_round_trips_to_the_json_shape():
    from serving.client import to_proto_request

    request = {
        "request_id": "p1",
        "context": {"user": "u", "age": 2.5},
        "candidates": [{"item": 3, "tags": ["a", 2, None]}, {"item": None, "price": 1.0}],
        "top_k": 1,
    }
    msg = to_proto_request(request)
    # bytes (the separate ingress's hop) or the message gRPC already decoded: the same request
    for body in (msg.SerializeToString(), msg):
        req = parse_proto(body, SCHEMA, LIMITS)
        assert (req.request_id, req.context, req.candidates, req.top_k) == (
            "p1",
            request["context"],
            request["candidates"],
            1,
        )
    with pytest.raises(RequestError) as ei:
        parse_proto(b"\xff\xff\xff", SCHEMA, LIMITS)
    assert (ei.value.status, ei.value.code) == (400, "invalid_proto")


def test_validate_rejects_what_batch_from_rows_would_reject():
    # Anything validate() accepts must convert without error (no 500s from the feature code).
    ok = validate(
        {"candidates": [{"item": 2**63 - 1, "tags": [-(2**63)], "price": 1e300}]}, SCHEMA, LIMITS
    )
    assert len(ok.features) == 1


# ----------------------------------------------------------------------------- answers
def test_rank_response_orders_best_first_and_keeps_input_order(tmp_path):
    from benchmarks.artifacts import make_artifact
    from serving.model import load_validated, rank_response

    art = load_validated(
        make_artifact(
            tmp_path / "mt",
            tasks=[{"name": "click", "label": "label"}, {"name": "like", "label": "like"}],
        ),
        None,
        None,
    )
    probs = np.array([[0.2, 0.9], [0.7, 0.1], [0.2, 0.5], [0.9, 0.3]], dtype=np.float32)
    out = rank_response(art, "r", probs, None)
    assert out["scores"] == probs[:, 0].tolist()
    want = sorted(range(4), key=lambda i: (-float(probs[i, 0]), i))
    assert out["ranking"] == want == [3, 1, 0, 2]
    assert out["task_scores"] == {"click": probs[:, 0].tolist(), "like": probs[:, 1].tolist()}
    assert rank_response(art, "r", probs, 2)["ranking"] == [3, 1]
    assert rank_response(art, "r", probs, 10)["ranking"] == want


def test_reload_validation_refuses_incompatible_and_corrupt_artifacts(tmp_path):
    from benchmarks.artifacts import make_artifact
    from ranking.export import ArtifactError
    from serving.model import load_validated

    base = load_validated(make_artifact(tmp_path / "a"), "auto", None)
    assert load_validated(make_artifact(tmp_path / "b", seed=1), "bf16", base).dtype == "bf16"
    i8 = load_validated(make_artifact(tmp_path / "i8", seed=1), "int8", base)  # CPU int8 GEMMs
    assert i8.dtype == "int8" and type(i8.lowered()).__name__ == "InferenceRanker"
    assert type(i8.lowered().blocks.blocks[0]).__name__.startswith("Int8")
    other = make_artifact(tmp_path / "c", schema="movielens")
    with pytest.raises(ArtifactError, match="not compatible"):
        load_validated(other, None, base)
    bad = make_artifact(tmp_path / "d", seed=2)
    (bad / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"weights\.pt"):
        load_validated(bad, None, base)


def test_compiled_epilogues_compile_before_the_model_takes_traffic(tmp_path):
    """A model served with ``inference.compile_epilogues`` compiles in ``load_validated`` (static shape, then
    the dynamic batch dimension), so requests of new sizes add no graph, and scores equal the
    eager forward's."""
    import torch
    from torch._dynamo.utils import counters

    from benchmarks.artifacts import make_artifact
    from ranking.data.convert import batch_from_rows
    from ranking.inference import optimize_for_inference
    from serving.model import load_validated

    model = {"arch": "tokenmixer_large", "dim": 16, "num_heads": 4}
    path = make_artifact(tmp_path / "a", model=model, inference={"compile_epilogues": True})
    torch._dynamo.reset()
    counters.clear()
    art = load_validated(path, "fp32", None)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 2  # the norm and the SwiGLU epilogues at least
    eager = optimize_for_inference(art.model, dtype="fp32")
    rows = [{"user": f"u{i}", "item": f"i{i}"} for i in range(37)]
    for n in (1, 5, 37):
        batch = batch_from_rows(art.schema, rows[:n])
        got = art.predict(batch)
        want = torch.sigmoid(eager(batch).logits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled after loading


# ----------------------------------------------------------------------------- generated code
def test_committed_proto_code_matches_regeneration(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "serving" / "proto").mkdir(parents=True)
    src = REPO / "serving" / "proto" / "ranking.proto"
    (tmp_path / "serving" / "proto" / "ranking.proto").write_bytes(src.read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "serving/proto/ranking.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("ranking_pb2.py", "ranking_pb2_grpc.py"):
        fresh = (tmp_path / "serving" / "proto" / name).read_text()
        assert fresh == (REPO / "serving" / "proto" / name).read_text(), (
            f"serving/proto/{name} is stale: regenerate it (see ranking.proto's header)"
        )


# ----------------------------------------------------------------------------- fast paths
def _fuzz_requests(n: int, seed: int):
    """Random requests, about half of them with one bad value somewhere."""
    rng = np.random.default_rng(seed)
    good = {
        "user": lambda: rng.choice(["u1", "u22", None, 5, -3, 7.0]),
        "item": lambda: rng.choice(["a", "bb", 3, 2**62, None]),
        "tags": lambda: [rng.choice(["x", 1, None, 4.0]) for _ in range(rng.integers(0, 4))],
        "age": lambda: rng.choice([1, 2.5, None, -7, 0.0]),
        "price": lambda: rng.choice([3, 80.5, None]),
    }
    bad = [
        ("item", 1.5), ("item", True), ("item", 2**70), ("item", "x" * 17), ("item", "\ud800"),
        ("item", [1]), ("tags", [1, 2, 3, 4, 5]), ("tags", "abc"), ("tags", [[1]]),
        ("tags", ["y" * 17]), ("tags", [2**64]), ("age", float("nan")), ("age", float("inf")),
        ("age", "3"), ("age", 10**400), ("price", True), ("colour", 1),
    ]  # fmt: skip
    out = []
    for _ in range(n):
        cands = [
            {k: v() for k, v in good.items() if rng.random() < 0.7}
            for _ in range(rng.integers(1, 6))
        ]
        cands = [{k: (v.item() if hasattr(v, "item") else v) for k, v in c.items()} for c in cands]
        ctx = {"user": "ctx"} if rng.random() < 0.5 else {}
        if rng.random() < 0.5:
            name, value = bad[rng.integers(len(bad))]
            target = ctx if (ctx and rng.random() < 0.3) else cands[rng.integers(len(cands))]
            target[name] = value
        out.append({"context": ctx, "candidates": cands})
    return out


def _outcome(obj):
    try:
        r = validate(obj, SCHEMA, LIMITS)
    except RequestError as e:
        return ("error", e.status, e.code, e.field)
    return ("ok", r.context, r.candidates)


def test_fast_validation_agrees_with_the_per_value_checks(monkeypatch, scan_path):
    """The column-at-a-time check only ever says "fine" where the per-value checks agree: on
    random valid and invalid requests both give the same answer or the same error."""
    reqs = _fuzz_requests(400, seed=0)
    fast = [_outcome(r) for r in reqs]
    monkeypatch.setattr(encode_mod, "check_columns", lambda *a: None)
    slow = [_outcome(r) for r in reqs]
    assert fast == slow
    kinds = {o[0] for o in fast}
    assert kinds == {"ok", "error"}  # the fuzz covers both


def test_fast_conversion_hashes_ints_as_their_decimal_strings():
    """All-int and all-string columns take Arrow's bulk conversion; mixed columns the per-value
    loop. Ints, their decimal strings and integral floats must give the same features."""
    as_int = [{"item": i, "tags": [i, i + 1], "price": i % 100} for i in (3, -5, 2**62, 0)]
    as_str = [{"item": str(r["item"]), "tags": [str(t) for t in r["tags"]], "price": float(r["price"])} for r in as_int]  # fmt: skip
    mixed = [dict(r) for r in as_str]
    mixed[0]["item"], mixed[1]["tags"] = float(as_int[0]["item"]), [-5, "-4"]
    ref = batch_from_rows(SCHEMA, as_str)
    for rows in (as_int, mixed):
        _assert_same_batch(batch_from_rows(SCHEMA, rows), ref)


def test_serve_config_refuses_unknown_user_config_keys(tmp_path):
    """A typo in deploy/serve.yaml's user_config is an error naming the key, not a silent
    default; the shipped file passes."""
    import yaml

    from ranking.errors import UserError
    from serving import config

    cfg = config.load_config()  # the shipped deploy/serve.yaml
    ranker = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ranker")
    assert set(ranker["user_config"]) <= config.USER_CONFIG_KEYS["Ranker"]
    bad = yaml.safe_load(config.DEFAULT_CONFIG.read_text())
    dep = next(d for d in bad["applications"][0]["deployments"] if d["name"] == "Ranker")
    dep["user_config"]["max_batch_wait"] = 0.05  # typo of max_batch_wait_s
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"user_config\.max_batch_wait: unknown key"):
        config.load_config(path)
    with pytest.raises(UserError, match=r"user_config\.torch_thread: unknown key"):
        config.load_config(deployments={"Ranker": {"user_config": {"torch_thread": 2}}})


def test_ranker_forward_in_thread_values():
    """``forward_in_thread`` is a YAML boolean or "auto"; a string such as "yes" or "false"
    would silently be truthy, so reconfigure refuses it, naming the key, before touching the
    model. ``auto`` moves the forward to a thread once formed batches take > 0.1 s."""
    import asyncio

    from serving.ranker import Ranker

    ranker = Ranker.func_or_class()
    for bad in ("yes", "false", 1):
        with pytest.raises(ValueError, match=r"forward_in_thread must be true, false or auto"):
            asyncio.run(ranker.reconfigure({"artifact": "/nonexistent", "forward_in_thread": bad}))
    assert ranker._art is None
    from serving.ranker import THREAD_AFTER_S

    assert ranker._forward_in_thread == "auto"
    for batch_s, expect in ((0.0, False), (THREAD_AFTER_S / 2, False), (THREAD_AFTER_S * 2, True)):
        ranker._batch_s = batch_s
        assert ranker._in_thread() is expect
    for forced in (True, False):
        ranker._forward_in_thread = forced
        assert ranker._in_thread() is forced


@pytest.mark.parametrize("exchange", [True, False])
def test_rewriting_an_artifact_in_place_never_leaves_the_path_missing(
    tmp_path, monkeypatch, exchange
):
    """Exporting again to the same directory swaps the new artifact in: a reader polling the
    manifest meanwhile always finds one of the written versions (with the atomic exchange; the
    move-aside fallback is checked for its end state), and no temporary siblings remain."""
    import threading

    import ranking.export as export
    from benchmarks.artifacts import make_artifact

    if not exchange:
        monkeypatch.setattr(export, "_exchange", lambda a, b: False)
    out = tmp_path / "current"
    versions = {export.read_manifest(make_artifact(out, seed=0))["model_version"]}
    missing, seen, stop = [], set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads((out / "manifest.json").read_text())["model_version"])
            except (OSError, ValueError) as e:
                missing.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for seed in range(1, 6):
            versions.add(export.read_manifest(make_artifact(out, seed=seed))["model_version"])
    finally:
        stop.set()
        t.join()
    assert len(versions) == 6 and seen <= versions
    assert export.read_manifest(out)["model_version"] in versions
    if exchange:
        assert not missing, missing[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["current"]


# ----------------------------------------------------------------------------- JSON in and out
JSON_BODIES = [
    b'{"candidates": [{"item": "a"}], "top_k": 3}',
    '{"context": {"user": "Zürich \\u00e9 東京 😀"}, "candidates": [{"price": -0.0}]}'.encode(),
    b'{"a": [1e-7, 1.5e300, -2.25, 0, -0, 12345678901234567]}',
    b'{"big": 18446744073709551616, "neg": -9223372036854775809, "edge": 9223372036854775808}',
    b'{"f": 1234567890123456789.0, "s": "1234567890123456789012"}',
    b'{"dup": 1, "dup": 2}',
    b'  [true, false, null, "\\n\\t\\"\\\\"]  ',
]


@pytest.mark.parametrize("body", JSON_BODIES)
def test_json_decoding_equals_the_standard_library(body):
    from serving import jsonio

    got, want = jsonio.loads(body), json.loads(body)
    assert got == want
    assert json.dumps(got) == json.dumps(want)  # same types too (an int stays an int)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe", b'{"a": NaN}', b'"\\ud800"', b"[" * 2000 + b"]" * 2000, b"{}x"],
)
def test_json_decoding_refuses_or_accepts_like_the_standard_library(body):
    from serving import jsonio

    def outcome(fn):
        try:
            v = fn(body)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            return type(e), str(e)
        return "ok", json.dumps(v)

    assert outcome(jsonio.loads) == outcome(json.loads)


def test_answers_encode_to_json_that_reads_back_exactly():
    from serving import jsonio

    rng = np.random.default_rng(0)
    scores = [*rng.random(256).astype(np.float32).tolist(), 0.0, 1.0, 1e-30]
    body = {"request_id": "r-ü", "model_version": "abc", "scores": scores, "ranking": [2, 0, 1]}
    assert json.loads(jsonio.dumps(body)) == body


CATEGORICAL_ONLY = FeatureSchema.from_dict(
    {
        "name": "cats",
        "tasks": [{"name": "click", "label": "label"}],
        "features": [
            {"name": "user", "kind": "categorical", "num_buckets": 64, "dim": 4, "group": "u"},
            {"name": "item", "kind": "categorical", "num_buckets": 128, "dim": 4, "group": "i"},
            {"name": "city", "kind": "categorical", "num_buckets": 2**33, "dim": 4, "group": "i"},
        ],
    }
)


@pytest.mark.parametrize("context", [{}, {"user": "u1"}, {"user": None, "city": "Zürich"}])
def test_all_hashed_features_featurise_like_merged_dicts(context, scan_path):
    """Every feature hashed during validation: no Arrow table is built at all."""
    cands = [{"item": "a", "city": "東京"}, {"user": "own", "item": None}, {}, {"city": None}]
    req = parse_json(
        json.dumps({"context": context, "candidates": cands}).encode(), CATEGORICAL_ONLY, LIMITS
    )
    checked = encode_mod.check_columns(CATEGORICAL_ONLY, context, cands, 16, 4)
    assert checked.columns == {} and set(checked.hashed) == {"user", "item", "city"} & {
        k for c in [*cands, context] for k in c
    }
    got = merged_batch(CATEGORICAL_ONLY, [req.features])
    want = batch_from_rows(CATEGORICAL_ONLY, [{**context, **c} for c in cands])
    _assert_same_batch(got, want)


# ----------------------------------------------------------------------------- gRPC wire reader
def _same(a, b) -> bool:
    """Equal values of equal types (NaN equals NaN, -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (a != a and b != b) or (a == b and np.copysign(1, a) == np.copysign(1, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _random_value(rng, pb, fv, depth=0):
    kind = rng.integers(6 if depth < 2 else 4)
    if kind == 0:
        fv.string_value = rng.choice(["", "a", "item-7", "Zürich", "東京", "😀"]) * int(
            rng.integers(1, 3)
        )
    elif kind == 1:
        fv.int_value = int(
            rng.choice([0, 1, -1, 2**63 - 1, -(2**63), int(rng.integers(-1e9, 1e9))])
        )
    elif kind == 2:
        fv.float_value = float(
            rng.choice([0.0, -0.0, 1.5, float("nan"), float("inf"), rng.normal()])
        )
    elif kind == 3:
        pass  # no kind set: null
    else:
        fv.list_value.SetInParent()  # an empty list is a list, not null
        for _ in range(rng.integers(0, 4)):
            _random_value(rng, pb, fv.list_value.values.add(), depth + 1)


def _random_message(rng):
    from serving.proto import ranking_pb2 as pb

    msg = pb.RankRequest(request_id=rng.choice(["", "r1", "ü-2"]), top_k=int(rng.integers(-3, 5)))
    names = ["user", "item", "", "city", "東"]
    for _ in range(rng.integers(0, 3)):
        _random_value(rng, pb, msg.context[str(rng.choice(names))])
    for _ in range(rng.integers(0, 5)):
        c = msg.candidates.add()
        for _ in range(rng.integers(0, 4)):
            _random_value(rng, pb, c.features[str(rng.choice(names))])
    data = msg.SerializeToString()
    if rng.random() < 0.3:  # unknown fields (a varint and a length-delimited one), kept by protobuf
        data += bytes([15 << 3 | 0, 0x96, 0x01, 14 << 3 | 2, 2, 0x41, 0x42])
    return data


def test_fast_proto_reader_equals_protobuf():
    from serving import request as request_mod
    from serving.proto import ranking_pb2

    if not request_mod.FAST_PROTO:
        pytest.skip("serving._fastproto is not built")
    from serving import _fastproto

    rng = np.random.default_rng(0)
    fast = 0
    for _ in range(600):
        data = _random_message(rng)
        want = request_mod.proto_to_dict(ranking_pb2.RankRequest.FromString(data))
        got = _fastproto.decode(data)
        assert got is not None and _same(got, want), (data, got, want)
        fast += 1
        # corrupted: protobuf refuses it -> the reader gives up too; protobuf reads it -> the
        # reader gives up or agrees
        bad = bytearray(data)
        op = rng.integers(3)
        if op == 0 and bad:
            bad = bad[: rng.integers(len(bad))]
        elif op == 1 and bad:
            bad[rng.integers(len(bad))] = int(rng.integers(256))
        else:
            bad[rng.integers(len(bad) + 1) : 0] = bytes(rng.integers(0, 256, 3).tolist())
        try:
            ref = request_mod.proto_to_dict(ranking_pb2.RankRequest.FromString(bytes(bad)))
        except Exception:
            ref = None
        out = _fastproto.decode(bytes(bad))
        assert out is None or (ref is not None and _same(out, ref)), (bytes(bad), out, ref)
    assert fast == 600


def test_proto_requests_parse_alike_on_both_readers(monkeypatch):
    """parse_proto with and without the C reader: the same RankRequest or the same error."""
    from serving import request as request_mod
    from serving.client import to_proto_request

    bodies = [
        to_proto_request({"context": {"user": "u"}, "candidates": FAST_CANDIDATES}),
        to_proto_request({"candidates": [{"item": "x" * 17}]}),  # too long: 422 naming it
        to_proto_request({"candidates": [{"colour": "red"}]}),
    ]
    raw = [b.SerializeToString() for b in bodies] + [b"\x0a\x05ab"]  # truncated: 400

    def outcomes():
        out = []
        for body in [*bodies, *raw]:
            try:
                r = parse_proto(body, SCHEMA, LIMITS)
                out.append(("ok", r.context, r.candidates, r.top_k))
            except RequestError as e:
                out.append((e.status, e.code, e.field))
        return out

    fast = outcomes()
    monkeypatch.setattr(request_mod, "FAST_PROTO", False)
    assert fast == outcomes()
    assert {o[0] for o in fast} == {"ok", 422, 400}


CATEGORICAL_VALUES = [
    "a",
    "",
    "x" * 16,
    "x" * 17,  # over the limit
    "東京",
    "\ud800",  # a lone surrogate: no UTF-8 form
    0,
    -5,
    2**63 - 1,
    -(2**63),
    2**63,  # outside int64
    -(2**63) - 1,
    3.0,
    -0.0,
    1e16,
    1.5,
    float("nan"),
    float("inf"),
    True,
    [1],
    {"a": 1},
]


@pytest.mark.parametrize("value", CATEGORICAL_VALUES, ids=repr)
def test_the_categorical_rule_is_one_rule(value, scan_path):
    """``ranking.data.values.categorical_problem`` decides for every path: the request encoder
    (per value and column at a time), ``batch_from_rows`` (without the length limit), and the
    one-pass scanner (C and Python) for strings. Accepted values hash alike in all of them."""
    from ranking.data import fastrows
    from ranking.data.errors import DataError
    from ranking.data.values import categorical_problem

    problem = categorical_problem(value, 16)
    try:
        features = encode_mod.encode(SCHEMA, {}, [{"user": value}], max_chars=16, max_items=4)
        encoded = None
    except encode_mod.InvalidValue as e:
        encoded = e.code
    assert encoded == (problem[0] if problem else None)
    try:
        rows_batch = batch_from_rows(SCHEMA, [{"user": value}])
        by_rows = None
    except DataError:
        by_rows = "refused"
    unlimited = categorical_problem(value, 10**9)
    assert (by_rows is None) == (unlimited is None)
    if problem is None:
        _assert_same_batch(merged_batch(SCHEMA, [features]), rows_batch)
    if isinstance(value, str):
        scanned = fastrows.scan([{"user": value}], {}, ("user",), (64,), SCHEMA.hash_seed, 16)
        assert (scanned is not None) == (problem is None)
