"""``model.head_dropout`` and ``model.token_dropout``: validated by key, identity in eval, and in
training the exact inverted-dropout formula (kept values scaled by 1 / (1 - p), each kept with
probability 1 - p), checked by decoding the masks from the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranking.model.config import ConfigError, ModelConfig
from ranking.model.ranker import TaskHeads, build_model
from ranking.model.synthetic import random_batch, toy_schema


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"arch": "rankmixer", "num_tokens": 4, "head_dropout": 1.0}, "model.head_dropout"),
        ({"arch": "rankmixer", "num_tokens": 4, "head_dropout": -0.1}, "model.head_dropout"),
        ({"arch": "rankmixer", "num_tokens": 4, "token_dropout": 1.5}, "model.token_dropout"),
        ({"arch": "rankmixer", "num_tokens": 4, "token_dropout": "a"}, "model.token_dropout"),
        ({"arch": "dlrm", "head_dropout": 0.1}, "model.head_dropout"),
        ({"arch": "dcnv2", "token_dropout": 0.1}, "model.token_dropout"),
    ],
)
def test_bad_dropout_names_the_key(model, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict(model, source="cfg.yaml")


def _decode(y: torch.Tensor, scale: float, nbits: int) -> torch.Tensor:
    """Outputs ``scale * sum_j 2^j m_j`` -> the 0/1 masks ``m [B, nbits]`` (asserts exactness)."""
    code = y.squeeze(1) * scale
    assert torch.allclose(code, code.round(), atol=1e-4), "output is not a masked sum"
    code = code.round().long()
    assert int(code.min()) >= 0 and int(code.max()) < 2**nbits
    return torch.stack([(code >> j) & 1 for j in range(nbits)], dim=1).float()


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_linear_head_dropout_is_inverted_dropout_of_the_input(p):
    torch.manual_seed(0)
    heads = TaskHeads(4, ["click"], hidden=[], dropout=p)
    lin = heads.heads[0][0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
        lin.bias.zero_()
    z = torch.ones(20000, 4)
    heads.eval()
    assert torch.equal(heads(z), torch.full((20000, 1), 15.0))  # eval: no dropout
    heads.train()
    m = _decode(heads(z), 1 - p, 4)  # y = sum_j w_j z_j m_j / (1 - p)
    keep = m.mean(0)
    assert torch.allclose(keep, torch.full((4,), 1 - p), atol=0.02), keep


def test_hidden_head_dropout_drops_after_each_relu():
    # input dropout and post-ReLU dropout compose: y = sum_j w_j m1_j m2_j / (1 - p)^2
    p = 0.5
    torch.manual_seed(1)
    heads = TaskHeads(4, ["click"], hidden=[4], dropout=p)
    first, relu, last = heads.heads[0]
    assert isinstance(relu, nn.ReLU)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
        last.bias.zero_()
    heads.train()
    m = _decode(heads(torch.ones(40000, 4)), (1 - p) ** 2, 4)
    keep = m.mean(0)
    assert torch.allclose(keep, torch.full((4,), (1 - p) ** 2), atol=0.02), keep


def _pair(**drop):
    schema = toy_schema()
    base = {
        "arch": "rankmixer",
        "tokenizer": "slices",
        "num_tokens": 4,
        "dim": 16,
        "num_layers": 1,
        "pooling": "flatten",
        "head_hidden": [8],
    }
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_dict(base), schema)
    torch.manual_seed(0)
    dropped = build_model(ModelConfig.from_dict({**base, **drop}), schema)
    return schema, plain, dropped


def test_dropout_adds_no_parameters_and_eval_equals_no_dropout():
    schema, plain, dropped = _pair(head_dropout=0.3, token_dropout=0.2)
    sd_plain, sd_drop = plain.state_dict(), dropped.state_dict()
    assert list(sd_plain) == list(sd_drop)  # checkpoints and artifacts keep their keys
    for k in sd_plain:
        assert torch.equal(sd_plain[k], sd_drop[k]), k
    batch = random_batch(schema, 64)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, dropped(batch).logits)
        dropped.train()
        assert not torch.allclose(plain(batch).logits, dropped(batch).logits)


def test_token_dropout_masks_the_stack_input():
    p = 0.5
    schema, _, model = _pair(token_dropout=p)
    seen = {}
    model.blocks.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    batch = random_batch(schema, 256)
    model.train()
    with torch.no_grad():
        model(batch)
        ref = model.tokenizer(batch.dense, batch.sparse)  # deterministic
    x = seen["x"]
    assert x.shape == ref.shape
    kept = x != 0
    # kept values are the tokenizer's scaled by 1 / (1 - p), dropped ones are exactly 0
    torch.testing.assert_close(x[kept], ref[kept] / (1 - p))
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac
