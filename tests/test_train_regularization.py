"""Embedding-only regularisation in the trainer.

- FBGEMM's fused CPU kernels ignore ``weight_decay`` (checked against the optimiser formulas),
  which is why the config refuses ``train.embedding_weight_decay`` on fused CPU tables;
- data-parallel tables get ``embedding_weight_decay`` through a parameter group of the dense
  optimiser, the other dense parameters keep ``weight_decay`` (one AdamW step checked against the
  AdamW formula, and the groups of a real ``DistributedModelParallel`` model checked by name).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ranking.train.config import ConfigError, load_experiment


@pytest.mark.parametrize("optim", ["EXACT_ROWWISE_ADAGRAD", "EXACT_ADAGRAD", "EXACT_SGD"])
def test_fbgemm_cpu_kernels_ignore_weight_decay(optim):
    """One fused update of one row, with and without weight decay, against the formulas. If a
    future FBGEMM applies the decay on CPU, this fails: then lift the config's refusal."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    lr, wd, eps = 0.1, 0.5, 1e-8
    w0 = torch.arange(40.0).view(10, 4) / 10
    g = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    got = {}
    for decay in (0.0, wd):
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=getattr(EmbOptimType, optim),
            learning_rate=lr,
            eps=eps,
            weight_decay=decay,
            weight_decay_mode=WeightDecayMode.DECOUPLE,
        )
        with torch.no_grad():
            tbe.split_embedding_weights()[0].copy_(w0)
        out = tbe(torch.tensor([3]), torch.tensor([0, 1]))
        out.backward(g)
        got[decay] = tbe.split_embedding_weights()[0][3].detach().clone()
    row = w0[3]
    if optim == "EXACT_ROWWISE_ADAGRAD":  # one accumulator per row: the mean squared gradient
        step = lr * g[0] / (torch.sqrt((g[0] ** 2).mean()) + eps)
    elif optim == "EXACT_ADAGRAD":
        step = lr * g[0] / (g[0].abs() + eps)
    else:
        step = lr * g[0]
    no_decay = row - step
    decoupled = row - step - lr * wd * row  # what DECOUPLE would give
    torch.testing.assert_close(got[0.0], no_decay, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[wd], no_decay, atol=1e-6, rtol=0)  # decay ignored
    assert (got[wd] - decoupled).abs().max() > 0.05  # lr * wd * row = 0.06..0.075


def test_config_refuses_fused_embedding_decay_on_cpu_and_accepts_data_parallel():
    if torch.cuda.is_available():
        pytest.skip("the refusal is CPU-only")
    with pytest.raises(ConfigError, match=r"train\.embedding_weight_decay"):
        load_experiment(
            "configs/demo.yaml", ["train.embedding_weight_decay=0.1"], require_data=False
        )
    # a table left fused is enough to refuse
    with pytest.raises(ConfigError, match=r"train\.embedding_weight_decay"):
        load_experiment(
            "configs/frappe_dlrm.yaml",
            ["train.embedding_weight_decay=0.1", "train.sharding.user=data_parallel"],
            require_data=False,
        )
    with pytest.raises(ConfigError, match=r"train\.embedding_weight_decay"):
        load_experiment(  # recipe B's config with one table back on the fused kernels
            "configs/frappe_rankmixer.yaml", ["train.sharding.user=table_wise"], require_data=False
        )
    exp = load_experiment(
        "configs/frappe_rankmixer.yaml",
        ["train.embedding_weight_decay=0.1", "train.sharding.*=data_parallel"],
        require_data=False,
    )
    assert exp.train.sharding == {"*": "data_parallel"}


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.sharding.*=diagonal", "train.sharding.*"),
        ("train.select_metric=f1", "train.select_metric"),
        ("train.early_stopping_patience=2", "train.early_stopping_patience"),  # no select_best
        ("train.embedding_weight_decay=-1", "train.embedding_weight_decay"),
        ("train.select_best=maybe", "train.select_best"),
    ],
)
def test_bad_selection_and_regularisation_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("*", r"\*")):
        load_experiment("configs/demo.yaml", [override], require_data=False)


def test_sharding_wildcard_and_named_tables():
    from ranking.train.config import sharding_type

    forced = {"*": "data_parallel", "user": "table_wise"}
    assert sharding_type(forced, "user") == "table_wise"
    assert sharding_type(forced, "item") == "data_parallel"
    assert sharding_type({"user": "row_wise"}, "item") is None


