"""Managed-collision tables (``collision: {kind: managed}``): TorchRec's MCH module in front of
an embedding table, trained, checkpointed, exported, served and warm-started.

References are independent of the code under test: the mapping is read back from the MCH
module's buffers and the embeddings compared with the table's rows by index; the row-wise
layout against TorchRec's own routing (ids of block r of the id space on rank r: observed in a
2-rank run); FBGEMM's row reset against the rows it must (and must not) touch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ranking.features import FeatureSchema, SchemaError

INT64_MAX = torch.iinfo(torch.int64).max


def _schema(collision, rows: int = 16, source: str = "s.yaml", **item) -> FeatureSchema:
    feats = [
        {"name": "user", "kind": "categorical", "num_buckets": 8, "dim": 4, "group": "g"},
        {"name": "item", "kind": "categorical", "num_buckets": rows, "dim": 4, "group": "g",
         "collision": collision, **item},
    ]  # fmt: skip
    d = {"name": "t", "tasks": [{"name": "c", "label": "label"}], "features": feats}
    return FeatureSchema.from_dict(d, source=source)


# ------------------------------------------------------------------ schema


def test_schema_managed_table_rows_id_space_and_round_trip():
    s = _schema({"kind": "managed", "policy": "lru", "eviction_interval": 4, "id_space": 2**30})
    f = s.feature("item")
    assert f.num_buckets == 2**30 and f.table_rows == 16  # hashed into the id space
    (t,) = s.managed_tables
    assert (t.name, t.num_buckets, t.collision.policy) == ("item", 16, "lru")
    assert FeatureSchema.from_dict(s.to_dict()) == s
    assert s.to_dict()["features"][1]["num_buckets"] == 16
    plain = _schema({"kind": "hash"})
    assert plain.feature("item").collision is None and plain.feature("item").num_buckets == 16


@pytest.mark.parametrize(
    ("collision", "item", "where", "words"),
    [
        ({"kind": "managed", "policy": "ttl"}, {}, "collision.policy", "HashZch"),
        ({"kind": "lru"}, {}, "collision.kind", "'hash', 'managed'"),
        ({"kind": "managed", "size": 3}, {}, "collision.size", "unknown key"),
        ({"kind": "hash", "policy": "lfu"}, {}, "collision.policy", "only for kind: managed"),
        ({"kind": "managed", "id_space": 8}, {}, "collision.id_space", "above num_buckets"),
        (
            {"kind": "managed", "eviction_interval": 0},
            {},
            "collision.eviction_interval",
            "positive",
        ),
        ({"kind": "managed"}, {"vocab": "v.txt"}, "collision", "vocabulary"),
        ("managed", {}, "collision", "mapping"),
    ],
)
def test_schema_errors_name_the_file_and_field(collision, item, where, words):
    with pytest.raises(SchemaError) as e:
        _schema(collision, **item)
    assert str(e.value).startswith(f"s.yaml: features[item].{where}: ")
    assert words in str(e.value)


# ------------------------------------------------------------------ the module


def _kjt(users, items):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    v = torch.tensor([*users, *items])
    return KeyedJaggedTensor(keys=["user", "item"], values=v, lengths=torch.ones_like(v))


def _mapping(emb) -> dict[int, int]:
    m = emb.mc_ebc._managed_collision_collection._managed_collision_modules["item"]
    ids, rows = m._mch_sorted_raw_ids.tolist(), m._mch_remapped_ids_mapping.tolist()
    return {i: r for i, r in zip(ids, rows) if i != INT64_MAX}


def test_mch_admits_frequent_ids_in_training_and_is_read_only_in_eval():
    from ranking.model.tokenizer import SparseEmbeddings

    torch.manual_seed(0)
    emb = SparseEmbeddings(_schema({"kind": "managed", "policy": "lfu", "eviction_interval": 2}))
    table = emb.mc_ebc._embedding_module.embedding_bags["item"].weight
    big = [2**39 + 5, 7, 2**35, 123456789]
    for _ in range(2):  # the second step is an admission round: every id seen gets a row
        emb(_kjt([1, 2, 3, 4], big))
    m = _mapping(emb)
    assert sorted(m) == sorted(big) and len(set(m.values())) == 4 and 15 not in m.values()
    emb.eval()
    unknown = 2**38 + 1
    out = emb(_kjt([1, 1, 1], [big[0], big[2], unknown]))[0]
    want = torch.stack([table[m[big[0]]], table[m[big[2]]], table[15]])  # reserved last row
    torch.testing.assert_close(out[:, 4:], want)
    for _ in range(3):  # eval: never admits
        emb(_kjt([1], [unknown]))
    assert _mapping(emb) == m


def test_cpu_row_reset_zeroes_the_evicted_rows_weights_and_rowwise_momentum():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from ranking.model.managed_collision import install_cpu_eviction_reset

    install_cpu_eviction_reset()
    specs = [(6, 4, EmbeddingLocation.HOST, ComputeDevice.CPU),
             (5, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)]  # fmt: skip
    tbe = SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    with torch.no_grad():
        tbe.weights_host.copy_(torch.arange(tbe.weights_host.numel(), dtype=torch.float32) + 1)
        tbe.momentum1_host.fill_(3.0)
    w0, m0 = tbe.weights_host.clone(), tbe.momentum1_host.clone()
    tbe.reset_embedding_weight_momentum(
        pruned_indices=torch.tensor([1, 4, 0]),
        pruned_indices_offsets=torch.tensor([0, 2, 3]),
        logical_table_ids=torch.tensor([1, 0], dtype=torch.int32),
        buffer_ids=torch.tensor([0, 0], dtype=torch.int32),
    )
    # table 0 holds 6 rows x 4 from 0, table 1 5 rows x 8 from 24; momentum 6 then 5 rows
    w_zero = [*range(0, 4), *range(24 + 8, 24 + 16), *range(24 + 32, 24 + 40)]
    m_zero = [0, 6 + 1, 6 + 4]
    want_w, want_m = w0.clone(), m0.clone()
    want_w[w_zero], want_m[m_zero] = 0, 0
    assert torch.equal(tbe.weights_host.detach(), want_w)
    assert torch.equal(tbe.momentum1_host, want_m)


# ------------------------------------------------------------------ warm start: the layout


def _parent_mapping(rows: int, ids: list[int], parent_rows: list[int], counts: list[int]):
    base = "e.mc_ebc._managed_collision_collection._managed_collision_modules.item."
    order = sorted(range(len(ids)), key=lambda j: ids[j])
    free = [r for r in range(rows) if r not in parent_rows]
    sid = [ids[j] for j in order] + [INT64_MAX] * (rows - len(ids))
    srow = [parent_rows[j] for j in order] + free
    cnt = [counts[j] for j in order] + [0] * (rows - len(ids))
    return {
        f"{base}_mch_sorted_raw_ids": torch.tensor(sid),
        f"{base}_mch_remapped_ids_mapping": torch.tensor(srow),
        f"{base}_mch_counts": torch.tensor(cnt),
    }, base


def test_relayout_puts_each_id_on_the_shard_of_its_block_and_keeps_rows_where_it_can():
    from ranking.train.warm_start import Managed, relayout_managed

    space = 2**20
    ids = [5, 2**19 - 1, 2**19, 2**19 + 3, 9, 11, 13, 2**20 - 2]
    prow = [6, 2, 9, 3, 0, 7, 1, 12]  # the parent: one shard of 16 rows (7 and 12 usable)
    counts = [50, 40, 30, 20, 10, 5, 4, 3]
    w, base = _parent_mapping(16, ids, prow, counts)
    m = Managed("item", "e.mc_ebc", space)
    segs = [(0, 4), (4, 12)]  # uneven on purpose: shard 0 has 3 usable rows for 5 ids
    buffers, (child, parent) = relayout_managed(w, m, segs)
    sid = buffers[f"{base}_mch_sorted_raw_ids"]
    srow = buffers[f"{base}_mch_remapped_ids_mapping"]
    cnt = buffers[f"{base}_mch_counts"]
    got = {}
    for r, (r0, n) in enumerate(segs):
        s_ids, s_rows = sid[r0 : r0 + n].tolist(), srow[r0 : r0 + n].tolist()
        assert sorted(s_rows) == list(range(r0, r0 + n))  # a permutation of the shard's rows
        held = [(i, row) for i, row in zip(s_ids, s_rows) if i != INT64_MAX]
        assert [i for i, _ in held] == sorted(i for i, _ in held)
        assert all(r * space // 2 <= i < (r + 1) * space // 2 for i, _ in held)
        assert all(row != r0 + n - 1 for _, row in held)  # the reserved row stays free
        got.update(held)
    low = [i for i in ids if i < 2**19]  # 5 ids for shard 0's 3 usable rows: the most counted
    by_count = sorted(low, key=lambda i: -counts[ids.index(i)])
    assert set(got) == set(by_count[:3]) | {i for i in ids if i >= 2**19}
    pr = dict(zip(ids, prow))
    for i, row in got.items():  # kept where its parent row is usable in its shard
        r0, n = segs[int(i >= 2**19)]
        if r0 <= pr[i] < r0 + n - 1:
            assert row == pr[i]
        assert cnt[sid.tolist().index(i)] == counts[ids.index(i)]
    # the embedding rows follow the ids; every reserved row takes the parent's (its last row)
    pairs = dict(zip(child.tolist(), parent.tolist()))
    assert pairs == {**{row: pr[i] for i, row in got.items()}, 3: 15, 15: 15}
    again, (c2, p2) = relayout_managed({**w, **buffers}, m, segs)  # same layout: the identity
    assert all(torch.equal(again[k], buffers[k]) for k in buffers)
    assert all(c == p for c, p in zip(c2.tolist(), p2.tolist()) if c not in (3, 15))


# ------------------------------------------------------------------ trained end to end


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    from ranking.data.synth_stream import schema_yaml, write_stream

    root = tmp_path_factory.mktemp("stream")
    write_stream(root, 2, rows_per_day=3000, catalogue=2000, new_per_day=500)
    coll = {"kind": "managed", "policy": "lfu", "eviction_interval": 4}
    # more rows than a day's ~1,100 items: no row-wise shard of 2 overflows in a warm start
    (root / "schema.yaml").write_text(schema_yaml(2048, coll, user_rows=64, dim=8))
    return root


def _config(stream: Path, **train) -> dict:
    return {
        "name": "mc",
        "schema": str(stream / "schema.yaml"),
        "model": {"arch": "rankmixer", "tokenizer": "slices", "dim": 16, "num_tokens": 4,
                  "num_layers": 1, "ffn_mult": 2},
        "data": {"train": str(stream / "day=0"), "valid": str(stream / "day=1"),
                 "batch_size": 256, "eval_batch_size": 1024},
        "train": {"epochs": 1, "threads": 1, "log_every": 4, "checkpoint_every": 6, "seed": 1,
                  "keep_checkpoints": 10, **train},
    }  # fmt: skip


def _plain(v) -> torch.Tensor:
    if hasattr(v, "local_shards"):
        (shard,) = v.local_shards()
        return shard.tensor.detach().clone()
    return v.detach().clone()


MC_KEY = "tokenizer.embeddings.mc_ebc._managed_collision_collection._managed_collision_modules"


def _held(state) -> dict[int, tuple[int, int]]:
    """``{raw id: (row, count)}`` of the ids the item table's mapping holds."""
    base = f"{MC_KEY}.item."
    ids = state[f"{base}_mch_sorted_raw_ids"].tolist()
    rows = state[f"{base}_mch_remapped_ids_mapping"].tolist()
    counts = state[f"{base}_mch_counts"].tolist()
    return {i: (r, c) for i, r, c in zip(ids, rows, counts) if i != INT64_MAX}


