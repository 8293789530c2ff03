"""Behaviour sequences (#21): the ``sequence`` schema kind, its conversion, the encoders against
slow loops, serving's one history per request, and training on the ``sequence`` preset.

- schema: shared tables, targets and side sequences resolved; every bad combination is an
  error naming the feature and key;
- conversion: most recent ids kept at ``max_length``; a side sequence aligned with its main
  one (null -> null ids, a different length -> a bad row naming file, row and column);
- encoders: ``pool``, ``target_attention`` and ``query_tokens`` recomputed per row with explicit
  loops (softmax written out over the valid positions);
- serving: the history is sent once in ``context``; a batch of several requests holds one
  history row per request and ``seq_of``, and gives the same logits (1e-5) as the same rows with
  the history copied to every candidate, for every encoder and arch; the key/value projection
  sees one row per request, not per candidate;
- training: every encoder and mixer family trains on the preset (loss falls), and a 2-rank
  torchrun run trains, exports and serves an artifact whose offline scores equal the online
  ones.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from ranking.data.convert import RowChecks, batch_from_rows, columns_from_arrow
from ranking.data.encode import InvalidValue, encode, merged_batch
from ranking.data.errors import DataError
from ranking.features import FeatureSchema, SchemaError
from ranking.inference import optimize_for_inference
from ranking.model.config import ConfigError, ModelConfig, SequenceConfig
from ranking.model.ranker import build_model
from ranking.model.sequence import (
    PoolEncoder,
    QueryTokensEncoder,
    TargetAttentionEncoder,
    build_encoder,
    expand_rows,
)

BASE = [
    {"name": "user", "kind": "categorical", "num_buckets": 50, "dim": 8, "group": "user"},
    {"name": "item", "kind": "categorical", "num_buckets": 100, "dim": 8, "group": "item"},
    {"name": "item_hist", "kind": "sequence", "table": "item", "max_length": 5},
    {"name": "act_hist", "kind": "sequence", "side_of": "item_hist", "num_buckets": 4, "dim": 8},
    {"name": "age", "kind": "dense", "group": "user"},
]
TASKS = [{"name": "click", "label": "click"}, {"name": "conversion", "label": "conversion"}]


def schema(features=None) -> FeatureSchema:
    return FeatureSchema.from_dict({"name": "seq", "tasks": TASKS, "features": features or BASE})


# ----------------------------------------------------------------------------- schema


def test_schema_resolves_shared_table_target_and_side():
    s = schema()
    hist = s.feature("item_hist")
    assert (hist.num_buckets, hist.dim, hist.target, hist.pooling) == (100, 8, "item", "mean")
    assert s.feature("act_hist").max_length == 5
    assert s.sparse_keys == ["user", "item"]
    assert s.sequence_keys == ["item_hist", "act_hist"]
    assert [f.name for f in s.sequence_features] == ["item_hist"]
    assert s.sequence_tables == ("item", "act_hist")
    item = next(t for t in s.tables if t.name == "item")
    assert item.feature_names == ("item", "item_hist") and item.pooling == "mean"
    assert FeatureSchema.from_dict(s.to_dict()) == s


def _replace(name: str, **kw) -> list[dict]:
    out = []
    for f in BASE:
        f = dict(f)
        if f["name"] == name:
            f.update(kw)
            f = {k: v for k, v in f.items() if v is not None}
        out.append(f)
    return out


@pytest.mark.parametrize(
    "features, key, words",
    [
        (_replace("item_hist", table="nope"), "features[item_hist].table", "unknown table"),
        (_replace("item_hist", max_length=0), "features[item_hist].max_length", "positive"),
        (_replace("item_hist", target="user"), "features[item_hist].target", "not a categorical"),
        (_replace("item_hist", group="item"), "features[item_hist].group", "own tokens"),
        (_replace("act_hist", side_of="user"), "features[act_hist].side_of", "main sequence"),
        (_replace("act_hist", dim=4), "features[act_hist].dim", "position by position"),
        (_replace("act_hist", max_length=3), "features[act_hist].max_length", "must equal"),
        (_replace("user", max_length=3), "features[user].max_length", "only for sequence"),
    ],
)
def test_bad_sequence_schemas_name_the_feature(features, key, words):
    with pytest.raises(SchemaError) as e:
        schema(features)
    assert key in str(e.value) and words in str(e.value)


def test_encoder_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model.sequence.encoder: expected one of"):
        ModelConfig.from_dict({"arch": "rankmixer", "num_tokens": 4, "sequence": {"encoder": "x"}})
    with pytest.raises(ConfigError, match=r"model.sequence.encoder: target_attention is for"):
        ModelConfig.from_dict({"arch": "dlrm", "sequence": {"encoder": "target_attention"}})
    with pytest.raises(ConfigError, match=r"model.sequence.attn_dim"):
        ModelConfig.from_dict({"arch": "unimixer", "sequence": {"heads": 3}, "dim": 64})
    cfg = ModelConfig.from_dict({"arch": "unimixer", "sequence": {"encoders": {"nope": "pool"}}})
    with pytest.raises(ValueError, match=r"'nope' is not a main sequence feature"):
        build_model(cfg, schema())
    no_target = schema(_replace("item_hist", table=None, num_buckets=100, dim=8))
    with pytest.raises(ConfigError, match=r"needs a target"):
        build_model(
            ModelConfig.from_dict(
                {"arch": "unimixer", "sequence": {"encoder": "target_attention"}}
            ),
            no_target,
        )


# ----------------------------------------------------------------------------- conversion


def _table(hist, acts, n=None) -> pa.Table:
    n = len(hist) if n is None else n
    return pa.table(
        {
            "user": pa.array(list(range(n))),
            "item": pa.array([7] * n),
            "item_hist": pa.array(hist, pa.list_(pa.int64())),
            "act_hist": pa.array(acts, pa.list_(pa.int64())),
            "age": pa.array([1.0] * n),
            "click": pa.array([1] * n),
            "conversion": pa.array([0] * n),
        }
    )


def test_conversion_truncates_to_the_most_recent_and_aligns_sides():
    s = schema()
    cols = columns_from_arrow(s, _table([[1, 2, 3, 4, 5, 6, 7], [8], None], [[0] * 7, None, None]))
    from ranking.data.hashing import hash_array

    want = hash_array(pa.array(["1", "2", "3", "4", "5", "8"]), 100, 0)
    assert cols.lengths["item_hist"].tolist() == [5, 1, 0]
    assert cols.ids["item_hist"].tolist() == want.tolist()
    # a null side list is null ids at the main length
    assert cols.lengths["act_hist"].tolist() == [5, 1, 0]
    assert cols.ids["act_hist"][5] == 0
    b = batch_from_rows(s, [{"item_hist": [1, 2], "act_hist": [0, 1]}], with_labels=False)
    assert b.sequences.keys() == ["item_hist", "act_hist"] and b.seq_of is None
    assert b.sparse.keys() == ["user", "item"]


def test_misaligned_side_sequence_is_a_bad_row():
    s = schema()
    t = _table([[1, 2, 3], [4, 5]], [[0, 1, 0], [1]])
    with pytest.raises(
        DataError,
        match=r"f.parquet: column 'act_hist': side .* has 1 ids where 'item_hist' has 2 at row 1",
    ):
        columns_from_arrow(s, t, source="f.parquet")
    cols = columns_from_arrow(
        s, t, source="f.parquet", checks=RowChecks("f.parquet", 2, on_bad_rows="skip")
    )
    good, dropped = cols.drop_bad()
    assert dropped == {"sequence": 1} and len(good) == 1
    assert good.lengths["act_hist"].tolist() == good.lengths["item_hist"].tolist() == [3]


# ----------------------------------------------------------------------------- encoders


def _seqs(S=4, L=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(S, L, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 0, 1][:S])
    for s in range(S):
        seq[s, lengths[s] :] = 0  # the padding ``padded`` gives
    return seq, lengths


def _attend(q, keys, values, scale):
    """One query over a list of keys/values: softmax written out (empty: zeros)."""
    if not keys:
        return torch.zeros_like(values[0]) if values else None
    s = [scale * float(q @ k) for k in keys]
    m = max(s)
    e = [math.exp(x - m) for x in s]
    return sum(w / sum(e) * v for w, v in zip(e, values))


def test_pool_encoder_is_the_mean_over_valid_positions():
    seq, lengths = _seqs()
    enc = PoolEncoder(8, 5, "mean").double()
    got = enc(seq, lengths)
    for s in range(4):
        n = int(lengths[s])
        mean = seq[s, :n].mean(0) if n else torch.zeros(8, dtype=torch.float64)
        assert torch.allclose(got[s, 0], enc.proj(mean), atol=1e-12)


@pytest.mark.parametrize("seq_of", [None, [0, 0, 1, 3, 3, 2]])
def test_target_attention_equals_a_per_candidate_loop(seq_of):
    torch.manual_seed(0)
    seq, lengths = _seqs()
    enc = TargetAttentionEncoder(8, 5, heads=2, attn_dim=12).double()
    B = 4 if seq_of is None else len(seq_of)
    target = torch.randn(B, 8, dtype=torch.float64)
    so = None if seq_of is None else torch.tensor(seq_of)
    got = enc(seq, lengths, target, so)
    H, dh = 2, 6
    for b in range(B):
        s = b if seq_of is None else seq_of[b]
        q = enc.q(enc.norm_q(target[b])).view(H, dh)
        heads = []
        for h in range(H):
            keys, values = [], []
            for pos in range(int(lengths[s])):
                kv = enc.kv(enc.norm_kv(seq[s, pos])).view(2, H, dh)
                keys.append(kv[0, h])
                values.append(kv[1, h])
            o = _attend(q[h], keys, values, dh**-0.5)
            heads.append(o if o is not None else torch.zeros(dh, dtype=torch.float64))
        want = enc.out(torch.cat(heads))
        assert torch.allclose(got[b, 0], want, atol=1e-10), b


def test_inference_path_one_sequence_at_a_time_equals_the_gathered_one():
    """Without autograd, candidates in runs sharing a sequence are attended one sequence at a
    time (``kernels.reference._attend_runs``): the same as gathering each candidate's keys."""
    import kernels.reference as ref

    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(4, 7, 2, 5, generator=g), torch.randn(4, 7, 2, 5, generator=g)
    k[1, 2:] = float("nan")  # padding is never read
    lengths = torch.tensor([7, 2, 0, 5])
    seq_of = torch.tensor([0, 0, 1, 1, 1, 2, 3, 0, 3])  # runs, one sequence seen twice
    q = torch.randn(9, 2, 5, generator=g)
    with torch.no_grad():
        fast = ref.target_attention(q, k, v, lengths, seq_of)
    q.requires_grad_(True)  # autograd: the gathered path
    slow = ref.target_attention(q, k, v, lengths, seq_of)
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert (fast[5] == 0).all()  # the empty sequence


