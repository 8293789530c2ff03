"""Quantized embedding tables (``mixrank export --table-dtype int8|int4``, ``ranking.quant_tables``).

The independent reference is FBGEMM's published fused row-wise format, decoded here by hand:
a row is an fp16 scale and an fp16 bias followed by the ``bits``-bit codes (int4: two per byte,
low nibble first), and a value is ``code * scale + bias``, within half a quantization step of
the float value. The served model must equal the float model run on those dequantized tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ranking.cli import main as cli
from ranking.export import ArtifactError, _build, export_artifact, load_artifact, write_artifact
from ranking.model.synthetic import random_batch, toy_schema
from ranking.quant_tables import float_collections, quantize_tables, row_bytes
from ranking.train.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
BITS = {"int8": 8, "int4": 4}


def dequantize(rows: torch.Tensor, dim: int, table_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rows ``uint8 [n, row_bytes]`` -> ``(values [n, dim], scale [n])``, by the format's
    definition (a slow, obvious decoding)."""
    bits = BITS[table_dtype]
    sb = rows[:, :4].contiguous().view(torch.float16).float()  # [n, 2]: scale, bias
    scale, bias = sb[:, 0], sb[:, 1]
    codes = rows[:, 4:].long()
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(rows.shape[0], -1)
    return codes[:, :dim].float() * scale[:, None] + bias[:, None], scale


def _model(case: str):
    """(float model, schema, experiment config) for a small model of each table layout."""
    if case == "sequence":  # an EmbeddingBagCollection and an EmbeddingCollection
        exp = load_experiment(REPO / "configs" / "synth_sequence_pool.yaml", require_data=False)
        schema, config = exp.schema, exp.raw
    else:
        schema = toy_schema(num_tasks=1, dim=16)
        arch = {"arch": case, "dim": 16, "num_tokens": 4, "num_layers": 1}
        config = {"name": case, "schema": "toy", "model": arch}
    torch.manual_seed(0)
    model, _ = _build(config, schema.to_dict(), "test")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), schema, config


def _fp32_artifact(tmp_path: Path, case: str, dtype: str = "fp32"):
    model, schema, config = _model(case)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    art = write_artifact(
        tmp_path / f"{case}-fp32", weights, config=config, schema=schema, dtype=dtype,
        metrics={"auc": 0.5}, step=7,
    )  # fmt: skip
    return art, model, schema


