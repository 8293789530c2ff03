"""What makes ``mixrank train`` as fast as a plain loop without changing what it computes
(issue #23): the encoded-unit cache gives the batches the uncached reader gives, a one-rank run
has no DDP (same names, same gradients and table updates as with it), and the plain loop that
``mixrank bench train --vs-plain`` compares against steps through every batch."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ranking.data.reader import EncodedCache, ParquetBatches
from ranking.data.synth import write_synthetic
from ranking.features import load_schema
from ranking.model.config import ConfigError

FRAPPE_DLRM = {
    "name": "t",
    "schema": "frappe",
    "model": {"arch": "dlrm", "dlrm": {"dense_arch": [16], "over_arch": [32]}},
    "data": {"train": "", "batch_size": 64},
    "train": {"epochs": 1, "lr": 0.01, "embedding_lr": 0.1, "embedding_l2": 0.01},
}


@pytest.fixture(scope="module")
def frappe_rows(tmp_path_factory):
    """Two synthetic Frappe files, the second with bad labels in a few rows (to be skipped)."""
    d = tmp_path_factory.mktemp("frappe")
    write_synthetic("frappe", 5000, d / "a", seed=1, chunk_rows=1000, progress=False)
    t = pq.read_table(d / "a" / "part-00000.parquet")
    label = t.column("label").to_numpy().copy()
    label[[3, 700, 1999]] = 7  # not 0/1: a bad row
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(label))
    pq.write_table(t.slice(0, 2000), d / "a" / "part-00001.parquet", row_group_size=500)
    return d / "a"


def _epochs(schema, files, cache, epochs=3):
    out = []
    for e in range(epochs):
        r = ParquetBatches(
            schema, files, 256, rank=0, world_size=1, shuffle=True, seed=3, unit_rows=300,
            shuffle_buffer=1000, on_bad_rows="skip", cache=cache,
        )  # fmt: skip
        r.set_epoch(e)
        out.append(list(r))
    return out


def test_encoded_cache_gives_the_uncached_readers_batches_bad_rows_included(frappe_rows):
    schema = load_schema("frappe")
    plain = _epochs(schema, frappe_rows, None)
    cache = EncodedCache(1 << 30)
    cached = _epochs(schema, frappe_rows, cache)
    assert cache.hits > 0 and len(cache) == cache.misses  # epochs 2 and 3 read nothing
    skipped = 0
    for ep, ec in zip(plain, cached, strict=True):
        for a, b in zip(ep, ec, strict=True):
            assert torch.equal(a.sparse.values(), b.sparse.values())
            assert torch.equal(a.sparse.lengths(), b.sparse.lengths())
            assert torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense)
            assert a.bad_rows == b.bad_rows and a.bad_examples == b.bad_examples
            skipped += sum(b.bad_rows.values())
    assert skipped == 3 * 3  # the three bad rows, in each of the three epochs


def test_encoded_cache_keeps_units_while_they_fit(frappe_rows):
    schema = load_schema("frappe")
    one = _epochs(schema, frappe_rows, c := EncodedCache(1 << 30), epochs=1)
    assert one and len(c) > 4
    unit = c.bytes / len(c)
    small = EncodedCache(int(unit * 2.5))
    again = _epochs(schema, frappe_rows, small, epochs=2)
    assert 0 < len(small) < len(c) and small.bytes <= small.max_bytes
    assert [b.size for b in again[0]] == [b.size for b in one[0]]


def test_cache_mb_must_not_be_negative():
    from ranking.train.config import load_experiment

    with pytest.raises(ConfigError, match=r"data\.cache_mb"):
        load_experiment(copy.deepcopy(FRAPPE_DLRM), ["data.cache_mb=-1"], require_data=False)


def _ddp(model) -> list[str]:
    """What DDP wraps in ``model``, the lookups that TorchRec's sharded collections keep in
    plain lists (outside ``modules()``) included."""
    from torch.nn.parallel import DistributedDataParallel

    found = []
    for m in model.modules():
        for x in [m, *(getattr(m, "_lookups", None) or [])]:
            if isinstance(x, DistributedDataParallel):
                found.append(type(x.module).__name__)
    return found


def test_one_rank_has_no_ddp_and_trains_as_the_ddp_wrapped_model(one_rank_trainer):
    """Against TorchRec's default DMP (DDP around the dense part and around the data-parallel
    tables' lookups): the same parameter and state-dict names, and from the same weights the
    same gradients and fused-table updates after a backward."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    from ranking.model.ranker import build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.sharding import fused_params

    t = one_rank_trainer(copy.deepcopy(FRAPPE_DLRM))
    assert _ddp(t.model) == []
    fp = fused_params(t.cfg)
    ref = DistributedModelParallel(
        build_model(t.cfg.model, t.cfg.schema),
        device=torch.device("cpu"),
        plan=t.plan,
        sharders=[EmbeddingBagCollectionSharder(fp), EmbeddingCollectionSharder(fp)],
    )
    # the dense part, and the lookup of the data-parallel tables (the plan has both kinds)
    assert sorted(_ddp(ref)) == ["BaselineRanker", "GroupedPooledEmbeddingsLookup"]
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in t.model.named_parameters()]
    assert list(ref.state_dict()) == list(t.model.state_dict())
    ref.load_state_dict(t.model.state_dict())
    batch = random_batch(t.cfg.schema, 64, seed=5)
    for m in (t.model, ref):
        m.train()
        m(batch).logits.float().square().mean().backward()  # fused tables step here
    for (name, a), (_, b) in zip(t.model.named_parameters(), ref.named_parameters(), strict=True):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7, msg=name)
    for (name, a), b in zip(t.model.state_dict().items(), ref.state_dict().values(), strict=True):
        a = a.local_tensor() if hasattr(a, "local_tensor") else a
        b = b.local_tensor() if hasattr(b, "local_tensor") else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_plain_loop_steps_through_every_full_batch(frappe_rows, tmp_path):
    import yaml

    from benchmarks.plain_loop import plain_loop

    cfg = {**FRAPPE_DLRM, "data": {"train": str(frappe_rows / "part-00000.parquet"),
                                   "batch_size": 256}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = plain_loop(tmp_path, epochs=2, log_every=5)
    assert out["batches_per_epoch"] == 5000 // 256
    assert out["steps"] == 2 * (5000 // 256)
    assert np.isfinite(out["loss"]) and out["samples_per_s"] > 0