def test_query_tokens_equal_a_per_query_loop_and_ignore_the_candidate():
    torch.manual_seed(0)
    seq, lengths = _seqs()
    enc = QueryTokensEncoder(8, 5, heads=2, attn_dim=12, num_queries=3).double()
    got = enc(seq, lengths)
    assert got.shape == (4, 3, 5)
    for s in range(4):
        for j in range(3):
            heads = []
            for h in range(2):
                keys, values = [], []
                for pos in range(int(lengths[s])):
                    kv = enc.kv(enc.norm_kv(seq[s, pos])).view(2, 2, 6)
                    keys.append(kv[0, h])
                    values.append(kv[1, h])
                o = _attend(enc.queries[j, h], keys, values, 6**-0.5)
                heads.append(o if o is not None else torch.zeros(6, dtype=torch.float64))
            assert torch.allclose(got[s, j], enc.out(torch.cat(heads)), atol=1e-10)
    # per request then gathered: the same tokens for every candidate of a request
    so = torch.tensor([1, 1, 0])
    assert torch.equal(enc(seq, lengths, None, so), got[so])


def test_build_encoder_gives_each_kind():
    s = schema()
    f = s.feature("item_hist")
    cfg = SequenceConfig(query_tokens=3)
    kinds = {
        k: build_encoder(k, f, 8, 16, cfg) for k in ("pool", "target_attention", "query_tokens")
    }
    assert [e.num_tokens for e in kinds.values()] == [1, 1, 3]


