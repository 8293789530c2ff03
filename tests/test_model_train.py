"""Every architecture, trained a few hundred steps on planted-interaction data, beats logistic
regression's AUC on the same data (labels come from pairwise dot products of hidden per-id
vectors, which a model linear in the ids cannot represent)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranking.model.config import ModelConfig
from ranking.model.mixing import anneal_temperature
from ranking.model.ranker import build_model
from ranking.model.synthetic import planted_batch, slice_batch, toy_schema

STEPS, BS, N_TRAIN, N_TEST = 250, 256, 8192, 8192
ARCHS = {
    "rankmixer": {"arch": "rankmixer", "num_tokens": 4},
    "rankmixer_moe": {
        "arch": "rankmixer",
        "num_tokens": 4,
        "moe": {"enabled": True, "num_experts": 4},
    },
    "tokenmixer_large": {
        "arch": "tokenmixer_large",
        "num_heads": 4,
        "global_token": True,
        "tokenmixer_large": {"aux_loss_weight": 0.1},
        "num_layers": 2,
    },
    "tokenmixer_large_moe": {"arch": "tokenmixer_large", "num_heads": 4, "moe": {"enabled": True}},
    "unimixer": {"arch": "unimixer", "unimixer": {"block_size": 16}},
    "unimixer_lite": {"arch": "unimixer_lite", "unimixer": {"block_size": 16}},
    "dlrm": {"arch": "dlrm", "dlrm": {"dense_arch": [32], "over_arch": [64]}},
    "dcnv2": {"arch": "dcnv2", "dlrm": {"dense_arch": [32], "over_arch": [64], "dcn_rank": 16}},
}


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney rank formula (scores are continuous: no ties to average)."""
    s, y = scores.flatten().double(), labels.flatten()
    ranks = torch.empty_like(s)
    ranks[s.argsort()] = torch.arange(1, len(s) + 1, dtype=torch.double)
    pos = float(y.sum())
    neg = len(y) - pos
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and immune to OpenMP barrier stalls when the shared
    machine is oversubscribed (two threads made a 10 s test take minutes there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    schema = toy_schema()
    train = planted_batch(schema, N_TRAIN, seed=1, scale=2.5)
    test = planted_batch(schema, N_TEST, seed=2, scale=2.5)
    batches = [slice_batch(train, i, i + BS) for i in range(0, N_TRAIN, BS)]
    return schema, batches, test


class LogisticRegression(torch.nn.Module):
    """One weight per (feature, id) plus a linear term on the dense features."""

    def __init__(self, schema):
        super().__init__()
        self.bags = torch.nn.ModuleDict(
            {
                f.name: torch.nn.EmbeddingBag(
                    f.num_buckets, 1, mode="sum", include_last_offset=True
                )
                for f in schema.sparse_features
            }
        )
        self.dense = torch.nn.Linear(schema.num_dense, 1)

    def forward(self, batch):
        jts = batch.sparse.to_dict()
        out = self.dense(batch.dense)
        for name, bag in self.bags.items():
            out = out + bag(jts[name].values(), jts[name].offsets())
        return out


def fit(model, batches, test, lr, steps=STEPS):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        b = batches[int(torch.randint(len(batches), (1,), generator=gen))]
        anneal_temperature(model, step, steps)  # UniMixer's tau: 1.0 -> 0.05 (no-op elsewhere)
        out = model(b)
        logits, aux = (out, 0.0) if torch.is_tensor(out) else (out.logits, out.aux_loss)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(test)
    return auc(out if torch.is_tensor(out) else out.logits, test.labels)


@pytest.fixture(scope="module")
def lr_auc(data):
    schema, batches, test = data
    torch.manual_seed(0)
    return fit(LogisticRegression(schema), batches, test, lr=3e-2, steps=2 * STEPS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_beats_logistic_regression(name, data, lr_auc):
    schema, batches, test = data
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"dim": 32, "ffn_mult": 2, **ARCHS[name]})
    got = fit(build_model(cfg, schema), batches, test, lr=5e-3)
    print(f"{name}: AUC {got:.4f} vs logistic regression {lr_auc:.4f}")
    assert lr_auc > 0.5
    assert got > lr_auc + 0.01, f"{name}: AUC {got:.4f} <= LR {lr_auc:.4f} + 0.01"