@pytest.fixture(scope="module")
def parent(stream, tmp_path_factory) -> dict:
    """A 1-rank run (DMP, the MC sharder, fused row-wise Adagrad) trained in this process:
    its run directory, the mapping buffers of its trained model and that model's eval-mode
    probabilities on day 1's first 512 rows."""
    from test_warm_start import _OneRank

    from ranking.data.reader import ParquetBatches
    from ranking.train.config import load_experiment
    from ranking.train.trainer import Trainer

    run = tmp_path_factory.mktemp("parent") / "run"
    with _OneRank():
        t = Trainer(run, cfg=load_experiment(_config(stream), require_data=False))
        assert t.run() == 0
        state = {k: _plain(v) for k, v in t.model.state_dict().items() if k.startswith(MC_KEY)}
        batch = next(iter(ParquetBatches(t.cfg.schema, str(stream / "day=1"), 512, shuffle=False)))
        t.model.eval()
        with torch.no_grad():
            probs = torch.sigmoid(t.model(batch).logits)
    return {"run": run, "state": state, "batch": batch, "probs": probs}


def test_one_rank_mapping_trains_checkpoints_resumes_exports_and_warm_starts(
    parent, stream, tmp_path, one_rank_trainer
):
    """The mapping fills during training; the final checkpoint, a model resumed from it and
    the artifact hold the same mapping buffers as the trained model; the artifact scores rows
    as the trained model does in eval mode; a warm-started child starts with the parent's
    mapping (every id: its row and count), rows and step counter."""
    import torch.distributed.checkpoint as dcp

    from ranking.export import load_artifact
    from ranking.train import checkpoint as ckpt

    mine = parent["state"]
    held = mine[f"{MC_KEY}.item._mch_sorted_raw_ids"] != INT64_MAX
    # every item of the day's rows the run stepped on was admitted (the table has room)
    seen = pq.read_table(stream / "day=0").column("item").unique()
    assert 500 < int(held.sum()) <= len(seen)
    last = ckpt.latest(parent["run"] / "checkpoints")
    saved = {f"model.{k}": torch.empty_like(v) for k, v in mine.items()}
    dcp.load(saved, checkpoint_id=str(last), no_dist=True)
    art = load_artifact(parent["run"] / "artifact")
    served = art.model.state_dict()
    for k, v in mine.items():
        assert torch.equal(saved[f"model.{k}"], v), k
        if not k.endswith("_output_segments_tensor"):
            assert torch.equal(served[k], v), k
    resumed = one_rank_trainer(_config(stream), tmp_path / "run2")  # as try_resume loads it
    state = {"model": resumed.model.state_dict()}
    dcp.load(state, checkpoint_id=str(last))
    resumed.model.load_state_dict(state["model"])
    again = {k: _plain(v) for k, v in resumed.model.state_dict().items() if k in mine}
    assert all(torch.equal(again[k], mine[k]) for k in mine)

    got = art.predict(parent["batch"]).reshape(parent["probs"].shape)
    torch.testing.assert_close(got, parent["probs"], atol=1e-5, rtol=1e-5)

    child = one_rank_trainer(_config(stream), tmp_path / "child")
    child.warm_start(str(parent["run"] / "artifact"))
    got = {k: _plain(v) for k, v in child.model.state_dict().items()}
    assert _held(got) == _held(served)  # every id: its row and its count
    it = f"{MC_KEY}.item._current_iter_tensor"
    assert torch.equal(got[it], served[it])  # the module's step counter carries on
    tkey = "tokenizer.embeddings.mc_ebc._embedding_module.embedding_bags.item.weight"
    assert torch.equal(got[tkey], served[tkey])