# ----------------------------------------------------------------------------- serving

CONTEXT = {"user": 3, "item_hist": [1, 2, 3, 4, 5, 6, 7], "act_hist": [0, 1, 0, 1, 0, 1, 1]}
CANDIDATES = [{"item": i, "age": float(i)} for i in range(6)]
ARCHS = [
    ("rankmixer", "pool", {"num_tokens": 4}),
    ("rankmixer", "target_attention", {"num_tokens": 4}),
    ("rankmixer", "query_tokens", {"num_tokens": 8, "sequence": {"query_tokens": 3}}),
    ("tokenmixer_large", "target_attention", {}),
    ("tokenmixer_large", "query_tokens", {"num_heads": 2}),
    ("unimixer", "target_attention", {}),
    ("unimixer_lite", "query_tokens", {}),
    ("dlrm", "pool", {"dlrm": {"dense_arch": [16], "over_arch": [16]}}),
    ("dcnv2", "pool", {"dlrm": {"dense_arch": [16], "over_arch": [16]}}),
]


def _model(arch, enc, extra):
    m = {"arch": arch, **extra}
    m["sequence"] = {**extra.get("sequence", {}), "encoder": enc}
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(m), schema()).eval()


def test_history_is_sent_once_in_context():
    s = schema()
    cols = encode(s, CONTEXT, CANDIDATES)
    assert cols.seq_of.tolist() == [0] * 6 and cols.lengths["item_hist"].tolist() == [5]
    other = encode(s, {**CONTEXT, "item_hist": [9, 8], "act_hist": [1, 1]}, CANDIDATES[:2])
    b = merged_batch(s, [cols, other])
    assert b.seq_of.tolist() == [0] * 6 + [1, 1] and b.sequences.stride() == 2
    with pytest.raises(InvalidValue) as e:
        encode(s, {"user": 1}, [{"item": 1, "item_hist": [1]}])
    assert e.value.field == "candidates[0].item_hist" and "context" in e.value.message
    with pytest.raises(InvalidValue) as e:
        encode(s, {"item_hist": [1, 2], "act_hist": [1]}, CANDIDATES)
    assert e.value.field == "context.act_hist"
    with pytest.raises(InvalidValue) as e:
        encode(s, {"item_hist": list(range(20))}, CANDIDATES, max_items=10)
    assert e.value.code == "value_too_long" and e.value.field == "context.item_hist"
    with pytest.raises(InvalidValue) as e:
        encode(s, {"item_hist": 5}, CANDIDATES)
    assert e.value.code == "invalid_type" and "sequence feature" in e.value.message