def test_adamw_groups_decay_embeddings_only_against_the_formula():
    """One AdamW step of the trainer's dense optimiser: the table decays by
    ``embedding_weight_decay``, the linear layer by ``weight_decay``."""
    from ranking.train.optim import dense_optimizer_factory
    from ranking.train.sharding import embedding_param_names

    exp = load_experiment(
        "configs/frappe_rankmixer.yaml",
        [
            "train.sharding.*=data_parallel",
            "train.dense_optimizer=adamw",
            "train.embedding_weight_decay=2.0",
            "train.weight_decay=0.0",
            "train.lr=0.01",
        ],
        require_data=False,
    )
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "sparse": torch.nn.ModuleDict({"t": torch.nn.Embedding(5, 3)}),
            "mlp": torch.nn.Linear(3, 1),
        }
    )
    named = dict(model.named_parameters())
    emb = embedding_param_names(named.items(), ["sparse"])
    assert emb == {"sparse.t.weight"}
    opt = dense_optimizer_factory(exp, emb)(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    loss = model["mlp"](model["sparse"]["t"](torch.tensor([0, 2]))).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in named.items()}
    opt.step()
    lr, eps = 0.01, 1e-8
    for n, p in named.items():
        wd = 2.0 if n in emb else 0.0
        g = grads[n]
        # AdamW step 1: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps)
        m_hat = g
        v_hat = g * g
        expect = before[n] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expect, atol=1e-6, rtol=1e-5)
    # rows not looked up (zero gradient) are decayed too: AdamW's decoupled decay
    t = named["sparse.t.weight"].detach()
    torch.testing.assert_close(t[1], before["sparse.t.weight"][1] * (1 - lr * 2.0))


def test_dmp_data_parallel_tables_land_in_the_embedding_group(one_rank_trainer):
    """The trainer's own build (DistributedModelParallel, one gloo rank): every data-parallel
    table, and nothing else, is in the ``embedding_weight_decay`` group (0 here, against 0.01
    for the rest: a fused table cannot take decay on CPU, so ``user`` must be in neither)."""
    cfg = {
        "name": "groups",
        "schema": "frappe",
        "model": {"arch": "rankmixer", "dim": 16, "num_tokens": 4, "num_layers": 1},
        "data": {"batch_size": 8},
        "train": {
            "sharding": {"*": "data_parallel", "user": "table_wise"},
            "embedding_weight_decay": 0.0,  # fused CPU tables refuse decay: 0 here
            "weight_decay": 0.01,
        },
    }
    t = one_rank_trainer(cfg)
    names = {id(p): n for n, p in t.model.named_parameters()}
    groups = [
        {"wd": g["weight_decay"], "names": sorted(names[id(p)] for p in g["params"])}
        for g in t.dense_opt._optimizer.param_groups
    ]
    by_wd = {g["wd"]: g["names"] for g in groups}
    tables = {"item", "cost", "daytime", "weekday", "isweekend", "homework", "weather",
              "country", "city"}  # fmt: skip
    emb = by_wd[0.0]
    assert {n.split(".")[-2] for n in emb} == tables  # ...embedding_bags.<table>.weight
    assert all("embedding_bags" in n for n in emb)
    assert not any("embedding_bags" in n for n in by_wd[0.01])  # user is fused, not here
    assert len(by_wd[0.01]) > 4  # the mixer's dense parameters


