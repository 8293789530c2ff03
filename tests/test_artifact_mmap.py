"""Memory-mapped artifact loading (``ranking.export.load_artifact``).

The reference is the loader as it was before: build the model (tables allocated and
initialised), ``torch.load`` the weights into memory and copy them in. The mapped loader must
give bit-identical probabilities, and its tables must live in the weights file's mapping
(``/proc/self/maps``), privately: writing to a loaded tensor never changes the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ranking.export import ArtifactError, _build, load_artifact, write_artifact
from ranking.model.synthetic import random_batch, toy_schema
from ranking.train.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def _mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of ``path`` mapped into this process (Linux ``/proc/self/maps``)."""
    target, out = str(path.resolve()), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _in_file(t: torch.Tensor, ranges) -> bool:
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


def _export(tmp_path: Path, config: dict, schema, dtype: str = "fp32") -> tuple[Path, dict]:
    torch.manual_seed(0)
    model, _ = _build(config, schema.to_dict(), "test", device=None)
    with torch.no_grad():  # tables away from their init, so a missed assignment shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    weights = {
        k: v.detach().to(cast) if v.is_floating_point() else v.detach()
        for k, v in model.state_dict().items()
    }
    art = write_artifact(
        tmp_path / f"art-{dtype}", weights, config=config, schema=schema, dtype=dtype,
        metrics={}, step=1,
    )  # fmt: skip
    return art, weights


