"""Both exports write the tables into the artifact's mapped file as they read them
(``ranking.export_stream``): from a checkpoint (``export_checkpoint``) or from another artifact
(``export_artifact``). The file must be byte for byte what ``torch.save`` writes of the model's
state dict quantized in memory (TorchRec's ``quantize_tables``, dense weights cast), for every
table layout, dense dtype and table dtype."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
import torch

from ranking.export import (
    DTYPES,
    MANIFEST,
    WEIGHTS,
    ArtifactError,
    _build,
    export_artifact,
    export_checkpoint,
    load_artifact,
    schema_dict,
)
from ranking.export_stream import convert_rows, fix_crcs, write_in_place
from ranking.model.synthetic import toy_schema
from ranking.quant_tables import quantize_tables, table_keys, table_state_dict
from ranking.train import checkpoint as ckpt
from ranking.train.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def _model(case: str):
    """(model with random weights, schema, config) for each table layout."""
    if case in ("sequence", "mc"):  # an EBC and an EC; managed-collision tables
        name = "synth_sequence_pool.yaml" if case == "sequence" else "mc_stream.yaml"
        exp = load_experiment(REPO / "configs" / name, require_data=False)
        schema, config = exp.schema, exp.raw
    else:
        schema = toy_schema(num_tasks=2, dim=16)
        config = {"name": case, "schema": "toy", "model": {"arch": case, "dim": 16,
                  "num_tokens": 4, "num_layers": 1}}  # fmt: skip
    torch.manual_seed(0)
    model, _ = _build(config, schema_dict(schema), "test")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), schema, config


def _checkpoint(tmp_path: Path, model, schema, config) -> Path:
    info = {"config": config, "schema": schema_dict(schema), "metrics": {"auc": 0.6}}
    return ckpt.save({"model": model.state_dict()}, tmp_path / "ckpt", step=3, info=info)


def test_written_in_place_is_torch_save_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(300, 7, generator=g),
        "h": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "q": torch.randint(0, 256, (1000, 20), dtype=torch.uint8, generator=g),
        "n": torch.arange(4),
        "e": torch.empty(0, 16),
    }
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "a" / WEIGHTS)
    layout = {k: torch.empty_like(v) for k, v in sd.items()}  # shapes only
    write_in_place(tmp_path / "b" / WEIGHTS, layout, lambda k, dst: dst.copy_(sd[k]))
    a, b = (tmp_path / d / WEIGHTS for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(b) as zf:
        assert zf.testzip() is None  # every CRC-32 checks
    got = torch.load(b, weights_only=True)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_fix_crcs_is_what_makes_the_file_valid(tmp_path):
    """Filled after ``skip_data``, the records fail zipfile's CRC check and the serialization
    id is not torch.save's; ``fix_crcs`` makes it the same file."""
    import mmap

    sd = {"a": torch.arange(100), "b": torch.ones(7, 3)}
    f, ref = tmp_path / "x" / WEIGHTS, tmp_path / "ref" / WEIGHTS
    f.parent.mkdir(), ref.parent.mkdir()
    torch.save(sd, ref)
    with torch.serialization.skip_data():
        torch.save(sd, f)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(f, mmap=True, weights_only=True)
    for k, v in mapped.items():
        v.copy_(sd[k])
    del mapped
    assert f.read_bytes() != ref.read_bytes()
    with zipfile.ZipFile(f) as zf, pytest.raises(zipfile.BadZipFile, match="CRC"):
        zf.read(next(n for n in zf.namelist() if n.endswith("data/0")))
    fix_crcs(f)
    assert f.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("table_dtype", ["int8", "int4"])
def test_chunked_conversion_is_the_whole_table_quantized(table_dtype):
    """Quantizing in row chunks gives TorchRec's own quantization of the whole table."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=1001, feature_names=["f"])]
    )
    m = torch.nn.Module()
    m.ebc = ebc
    w = ebc.embedding_bags["t"].weight.detach().clone()
    want = table_state_dict(quantize_tables(m, table_dtype))["ebc.embedding_bags.t.weight"]
    got = torch.empty_like(want)
    convert_rows(w, got, table_dtype, chunk=100)  # 11 chunks, the last short
    assert torch.equal(got, want)


CASES = [
    ("dlrm", "fp32", "fp32"),
    ("dlrm", "bf16", "int8"),
    ("rankmixer", "fp32", "int4"),
    ("rankmixer", "bf16", "fp32"),
    ("sequence", "fp32", "int8"),
    ("mc", "fp32", "fp32"),
]


def _reference(model, dtype: str, table_dtype: str, out: Path) -> bytes:
    """``torch.save`` of the state dict the artifact should hold, made in memory."""
    m = quantize_tables(copy.deepcopy(model), table_dtype)
    sd = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
          for k, v in table_state_dict(m).items()}  # fmt: skip
    out.mkdir()
    torch.save(sd, out / WEIGHTS)
    return (out / WEIGHTS).read_bytes()


@pytest.mark.parametrize(("case", "dtype", "table_dtype"), CASES)
def test_both_exports_write_torch_save_of_the_quantized_state_dict(
    tmp_path, monkeypatch, case, dtype, table_dtype
):
    monkeypatch.setattr(ckpt, "_BLOCK_BYTES", 256)  # the checkpoint read a few rows at a time
    model, schema, config = _model(case)
    assert table_keys(model)
    want = _reference(model, dtype, table_dtype, tmp_path / "ref")
    source = _checkpoint(tmp_path, model, schema, config)
    direct = export_checkpoint(source, tmp_path / "direct", dtype, table_dtype)
    assert (direct / WEIGHTS).read_bytes() == want
    # the same through an fp32 artifact re-exported (export_artifact): the same file and the
    # same model_version, whichever way it was made
    fp32 = export_checkpoint(source, tmp_path / "fp32")
    again = export_artifact(fp32, tmp_path / "again", dtype, table_dtype)
    assert (again / WEIGHTS).read_bytes() == want
    a, b = (json.loads((p / MANIFEST).read_text()) for p in (direct, again))
    assert a["model_version"] == b["model_version"]
    assert (a["dtype"], a["table_dtype"]) == (dtype, table_dtype)
    for art in (direct, again):
        assert not [p.name for p in art.iterdir() if p.name.startswith(".")]  # no staging left
    load_artifact(direct)  # and it serves


def test_export_checkpoint_refuses_a_checkpoint_without_a_table(tmp_path):
    model, schema, config = _model("dlrm")
    sd = {k: v for k, v in model.state_dict().items() if k not in table_keys(model)}
    info = {"config": config, "schema": schema_dict(schema)}
    source = ckpt.save({"model": sd}, tmp_path / "ckpt", step=1, info=info)
    with pytest.raises(ArtifactError, match=r"Missing key .*embedding_bags\.user\.weight"):
        export_checkpoint(source, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]  # tmp removed


def test_a_full_disk_is_an_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """The weights file's blocks are reserved before it is written through the mapping (a
    write into a hole of a full disk would be SIGBUS): ``posix_fallocate`` failing, as on a
    full disk, is an ArtifactError naming the file; no artifact or temporary is left."""
    import errno
    import os

    model, schema, config = _model("dlrm")
    source = _checkpoint(tmp_path, model, schema, config)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ArtifactError, match=r"weights\.pt: cannot reserve .* No space left"):
        export_checkpoint(source, tmp_path / "art")
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]