@pytest.mark.parametrize("arch, enc, extra", ARCHS, ids=[f"{a}-{e}" for a, e, _ in ARCHS])
def test_per_request_histories_score_as_copied_ones(arch, enc, extra):
    s = schema()
    model = _model(arch, enc, extra)
    second = {**CONTEXT, "item_hist": [9, 8], "act_hist": [1, 1]}
    merged = merged_batch(s, [encode(s, CONTEXT, CANDIDATES), encode(s, second, CANDIDATES[:2])])
    rows = [{**CONTEXT, **c} for c in CANDIDATES] + [{**second, **c} for c in CANDIDATES[:2]]
    copied = batch_from_rows(s, rows)
    assert copied.seq_of is None and copied.sequences.stride() == 8
    with torch.no_grad():
        want = model(copied).logits
        got = model(merged).logits
        fast = optimize_for_inference(model, dtype="fp32")(merged).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(fast, want, atol=1e-5)


@pytest.mark.parametrize("enc", ["target_attention", "query_tokens"])
def test_candidate_independent_work_runs_once_per_request(enc):
    """The key/value projection of the history sees one row per request (2), not one per
    candidate (8); the embedding lookup gets 2 history rows."""
    s = schema()
    model = _model("unimixer", enc, {})
    encoder = model.tokenizer.encoders["item_hist"]
    seen, lookups = [], []
    encoder.kv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    ec = model.tokenizer.embeddings.ec
    ec.register_forward_hook(lambda m, i, o: lookups.append(int(o["item_hist"].lengths().numel())))
    second = {**CONTEXT, "item_hist": [9, 8], "act_hist": [1, 1]}
    b = merged_batch(s, [encode(s, CONTEXT, CANDIDATES), encode(s, second, CANDIDATES[:2])])
    with torch.no_grad():
        model(b)
    assert seen == [(2, 5, 8)]
    assert lookups == [8 + 2]  # the stacked lookup: 8 candidate rows (empty), 2 histories
    hist_rows = model.tokenizer.embeddings(b.sparse, b.sequences, b.seq_of)[1]["item_hist"][0]
    assert hist_rows.shape == (2, 5, 8)