def test_adam_couples_the_table_decay_into_the_gradient_recipe_b():
    """Recipe B (configs/frappe_rankmixer.yaml as shipped): Adam with a coupled L2 decay on the
    data-parallel tables only. Two steps against the Adam formula with ``g + wd * p`` as the
    gradient; a row that is never looked up still moves (its gradient is ``wd * p`` alone)."""
    from ranking.train.optim import dense_optimizer_factory
    from ranking.train.sharding import embedding_param_names

    exp = load_experiment("configs/frappe_rankmixer.yaml", [], require_data=False)
    t = exp.train
    assert (t.dense_optimizer, t.sharding, t.weight_decay) == ("adam", {"*": "data_parallel"}, 0)
    wd, lr, (b1, b2), eps = t.embedding_weight_decay, t.lr, (0.9, 0.999), 1e-8
    assert wd > 0
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"sparse": torch.nn.Embedding(5, 3), "mlp": torch.nn.Linear(3, 1)})
    named = dict(model.named_parameters())
    emb = embedding_param_names(named.items(), ["sparse"])
    opt = dense_optimizer_factory(exp, emb)(named)
    init_row1 = named["sparse.weight"][1].detach().clone()
    state = {n: (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p))
             for n, p in named.items()}  # fmt: skip
    for step in (1, 2):
        opt.zero_grad()
        model["mlp"](model["sparse"](torch.tensor([0, 2]))).sum().backward()
        for n, p in named.items():
            ref, m, v = state[n]
            g = p.grad.detach() + (wd * ref if n in emb else 0.0)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
            state[n] = (ref - lr * m_hat / (v_hat.sqrt() + eps), m, v)
        opt.step()
        for n, p in named.items():
            torch.testing.assert_close(p.detach(), state[n][0], atol=1e-6, rtol=1e-5)
    # the never-looked-up row 1 moved towards 0, by ~lr per step (Adam normalises wd * p)
    row1 = named["sparse.weight"][1].detach()
    torch.testing.assert_close(row1.abs(), init_row1.abs() - 2 * lr, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model_cfg",
    [
        {"arch": "rankmixer", "dim": 32, "num_tokens": 8, "num_layers": 1},
        {"arch": "dlrm", "dlrm": {"dense_arch": [16], "over_arch": [32]}},
    ],
)
def test_ranking_train_objective_against_the_formula(model_cfg):
    """``RankingTrain`` (the objective around the model, as TorchRec's ``DLRMTrain``): BCE from
    the softplus formula plus ``embedding_l2`` x the batch mean of the squared norm of every
    feature's embedding, looked up straight from the collections; in eval mode no penalty."""
    import torch.nn.functional as F

    from ranking.features import load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.loss import RankingTrain
    from ranking.train.sharding import embedding_modules, embedding_parents

    schema = load_schema("frappe")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(model_cfg), schema)
    batch = random_batch(schema, 32, seed=1)
    l2 = 0.25
    wrapped = RankingTrain(model, l2, embedding_parents(model, list(embedding_modules(model))))
    loss, (bce, out) = wrapped(batch)
    z, y = out.logits.float(), batch.labels
    want_bce = (y * F.softplus(-z) + (1 - y) * F.softplus(z)).mean()
    looked_up = [ebc(batch.sparse).values() for ebc in embedding_modules(model).values()]
    sq = sum(v.pow(2).sum(1) for v in looked_up).mean()
    aux = out.aux_loss.float() if out.aux_loss is not None else 0.0
    torch.testing.assert_close(bce, want_bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want_bce + aux + l2 * sq, rtol=1e-5, atol=1e-6)
    assert wrapped._pooled == []  # nothing kept past the step
    model.eval()
    loss_eval, (bce_eval, _) = wrapped(batch)
    torch.testing.assert_close(loss_eval, bce_eval + aux)


def test_embedding_l2_counts_once_with_pooled_and_sequence_tables():
    """A tokenizer owning both pooled and sequence collections is hooked once: the penalty is
    ``embedding_l2`` x the pooled embeddings' squared norm, not twice that (it was counted once
    per collection of the owner)."""
    from ranking.model.ranker import build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.config import load_experiment
    from ranking.train.loss import RankingTrain, embedding_l2_term
    from ranking.train.sharding import embedding_modules, embedding_parents

    repo = Path(__file__).resolve().parents[1]
    exp = load_experiment(repo / "configs" / "synth_sequence_pool.yaml", require_data=False)
    torch.manual_seed(0)
    model = build_model(exp.model, exp.schema)
    paths = list(embedding_modules(model))
    owners = embedding_parents(model, paths)
    assert len(paths) > len(owners) == len({id(o) for o in owners})
    seen = []
    owners[0].register_forward_hook(
        lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    l2 = 0.5
    wrapped = RankingTrain(model, l2, owners)
    loss, (bce, out) = wrapped(random_batch(exp.schema, 16, seed=2))
    aux = out.aux_loss.float() if out.aux_loss is not None else 0.0
    torch.testing.assert_close(loss, bce + aux + l2 * embedding_l2_term(seen), rtol=1e-5, atol=1e-6)
