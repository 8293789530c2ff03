"""Multi-task heads (``model.heads``: separate | mmoe | ple) against their equations.

The MMoE and PLE outputs are recomputed here from the modules' weights with the papers'
equations written out (explicit softmax, loops over experts and tasks); the special cases hold
(one MMoE expert is a plain tower on that expert; PLE with no task experts and one level is
MMoE); every head type trains and lowers for inference like the rest of the model.
"""

from __future__ import annotations

import math

import pytest
import torch

from ranking.inference import optimize_for_inference
from ranking.model.config import ConfigError, HeadsConfig, ModelConfig
from ranking.model.heads import MMoEHeads, PLEHeads, build_heads
from ranking.model.ranker import TaskHeads, build_model
from ranking.model.synthetic import random_batch, toy_schema

TASKS = ["click", "conversion", "like"]


def _mlp(seq, x):
    for layer in seq:
        x = layer(x)
    return x


def _softmax(v: torch.Tensor) -> torch.Tensor:
    e = [math.exp(float(a) - float(v.max())) for a in v]
    return torch.tensor([a / sum(e) for a in e], dtype=torch.float64)


def _heads(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = HeadsConfig(type=kind, expert_hidden=[12, 6], **kw)
    return build_heads(10, TASKS, [5], 0.0, cfg).double()


def _tower(heads, t, h):
    return _mlp(heads.towers.heads[t], h)


def test_mmoe_equals_its_equation():
    heads = _heads("mmoe", experts=3)
    assert isinstance(heads, MMoEHeads)
    z = torch.randn(7, 10, dtype=torch.float64)
    got = heads(z)
    for b in range(7):
        f = [_mlp(e, z[b]) for e in heads.experts]
        for t in range(len(TASKS)):
            g = _softmax(heads.gates[t](z[b]))
            h = sum(g[e] * f[e] for e in range(3))
            assert torch.allclose(got[b, t], _tower(heads, t, h)[0], atol=1e-12)


def test_ple_equals_its_equations_over_two_levels():
    heads = _heads("ple", task_experts=2, shared_experts=1, levels=2)
    assert isinstance(heads, PLEHeads)
    z = torch.randn(5, 10, dtype=torch.float64)
    got = heads(z)
    n = len(TASKS)
    for b in range(5):
        xs, shared = [z[b]] * n, z[b]
        for lv in heads.levels:
            task_out = [[_mlp(e, xs[t]) for e in lv.task_experts[t]] for t in range(n)]
            shared_out = [_mlp(e, shared) for e in lv.shared_experts]
            ys = []
            for t in range(n):
                g = _softmax(lv.task_gates[t](xs[t]))
                cands = task_out[t] + shared_out
                ys.append(sum(g[i] * cands[i] for i in range(len(cands))))
            if lv.shared_gate is not None:
                g = _softmax(lv.shared_gate(shared))
                cands = [o for outs in task_out for o in outs] + shared_out
                shared = sum(g[i] * cands[i] for i in range(len(cands)))
            xs = ys
        for t in range(n):
            assert torch.allclose(got[b, t], _tower(heads, t, xs[t])[0], atol=1e-12)


def test_one_mmoe_expert_is_a_tower_on_that_expert():
    heads = _heads("mmoe", experts=1)
    z = torch.randn(4, 10, dtype=torch.float64)
    f = _mlp(heads.experts[0], z)
    want = torch.cat([_tower(heads, t, f) for t in range(len(TASKS))], dim=1)
    assert torch.allclose(heads(z), want, atol=1e-12)


def test_cgc_without_task_experts_is_mmoe():
    ple = _heads("ple", task_experts=0, shared_experts=3, levels=1)
    mmoe = _heads("mmoe", experts=3)
    with torch.no_grad():
        for e_ple, e_mmoe in zip(ple.levels[0].shared_experts, mmoe.experts, strict=True):
            e_mmoe.load_state_dict(e_ple.state_dict())
        for g_ple, g_mmoe in zip(ple.levels[0].task_gates, mmoe.gates, strict=True):
            g_mmoe.load_state_dict(g_ple.state_dict())
        mmoe.towers.load_state_dict(ple.towers.state_dict())
    z = torch.randn(6, 10, dtype=torch.float64)
    assert torch.allclose(ple(z), mmoe(z), atol=1e-12)


def test_separate_is_the_plain_task_heads():
    assert isinstance(_heads("separate"), TaskHeads)


@pytest.mark.parametrize(
    "heads",
    [
        {"type": "separate"},
        {"type": "mmoe", "experts": 3},
        {"type": "ple", "task_experts": 1, "shared_experts": 2, "levels": 2},
    ],
)
@pytest.mark.parametrize("arch", ["rankmixer", "tokenmixer_large"])
def test_every_head_type_trains_and_lowers(heads, arch):
    """A few steps on a 3-task batch lower the loss; the lowered model (fp32) gives the trained
    model's logits."""
    schema = toy_schema(num_tasks=3)
    torch.manual_seed(0)
    cfg = {"arch": arch, "dim": 16, "num_layers": 1, "head_hidden": [8], "heads": heads}
    if arch == "rankmixer":
        cfg["num_tokens"] = 4
    model = build_model(ModelConfig.from_dict(cfg), schema)
    batch = random_batch(schema, 64, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out.logits.shape == (64, 3)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        want = model(batch).logits
        got = optimize_for_inference(model, dtype="fp32")(batch).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "heads, key",
    [
        ({"type": "moe"}, "model.heads.type"),
        ({"type": "ple", "levels": 0}, "model.heads.levels"),
        ({"type": "mmoe", "experts": 0}, "model.heads.experts"),
        ({"type": "mmoe", "expert_hidden": []}, "model.heads.expert_hidden"),
        ({"typo": 1}, "model.heads.typo"),
    ],
)
def test_bad_heads_config_names_the_key(heads, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict({"arch": "rankmixer", "num_tokens": 4, "heads": heads})
    with pytest.raises(ConfigError, match=r"model\.heads"):
        ModelConfig.from_dict({"arch": "dlrm", "heads": {"type": "mmoe"}})


def test_task_weights_weigh_each_task_bce():
    """``train.task_weights``: the loss is ``sum_t w_t BCE_t / n_tasks`` (by hand here); all-1
    weights give the unweighted mean; unknown tasks and negative weights are refused."""
    from ranking.model.output import RankerOutput
    from ranking.train.config import load_experiment
    from ranking.train.loss import training_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(9, 3), torch.randint(0, 2, (9, 3)).float()
    out = RankerOutput(logits, None)
    w = torch.tensor([2.0, 0.0, 0.5])
    loss, bce = training_loss(out, labels, [], 0.0, w)
    by_hand = []
    for t in range(3):
        p = torch.sigmoid(logits[:, t])
        y = labels[:, t]
        by_hand.append(float(-(y * p.log() + (1 - y) * (1 - p).log()).mean()))
    assert loss.item() == pytest.approx(sum(wt * b for wt, b in zip(w.tolist(), by_hand)) / 3)
    assert bce.item() == pytest.approx(sum(by_hand) / 3)
    plain, _ = training_loss(out, labels, [], 0.0, None)
    ones, _ = training_loss(out, labels, [], 0.0, torch.ones(3))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    base = {
        "schema": "movielens",
        "model": {"arch": "rankmixer", "num_tokens": 4},
        "data": {"train": "x"},
    }
    for weights, msg in (({"nope": 1.0}, "no such task"), ({"like": -1}, "weight >= 0")):
        with pytest.raises(ConfigError, match=msg):
            load_experiment({**base, "train": {"task_weights": weights}}, require_data=False)