@pytest.mark.slow
def test_two_ranks_warm_started_from_one_rank_serve_the_parents_scores(parent, stream, tmp_path):
    """``mixrank train --nproc 2 --warm-start`` from the 1-rank artifact (the mapping laid out
    again for 2 row-wise shards), rates 0 and fewer steps than an admission round: the child's
    artifact, exported from the 2-rank DCP checkpoint, scores the next day's rows (held and
    unknown ids) as the parent does."""
    from ranking.data.reader import ParquetBatches
    from ranking.export import load_artifact

    parent_dir = parent["run"]
    child = _config(stream, max_steps=3, lr=0.0, embedding_lr=0.0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(child))
    cmd = [sys.executable, "-m", "ranking.cli", "train", "--config", str(tmp_path / "c.yaml"),
           "--nproc", "2", "--run-dir", str(tmp_path / "child"),
           "--warm-start", str(parent_dir / "artifact")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = load_artifact(parent_dir / "artifact")
    b = load_artifact(tmp_path / "child" / "artifact")
    sid = f"{MC_KEY}.item._mch_sorted_raw_ids"
    pa_, pb = a.model.state_dict()[sid], b.model.state_dict()[sid]
    assert set(pa_.tolist()) == set(pb.tolist())  # every id kept (no shard over-full here)
    batch = next(iter(ParquetBatches(a.schema, str(stream / "day=1"), 1024, shuffle=False)))
    torch.testing.assert_close(b.predict(batch), a.predict(batch), atol=1e-6, rtol=0)


def test_shipped_mc_config_rescores_logged_requests_exactly(tmp_path):
    """``tests/test_loop.py``'s train/serve consistency check (served requests logged, then
    re-scored through the training path at 1e-5) on ``configs/mc_stream.yaml``, which its glob
    of shipped configs does not name. Its artifact is untrained: the mapping is empty and every
    item reads the reserved row (the trained mapping's train/serve agreement is checked above)."""
    from test_loop import (
        test_served_and_logged_requests_rescore_exactly_for_every_shipped_config as check,
    )

    check(tmp_path, Path(__file__).resolve().parents[1] / "configs" / "mc_stream.yaml")
