"""Checkpoint atomicity (single process) and the evaluation metrics against slow references."""

from __future__ import annotations

import math

import torch

from ranking.metrics import EvalAccumulator, binary_metrics
from ranking.train import checkpoint as ckpt


def test_save_load_roundtrip_and_latest_skips_incomplete(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save({"model": model.state_dict()}, tmp_path, step=5, local={"x": torch.arange(3)})
    # a newer checkpoint killed half way (no marker) and a stale partial must both be ignored
    (tmp_path / "step-00000009").mkdir()
    (tmp_path / "step-00000009" / ".metadata").write_bytes(b"half")
    (tmp_path / "step-00000012.partial").mkdir()
    latest = ckpt.latest(tmp_path)
    assert latest is not None and latest.name == "step-00000005"
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = {"model": model.state_dict()}
    ckpt.load(state, latest)
    model.load_state_dict(state["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k])
    assert torch.equal(ckpt.load_local(latest)["x"], torch.arange(3))


def test_keep_last_k(tmp_path):
    m = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        ckpt.save({"model": m.state_dict()}, tmp_path, step=step, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]


def test_load_names_a_key_on_either_side_only(tmp_path):
    import pytest

    m = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckpt.save({"model": m.state_dict(), "optim": opt.state_dict()}, tmp_path, step=1)
    path = ckpt.latest(tmp_path)
    assert "optim.state.0.exp_avg" in ckpt.saved_keys(path)
    # the saved Adam moments have nowhere to go in a fresh optimiser (lazy state): that was #25
    fresh = torch.optim.Adam(m.parameters())
    with pytest.raises(ckpt.CheckpointError, match=r"optim\.state\.0\.exp_avg"):
        ckpt.load({"model": m.state_dict(), "optim": fresh.state_dict()}, path)
    # a key of the state that the checkpoint lacks
    extra = {"model": {**m.state_dict(), "scale": torch.ones(2)}, "optim": opt.state_dict()}
    with pytest.raises(ckpt.CheckpointError, match=r"model\.scale"):
        ckpt.load(extra, path)
    # the same structure loads
    ckpt.load({"model": m.state_dict(), "optim": opt.state_dict()}, path)


def test_load_local_missing_is_an_error_naming_the_file(tmp_path):
    import pytest

    ckpt.save({"model": torch.nn.Linear(2, 2).state_dict()}, tmp_path, step=3)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000003/rank-0\.pt: missing"):
        ckpt.load_local(ckpt.latest(tmp_path))


def _slow_auc(p, y):
    """Mann-Whitney: the probability a random positive outranks a random negative (ties 1/2)."""
    pos = [a for a, b in zip(p, y) if b == 1]
    neg = [a for a, b in zip(p, y) if b == 0]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_binary_metrics_against_formulas():
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(300, generator=g) < 0.3).float()
    p = torch.rand(300, generator=g) * 0.5 + 0.4 * y
    p[:20] = 0.5  # ties
    m = binary_metrics(p, y)
    assert abs(m["auc"] - _slow_auc(p.tolist(), y.tolist())) < 1e-6  # torchmetrics sums in fp32
    ll = (
        -sum(b * math.log(a) + (1 - b) * math.log(1 - a) for a, b in zip(p.tolist(), y.tolist()))
        / 300
    )
    assert abs(m["logloss"] - ll) < 1e-9
    r = y.double().mean().item()
    assert abs(m["ne"] - ll / -(r * math.log(r) + (1 - r) * math.log(1 - r))) < 1e-9
    assert m["rows"] == 300


def test_accumulator_multi_task_concatenates_batches():
    acc = EvalAccumulator(["a", "b"])
    g = torch.Generator().manual_seed(1)
    ps, ys = [], []
    for _ in range(3):
        p, y = torch.rand(50, 2, generator=g), (torch.rand(50, 2, generator=g) < 0.5).float()
        acc.update(p, y)
        ps.append(p)
        ys.append(y)
    out = acc.compute()
    p, y = torch.cat(ps), torch.cat(ys)
    for i, t in enumerate(["a", "b"]):
        assert abs(out[t]["auc"] - _slow_auc(p[:, i].tolist(), y[:, i].tolist())) < 1e-6
        assert out[t]["rows"] == 150


def test_training_metrics_exporter_serves_prometheus_text():
    """Rank 0's exporter: scrape it over HTTP and parse with prometheus_client's parser."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from ranking.train.telemetry import PromExporter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exp = PromExporter(rank=0, port=port)
    exp.update({"step": 42, "loss": 0.25, "samples_per_s": 1234.5, "eval_auc": 0.75})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    got = {
        s.name: s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name.startswith("mixrank_train_")
    }
    assert got["mixrank_train_step"] == 42
    assert got["mixrank_train_loss"] == 0.25
    assert got["mixrank_train_samples_per_second"] == 1234.5
    assert got["mixrank_train_eval_auc"] == 0.75
    assert PromExporter(rank=1, port=port).gauges is None  # only rank 0 exports
    # the next run of a several-run worker (quality harness) reuses the endpoint and gauges
    # instead of failing to bind the port or to register the gauges again
    again = PromExporter(rank=0, port=port)
    again.update({"step": 7})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    steps = [
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == "mixrank_train_step"
    ]
    assert steps == [7]


def test_fused_embedding_optimiser_params_from_config():
    """The sharders' fused params name real FBGEMM optimiser and weight-decay modes."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    from ranking.train.config import load_experiment
    from ranking.train.sharding import fused_params

    exp = load_experiment("configs/demo.yaml", ["train.embedding_lr=0.3"], require_data=False)
    # fused decay is for the CUDA kernels (the config refuses it on CPU, whose kernels ignore it:
    # tests/test_train_regularization.py); the mapping itself is device-independent
    exp.train.embedding_weight_decay = 0.01
    fp = fused_params(exp)
    assert fp["optimizer"] == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    assert fp["learning_rate"] == 0.3 and fp["weight_decay"] == 0.01
    assert fp["weight_decay_mode"] == WeightDecayMode.DECOUPLE
    exp = load_experiment(
        "configs/demo.yaml", ["train.embedding_optimizer=sgd"], require_data=False
    )
    assert fused_params(exp)["optimizer"] == EmbOptimType.EXACT_SGD
    assert "weight_decay" not in fused_params(exp)


def test_model_version_hashes_the_model_not_the_run_directory(tmp_path):
    """The same weights, config and schema trained in another run directory (another vocab file
    path, another copy of the data) get the same ``model_version``; any change of content not."""
    from ranking.export import read_manifest, write_artifact
    from ranking.features import load_schema

    data = {"train": "/data/a/train", "valid": "/data/a/valid", "batch_size": 8}

    def version(name, *, weights=None, preset="frappe", schema_file="/runs/a/vocab/s.yaml", **cfg):
        config = {"name": "m", "schema": schema_file, "model": {"arch": "dlrm"}, "data": data}
        out = write_artifact(
            tmp_path / name,
            weights if weights is not None else {"w": torch.arange(4.0)},
            config={**config, **cfg},
            schema=load_schema(preset),
            dtype="fp32",
            metrics={"auc": 0.5},
            step=3,
        )
        return read_manifest(out)["model_version"]

    base = version("base")
    moved = {"train": "/data/b/train", "valid": "/data/b/valid", "batch_size": 8}
    assert version("moved-data", data=moved) == base
    assert version("other-run", schema_file="/runs/b/vocab/s.yaml") == base
    assert version("batch", data={**data, "batch_size": 16}) != base
    assert version("weights", weights={"w": torch.arange(4.0) + 1}) != base
    assert version("schema", preset="movielens") != base
    assert version("arch", model={"arch": "dcnv2"}) != base


def test_views_into_one_buffer_are_saved_without_a_copy_and_restored(tmp_path):
    """FBGEMM keeps a group's tables in one buffer: the checkpoint writes each table from an
    alias of exactly its bytes (``exact_storage``: same memory, no clone) and reads it back."""
    buf = torch.arange(3000, dtype=torch.float32)
    a, b = buf[:1000].view(100, 10), buf[1000:2800].view(200, 9)
    alias = ckpt.exact_storage(b)
    assert alias.data_ptr() == b.data_ptr() and torch.equal(alias, b)
    assert alias.untyped_storage().nbytes() == b.numel() * 4  # what DCP would otherwise clone
    alias[0, 0] = -5.0
    assert buf[1000] == -5.0  # the same memory
    bt = b.t()  # not contiguous: left to DCP's clone
    assert ckpt.exact_storage(buf) is buf and ckpt.exact_storage(bt) is bt
    want = {"a": a.clone(), "b": b.clone()}
    ckpt.save({"model": {"a": a, "b": b}}, tmp_path, step=1)
    got = {"a": torch.zeros(100, 10), "b": torch.zeros(200, 9)}
    ckpt.load({"model": got}, ckpt.latest(tmp_path))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mapped_copy_reads_any_part_of_a_saved_tensor_block_by_block(tmp_path, monkeypatch):
    """``_copy_mapped`` (the export's checkpoint reader) against the tensor itself: every part
    (a shard's offsets and lengths per dimension, as DCP asks for row- and column-wise shards)
    comes out exactly, with the source mapped a few rows at a time."""
    monkeypatch.setattr(ckpt, "_BLOCK_BYTES", 100)  # 2 rows of 12 fp32 per mapped stretch
    g = torch.Generator().manual_seed(0)
    full = torch.randn(101, 12, generator=g)
    f = tmp_path / "t.pt"
    torch.save(full, f)
    meta = torch.load(f, map_location="meta", weights_only=True)
    start = meta.untyped_storage()._checkpoint_offset
    for offsets, lengths in [((0, 0), (101, 12)), ((37, 0), (50, 12)), ((5, 4), (91, 8)),
                             ((100, 11), (1, 1)), ((3, 0), (0, 12))]:  # fmt: skip
        target = torch.full(lengths, float("nan"))
        ckpt._copy_mapped(f, start, meta, offsets, lengths, target)
        want = full[offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]]
        assert torch.equal(target, want), (offsets, lengths)
    # a 0-d tensor and a non-contiguous one are mapped whole
    for t in (torch.tensor(3.5), torch.randn(6, 4, generator=g).t()):
        torch.save(t, f)
        meta = torch.load(f, map_location="meta", weights_only=True)
        target = torch.empty(t.shape)
        ckpt._copy_mapped(f, meta.untyped_storage()._checkpoint_offset, meta,
                          [0] * t.dim(), list(t.shape), target)  # fmt: skip
        assert torch.equal(target, t)