@pytest.mark.parametrize("table_dtype", ["int8", "int4"])
def test_rows_are_fbgemm_fused_rowwise_and_lookups_decode_them(table_dtype):
    model, _, _ = _model("dlrm")
    ebc = model.model.sparse_arch.embedding_bag_collection
    floats = {n: b.weight.detach().clone() for n, b in ebc.embedding_bags.items()}
    quantize_tables(model, table_dtype)
    assert not float_collections(model)
    q = model.model.sparse_arch.embedding_bag_collection
    for name, w in floats.items():
        rows = q.state_dict()[f"embedding_bags.{name}.weight"]
        rows = getattr(rows, "elem", rows)
        assert rows.dtype == torch.uint8
        assert tuple(rows.shape) == (w.shape[0], row_bytes(w.shape[1], table_dtype))
        deq, scale = dequantize(rows, w.shape[1], table_dtype)
        # min/max of the row are representable: a step is (max - min) / (2^bits - 1)
        step = (w.max(1).values - w.min(1).values) / (2 ** BITS[table_dtype] - 1)
        torch.testing.assert_close(scale, step, rtol=2e-3, atol=1e-6)  # fp16 scale
        err = (deq - w).abs().max(1).values
        assert bool((err <= 0.5 * step * 1.01 + 2e-3 * w.abs().max(1).values).all()), name
    # the module's lookups are the decoded rows (sum pooling of one id per bag)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = q._feature_names
    ids = torch.tensor([1, 3] * len(keys))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, ids, torch.ones(len(ids), dtype=torch.int32))
    got = q(kjt).to_dict()
    tables = {f: c.name for c in q.embedding_bag_configs() for f in c.feature_names}
    for k in keys:
        rows = q.state_dict()[f"embedding_bags.{tables[k]}.weight"]
        rows = getattr(rows, "elem", rows)  # int4: TorchRec's UInt4Tensor around the bytes
        deq, _ = dequantize(rows, floats[tables[k]].shape[1], table_dtype)
        torch.testing.assert_close(got[k], deq[[1, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["rankmixer", "dlrm", "sequence"])
def test_int8_artifact_serves_the_model_on_dequantized_tables(tmp_path, case):
    """Re-export an fp32 artifact with int8 tables: the manifest records it, the tables are
    int8 rows (dim 16: 3.2x smaller), and the served probabilities equal the float model run on the
    decoded tables (and stay near the fp32 artifact's)."""
    src, model, _ = _fp32_artifact(tmp_path, case)
    out = export_artifact(src, tmp_path / f"{case}-int8", table_dtype="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["table_dtype"] == "int8" and manifest["step"] == 7
    assert (
        manifest["exported_from"]["model_version"]
        == json.loads((src / "manifest.json").read_text())["model_version"]
    )
    assert manifest["model_version"] != manifest["exported_from"]["model_version"]

    art = load_artifact(out)
    fp32 = load_artifact(src)
    saved = torch.load(out / "weights.pt", weights_only=True)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    q_bytes = f_bytes = 0
    for key, w in model.state_dict().items():
        if saved[key].dtype == torch.uint8:  # a table: decode it for the reference model
            ref_state[key] = dequantize(saved[key], w.shape[1], "int8")[0]
            q_bytes += saved[key].numel()
            f_bytes += w.numel() * 4
    assert q_bytes and f_bytes / q_bytes == pytest.approx(64 / 20)  # dim 16: 64 -> 16 + 4 bytes
    ref, _ = _build(art.manifest["config"], art.manifest["schema"], "ref")
    ref.load_state_dict(ref_state)
    batch = random_batch(art.schema, 64, seed=5)
    with torch.no_grad():
        want = torch.sigmoid(ref.eval()(batch).logits)
    got = art.predict(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - fp32.predict(batch)).abs().max() < 0.02  # int8 rounding of 0.3-wide tables
    # the serving path (the Ranker's load: validation + smoke forwards) takes it
    from serving.model import load_validated

    served = load_validated(out, None, previous=fp32)
    torch.testing.assert_close(served.predict(batch), got)


def test_cli_reexport_int4_and_the_refusals(tmp_path, capsys):
    src, _, _ = _fp32_artifact(tmp_path, "rankmixer", dtype="bf16")
    out = tmp_path / "int4"
    assert cli(["export", "--artifact", str(src), "--out", str(out), "--table-dtype", "int4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["table_dtype"] == "int4" and printed["dtype"] == "bf16"  # the source's dtype
    art = load_artifact(out)
    assert art.manifest["table_dtype"] == "int4"
    # a quantized artifact is a serving format: no warm start from it (its source is fine)
    from ranking.errors import UserError
    from ranking.train.warm_start import open_parent

    assert open_parent(src).kind == "artifact"
    with pytest.raises(UserError, match="its tables are int4"):
        open_parent(out)
    # int4 tables cannot become int8: their fp32 values are gone
    with pytest.raises(ArtifactError, match="table_dtype: the source's tables are int4"):
        export_artifact(out, tmp_path / "again", table_dtype="int8")
    # a manifest naming an unknown table dtype, or claiming fp32 over int4 rows, is named
    mf = out / "manifest.json"
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "table_dtype": "int3"}))
    with pytest.raises(ArtifactError, match="table_dtype: expected one of"):
        load_artifact(out)
    mf.write_text(json.dumps({**m, "table_dtype": "int8"}))
    with pytest.raises(ArtifactError, match=r"embedding_bags\.\w+\.weight: expected int8 rows"):
        load_artifact(out)
    mf.write_text(json.dumps({**m, "table_dtype": "fp32"}))
    with pytest.raises(ArtifactError, match="table_dtype fp32"):
        load_artifact(out)