def test_expand_rows_copies_each_request_history():
    s = schema()
    b = merged_batch(
        s,
        [
            encode(s, CONTEXT, CANDIDATES[:2]),
            encode(s, {"item_hist": [9], "act_hist": [1]}, CANDIDATES[:3]),
        ],
    )
    full = expand_rows(b.sequences, b.seq_of)
    assert full.stride() == 5
    lens = full["item_hist"].lengths().tolist()
    assert lens == [5, 5, 1, 1, 1]
    vals = full["item_hist"].values().tolist()
    assert vals[:5] == vals[5:10] and vals[10:] == [vals[10]] * 3


# ----------------------------------------------------------------------------- training


def _synth(tmp_path, rows=4096, seed=1):
    from ranking.data.synth import write_synthetic

    write_synthetic("sequence", rows, tmp_path, seed=seed, chunk_rows=rows, progress=False)
    import pyarrow.parquet as pq

    return pq.read_table(tmp_path)


def test_sequence_preset_plants_the_documented_match(tmp_path):
    from ranking.data.synth import SequenceGenerator

    g = SequenceGenerator(seed=5)
    rng = np.random.default_rng(0)
    cols, match, _, _ = g._draw(rng, 3000)
    hist, acts = cols["item_hist"].to_pylist(), cols["act_hist"].to_pylist()
    items = cols["item"].to_pylist()
    for r in range(3000):  # the docstring's formula, one row at a time
        want = max(
            [
                (1.0 if a == 1 else 0.3) * 0.9**j
                for j, (h, a) in enumerate(zip(hist[r], acts[r]))
                if h == items[r]
            ],
            default=0.0,
        )
        assert match[r] == pytest.approx(want)
        assert 5 <= len(hist[r]) <= 30 and len(acts[r]) == len(hist[r])
    t = _synth(tmp_path)
    assert set(t.column_names) >= {"click", "conversion", "item_hist", "act_hist"}
    click_, conv = t["click"].to_numpy(), t["conversion"].to_numpy()
    assert (conv <= click_).all() and 0.2 < click_.mean() < 0.4 and conv.mean() > 0.05


TRAIN_CASES = [
    ("rankmixer", "target_attention", {"num_tokens": 4}),
    ("tokenmixer_large", "query_tokens", {"num_heads": 1}),
    ("unimixer_lite", "pool", {}),
    ("dlrm", "pool", {"dlrm": {"dense_arch": [16], "over_arch": [16]}}),
]


@pytest.mark.parametrize(
    "arch, enc, extra", TRAIN_CASES, ids=[f"{a}-{e}" for a, e, _ in TRAIN_CASES]
)
def test_every_family_trains_with_sequence_tokens(tmp_path, arch, enc, extra):
    from ranking.data.convert import to_batch
    from ranking.features import load_schema

    s = load_schema("synth_sequence")
    cols = columns_from_arrow(s, _synth(tmp_path, rows=3072))
    m = {"arch": arch, "dim": 16 if arch == "dlrm" else 32, "embedding_init_scale": 0.1, **extra}
    m["sequence"] = {"encoder": enc, "query_tokens": 2}
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(m), s)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(2):
        for i in range(0, len(cols), 256):
            b = to_batch(s, cols.take(np.arange(i, min(i + 256, len(cols)))))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b).logits, b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.02
