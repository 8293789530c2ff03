"""Model configs: YAML loading with errors that name the key and the file; shape validation;
every preset in configs/models builds (the published shapes on the meta device, with their
analytic parameter count in the published range)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranking.features import load_schema
from ranking.model.config import ConfigError, ModelConfig
from ranking.model.flops import dense_params, embedding_params
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
ALL = sorted(p.stem for p in MODELS.glob("*.yaml"))
SMALL = [n for n in ALL if n.endswith("_small")]
# published size (dense params) and the accepted band; see docs/MODELS.md for the shapes
PUBLISHED = {
    "rankmixer_100m": (100e6, 0.7, 1.6),
    "rankmixer_1b": (1.0e9, 0.9, 1.4),
    "tokenmixer_large_500m": (500e6, 0.8, 1.2),
    "tokenmixer_large_4b": (4.0e9, 0.8, 1.2),
    "unimixer_67m": (67e6, 0.85, 1.15),
    "unimixer_lite_38m": (38e6, 0.85, 1.15),
}


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_unknown_model_key_names_key_and_file(tmp_path):
    p = write(
        tmp_path,
        "name: x\nschema: frappe\ntrain: {lr: 0.1}\nmodel:\n  arch: rankmixer\n  dimm: 64\n",
    )
    with pytest.raises(ConfigError, match=r"exp\.yaml: model\.dimm: unknown key"):
        ModelConfig.from_yaml(p)
    p = write(
        tmp_path,
        "name: x\nschema: frappe\nmodel:\n  arch: rankmixer\n  moe: {enabled: true, experts: 4}\n",
    )
    with pytest.raises(ConfigError, match=r"exp\.yaml: model\.moe\.experts: unknown key"):
        ModelConfig.from_yaml(p)


def test_other_top_level_sections_are_ignored(tmp_path):
    p = write(
        tmp_path,
        "name: x\nschema: frappe\ntrain: {steps: 3}\ndata: {path: y}\nmodel: {arch: dlrm}\n",
    )
    cfg, schema = ModelConfig.from_yaml(p)
    assert cfg.arch == "dlrm" and schema == "frappe"


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"arch": "transformer"}, "model.arch"),
        ({"arch": "rankmixer", "dim": "big"}, "model.dim"),
        ({"arch": "rankmixer", "tokenizer": "slices"}, "model.num_tokens"),
        ({"arch": "rankmixer", "moe": {"top_k": 9}}, "model.moe.top_k"),
        ({"arch": "rankmixer", "moe": {"dtsi_train_mode": "max"}}, "model.moe.dtsi_train_mode"),
        ({"arch": "unimixer", "unimixer": {"tau_end": 2.0}}, "model.unimixer.tau_end"),
    ],
)
def test_bad_values_name_the_key(model, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict(model, source="cfg.yaml")


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"arch": "rankmixer", "dim": 30, "num_tokens": 4}, "model.dim"),  # T must divide D
        ({"arch": "rankmixer", "dim": 32, "num_tokens": 4, "num_heads": 2}, "model.num_heads"),
        ({"arch": "tokenmixer_large", "dim": 32, "num_heads": 3}, "model.num_heads"),  # H | D
        (
            {"arch": "tokenmixer_large", "dim": 32, "num_tokens": 7},
            "model.num_tokens",
        ),  # groups give 5
        (
            {"arch": "unimixer", "dim": 32, "unimixer": {"block_size": 7}},
            "model.unimixer.block_size",
        ),
        ({"arch": "dlrm", "moe": {"enabled": True}}, "model.moe.enabled"),
    ],
)
def test_impossible_shapes_name_the_key(model, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(ModelConfig.from_dict(model, source="cfg.yaml"), toy_schema())


def test_dlrm_needs_one_embedding_dim():
    from ranking.features import FeatureSchema

    schema = FeatureSchema.from_dict(
        {
            "name": "s",
            "tasks": [{"name": "t", "label": "y"}],
            "features": [
                {"name": "a", "kind": "categorical", "num_buckets": 4, "dim": 8, "group": "g"},
                {"name": "b", "kind": "categorical", "num_buckets": 4, "dim": 4, "group": "g"},
            ],
        }
    )
    with pytest.raises(ConfigError, match=r"model\.arch"):
        build_model(ModelConfig.from_dict({"arch": "dlrm"}), schema)


def test_round_trip():
    cfg = ModelConfig.from_dict({"arch": "tokenmixer_large", "moe": {"enabled": True}})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_build_and_run(name):
    cfg, schema_ref = ModelConfig.from_yaml(MODELS / f"{name}.yaml")
    schema = load_schema(schema_ref)
    torch.manual_seed(0)
    model = build_model(cfg, schema)
    out = model(random_batch(schema, 8))
    assert out.logits.shape == (8, len(schema.tasks))
    n_dense = sum(p.numel() for p in model.parameters()) - embedding_params(schema)
    assert n_dense == dense_params(cfg, schema)


@pytest.mark.parametrize("name", [n for n in ALL if n not in SMALL])
def test_large_presets_build_on_meta(name):
    cfg, schema_ref = ModelConfig.from_yaml(MODELS / f"{name}.yaml")
    schema = load_schema(schema_ref)
    with torch.device("meta"):
        model = build_model(cfg, schema, device="meta")
    assert all(p.is_meta for p in model.parameters())
    n_dense = sum(p.numel() for p in model.parameters()) - embedding_params(schema)
    assert n_dense == dense_params(cfg, schema)
    if name in PUBLISHED:
        size, lo, hi = PUBLISHED[name]
        assert lo * size <= n_dense <= hi * size, f"{name}: {n_dense / 1e6:.1f}M dense params"


def test_load_experiment_resolves_the_schema():
    from ranking.model import load_experiment

    cfg, schema = load_experiment(MODELS / "tokenmixer_large_small.yaml")
    assert cfg.arch == "tokenmixer_large" and schema.name == "frappe"
    from ranking.features import SchemaError

    with pytest.raises(SchemaError, match="no_such_preset: not a schema file and not a preset"):
        load_schema("no_such_preset")