def _reference_predict(art_dir: Path, art, batch) -> torch.Tensor:
    """The loader before mapping: built, initialised, weights read into memory and copied in."""
    model, _ = _build(art.manifest["config"], art.manifest["schema"], "ref")
    state = torch.load(art_dir / "weights.pt", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    art.model, art._fast = model.eval(), None
    return art.predict(batch)


CASES = {
    "rankmixer": ({"arch": "rankmixer", "dim": 16, "num_tokens": 4, "num_layers": 1}, None),
    "dlrm": ({"arch": "dlrm"}, None),
    "sequence": (None, REPO / "configs" / "synth_sequence_pool.yaml"),
}


def _case(case: str):
    """(schema, experiment config) of a ``CASES`` entry."""
    model_d, yaml_path = CASES[case]
    if yaml_path is None:
        return toy_schema(num_tasks=1, dim=8), {"name": case, "schema": "toy", "model": model_d}
    exp = load_experiment(yaml_path, require_data=False)
    return exp.schema, exp.raw


@pytest.mark.parametrize("case", list(CASES))
def test_mapped_load_equals_the_copying_load_and_tables_stay_in_the_file(tmp_path, case):
    schema, config = _case(case)
    art_dir, weights = _export(tmp_path, config, schema)
    art = load_artifact(art_dir)
    batch = random_batch(art.schema, 64, seed=1)
    got = art.predict(batch)

    tables = {k: v for k, v in art.model.state_dict().items() if k.endswith(".weight")}
    tables = {k: v for k, v in tables.items() if "embedding" in k}
    assert tables, "no embedding tables found"
    ranges = _mappings(art_dir / "weights.pt")
    assert ranges, "weights.pt is not mapped into the process"
    for k, t in tables.items():
        assert _in_file(t, ranges), f"{k} was copied out of the mapped weights file"
        assert torch.equal(t, weights[k]), k
    # private mapping: a write copies the page and never reaches the file
    k = next(iter(tables))
    with torch.no_grad():
        tables[k].view(-1)[0] = 1234.5
    assert torch.load(art_dir / "weights.pt", weights_only=True)[k].view(-1)[0] != 1234.5
    with torch.no_grad():
        tables[k].view(-1)[0] = weights[k].view(-1)[0]

    want = _reference_predict(art_dir, art, batch)
    assert torch.equal(got, want)


def test_bf16_artifact_is_upcast_and_equals_the_copying_load(tmp_path):
    """bf16 artifacts keep their old behaviour: every float tensor upcast to fp32 in memory
    (so not in the mapping), the same probabilities as the copying loader."""
    schema = toy_schema(num_tasks=1, dim=8)
    config = {
        "name": "b",
        "schema": "toy",
        "model": {"arch": "rankmixer", "dim": 16, "num_tokens": 4},
    }
    art_dir, weights = _export(tmp_path, config, schema, dtype="bf16")
    art = load_artifact(art_dir, dtype="fp32")
    for k, v in art.model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            assert torch.equal(v, weights[k].float()), k
    batch = random_batch(art.schema, 32, seed=2)
    got = art.predict(batch)
    assert torch.equal(got, _reference_predict(art_dir, art, batch))


def test_missing_table_and_bad_weights_are_named(tmp_path):
    schema = toy_schema(num_tasks=1, dim=8)
    config = {"name": "m", "schema": "toy", "model": {"arch": "dlrm"}}
    art_dir, weights = _export(tmp_path, config, schema)
    table = next(k for k in weights if "embedding_bags" in k)
    torch.save({k: v for k, v in weights.items() if k != table}, art_dir / "weights.pt")
    with pytest.raises(ArtifactError, match=re.escape(table)):
        load_artifact(art_dir)
    (art_dir / "weights.pt").write_bytes(b"not a zip file")
    with pytest.raises(ArtifactError, match=r"weights\.pt: cannot load weights"):
        load_artifact(art_dir)


@pytest.mark.parametrize(("case", "table_dtype"), [("dlrm", "int8"), ("rankmixer", "int4"),
                                                  ("sequence", "int8")])  # fmt: skip
def test_quantized_tables_are_served_from_the_mapped_file(tmp_path, case, table_dtype):
    """int8 / int4 tables: FBGEMM's buffer is the mapped weights file (every table's rows in
    the mapping, at its record), lookups and probabilities identical to the copying load, and
    the mapping private (a write does not reach the file)."""
    from ranking.export import export_artifact
    from ranking.quant_tables import load_quantized_tables, quantized_collections

    schema, config = _case(case)
    src, _ = _export(tmp_path, config, schema)
    art_dir = export_artifact(src, tmp_path / table_dtype, table_dtype=table_dtype)
    wf = art_dir / "weights.pt"
    saved = torch.load(wf, weights_only=True)
    art = load_artifact(art_dir)
    ranges = _mappings(wf)
    colls = quantized_collections(art.model)
    assert colls
    for name, q in colls:
        for emb in q._emb_modules:
            assert emb.weights_host.numel() == wf.stat().st_size and _in_file(
                emb.weights_host, ranges
            )
        for k, t in q.state_dict().items():
            t = getattr(t, "elem", t)  # int4: UInt4Tensor
            assert _in_file(t, ranges), k
            assert torch.equal(t, saved[f"{name}.{k}"]), k
    # the copying load, as before: rows copied into FBGEMM's own buffer
    ref, _ = _build(art.manifest["config"], art.manifest["schema"], "ref", device="meta")
    rest = load_quantized_tables(ref, saved, table_dtype)
    ref.load_state_dict(rest, assign=True, strict=False)
    batch = random_batch(art.schema, 64, seed=3)
    got = art.predict(batch)
    art.model, art._fast = ref.eval(), None
    assert torch.equal(got, art.predict(batch))
    # private: writing a mapped row copies its page and never reaches the file
    name, q = colls[0]
    key, t = next(iter(q.state_dict().items()))
    t = getattr(t, "elem", t)
    t[0, 0] = 255 - int(t[0, 0])
    assert torch.equal(torch.load(wf, weights_only=True)[f"{name}.{key}"], saved[f"{name}.{key}"])


def test_int8_artifact_written_before_tables_had_their_own_records_still_maps(tmp_path):
    """Artifacts exported before ``table_state_dict`` cloned the tables hold each FBGEMM
    buffer as one record, the tables as views into it: they load (mapped) and score the same."""
    from ranking.quant_tables import _plain, quantize_tables, table_state_dict

    schema = toy_schema(num_tasks=1, dim=8)
    config = {"name": "old", "schema": "toy", "model": {"arch": "dlrm"}}
    torch.manual_seed(0)
    model, _ = _build(config, schema.to_dict(), "test")
    quantize_tables(model, "int8")
    views = {k: _plain(v).detach() for k, v in model.state_dict().items()}  # the old layout
    shared = [v for k, v in views.items() if "embedding_bags" in k]
    assert len({t.untyped_storage().data_ptr() for t in shared}) < len(shared)
    kw = {"config": config, "schema": schema, "dtype": "fp32", "metrics": {}, "step": 1,
          "table_dtype": "int8"}  # fmt: skip
    old = load_artifact(write_artifact(tmp_path / "old", views, **kw))
    new = load_artifact(write_artifact(tmp_path / "new", table_state_dict(model), **kw))
    batch = random_batch(schema, 64, seed=4)
    assert torch.equal(old.predict(batch), new.predict(batch))
