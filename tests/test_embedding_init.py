"""``model.embedding_init_scale``: every table starts in ``U(-s, s)``, in the unsharded model and
in the trainer's DistributedModelParallel build (fused table-wise and data-parallel tables alike);
0 keeps TorchRec's default ``U(-sqrt(1/rows), sqrt(1/rows))``."""

from __future__ import annotations

import math

import pytest
import torch

from ranking.features import load_schema
from ranking.model.config import ConfigError, ModelConfig


def _tables(model) -> dict[str, torch.Tensor]:
    return {
        n.split(".")[-2]: p.detach()
        for n, p in model.named_parameters()
        if "embedding_bags" in n and n.endswith(".weight")
    }


@pytest.mark.parametrize("arch", ["rankmixer", "dlrm"])
def test_unsharded_tables_follow_the_scale(arch):
    # imported here: ranking.model.ranker imports torchrec, which imports triton, and
    # tests/test_kernels_ops.py needs TRITON_INTERPRET=1 set before triton's first import
    from ranking.model.ranker import build_model

    schema = load_schema("frappe")
    kw = {"num_tokens": 4} if arch == "rankmixer" else {}
    s = 1e-3
    torch.manual_seed(0)
    small = _tables(build_model(ModelConfig.from_dict({"arch": arch, "dim": 16, **kw,
                                                       "embedding_init_scale": s}), schema))  # fmt: skip
    torch.manual_seed(0)
    default = _tables(build_model(ModelConfig.from_dict({"arch": arch, "dim": 16, **kw}), schema))
    assert set(small) == {t.name for t in schema.tables}
    for name, w in small.items():
        assert w.abs().max() <= s
        # uniform on [-s, s]: std s / sqrt(3) (within 15% for >= 128 values)
        assert w.std().item() == pytest.approx(s / math.sqrt(3), rel=0.15)
        rows = w.shape[0]
        bound = math.sqrt(1 / rows)
        assert default[name].abs().max() <= bound
        assert default[name].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


@pytest.mark.parametrize("bad", [-0.1, 2.0])
def test_bad_scale_names_the_key(bad):
    with pytest.raises(ConfigError, match=r"model\.embedding_init_scale"):
        ModelConfig.from_dict(
            {"arch": "rankmixer", "num_tokens": 4, "embedding_init_scale": bad}, source="c.yaml"
        )


def test_trainer_build_fused_and_data_parallel_tables_follow_the_scale(one_rank_trainer):
    """One gloo rank, the trainer's own build: ``user`` is a fused table-wise table (FBGEMM
    initialises it from the config's bounds), the rest are data-parallel."""
    s = 2e-3
    cfg = {
        "name": "init",
        "schema": "frappe",
        "model": {
            "arch": "rankmixer",
            "dim": 16,
            "num_tokens": 4,
            "num_layers": 1,
            "embedding_init_scale": s,
        },
        "data": {"batch_size": 8},
        "train": {"sharding": {"*": "data_parallel", "user": "table_wise"}},
    }
    t = one_rank_trainer(cfg)
    stats = {}
    for name, v in t.model.state_dict().items():
        if "embedding_bags" not in name or not name.endswith(".weight"):
            continue
        if hasattr(v, "local_shards"):
            v = v.local_shards()[0].tensor
        stats[name.split(".")[-2]] = [float(v.abs().max()), float(v.float().std()), v.numel()]
    assert "user" in stats and "item" in stats and len(stats) == 10
    for name, (mx, std, _n) in stats.items():
        assert mx <= s * (1 + 1e-6), name
        assert std == pytest.approx(s / math.sqrt(3), rel=0.15), name
