"""Blocks against their equations, and whole models: gradients reach every parameter, a seed
fixes the output. The lowered (inference) implementations: tests/test_inference.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranking.lowered import TokenMajorRankMixer, TokenMajorTokenMixerLarge
from ranking.model.blocks import (
    RankMixerBlock,
    TokenMixerLargeBlock,
    TokenMixerLargeStack,
    UniMixerBlock,
)
from ranking.model.config import ModelConfig
from ranking.model.mixing import UniMixing
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema


def head_mix(x, H):
    """The tensor form from the paper: X.view(B,T,H,D/H).transpose(1,2).reshape(B,H,T*D/H)."""
    B, T, D = x.shape
    return x.view(B, T, H, D // H).transpose(1, 2).reshape(B, H, T * D // H)


def head_revert(y, T):
    B, H, W = y.shape
    return y.view(B, H, T, W // T).transpose(1, 2).reshape(B, T, H * W // T)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rankmixer_block_equations():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"arch": "rankmixer", "dim": 16, "num_tokens": 4})
    blk = RankMixerBlock(4, 16, cfg)
    with torch.no_grad():
        for p in (blk.norm1.weight, blk.norm1.bias, blk.norm2.weight, blk.norm2.bias):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 4, 16)
    s = F.layer_norm(head_mix(x, 4) + x, (16,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    f = blk.ffn.ffn
    pffn = torch.stack(
        [F.gelu(s[:, t] @ f.w1[t] + f.b1[t]) @ f.w2[t] + f.b2[t] for t in range(4)], 1
    )
    ref = F.layer_norm(pffn + s, (16,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    y, _aux = blk(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # the inference lowering (token-major [T, B, D], ranking/lowered.py) against the same equations
    with torch.no_grad():
        yt = TokenMajorRankMixer(blk, torch.float32, torch.device("cpu"))(
            x.transpose(0, 1).contiguous()
        )
    torch.testing.assert_close(yt.transpose(0, 1), ref, atol=1e-5, rtol=1e-5)


def swiglu_ref(m, x):
    Hd = m.hidden
    outs = []
    for t in range(x.shape[1]):
        g, u = m.w_gate_up[t, :, :Hd], m.w_gate_up[t, :, Hd:]
        outs.append((F.silu(x[:, t] @ g) * (x[:, t] @ u)) @ m.w_down[t])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("second_residual", ["input", "reverted"])
@pytest.mark.parametrize(("T", "D", "H"), [(4, 16, 4), (4, 16, 8), (3, 12, 2)])
def test_tokenmixer_large_block_equations(second_residual, T, D, H):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {
            "arch": "tokenmixer_large",
            "dim": D,
            "num_heads": H,
            "tokenmixer_large": {"second_residual": second_residual},
            "down_init_scale": 1.0,
        }
    )
    blk = TokenMixerLargeBlock(T, D, H, cfg)
    with torch.no_grad():
        blk.norm1.weight.add_(torch.randn_like(blk.norm1.weight) * 0.3)
        blk.norm2.weight.add_(torch.randn_like(blk.norm2.weight) * 0.3)
    assert all(p.dim() != 1 or "norm" in n for n, p in blk.named_parameters())  # bias-free
    x = torch.randn(2, T, D)
    hm = head_mix(x, H)
    h = hm + swiglu_ref(blk.f1.ffn, rms(hm, blk.norm1.weight))
    r = head_revert(h, T)
    base = x if second_residual == "input" else r
    ref = base + swiglu_ref(blk.f2.ffn, rms(r, blk.norm2.weight))
    y, _ = blk(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lowered = TokenMajorTokenMixerLarge(blk, torch.float32, torch.device("cpu"))
        yt = lowered(x.transpose(0, 1).contiguous())
    torch.testing.assert_close(yt.transpose(0, 1), ref, atol=1e-5, rtol=1e-5)


def test_interlayer_residual_every_two_not_after_last():
    class Add(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return x + self.c, x.new_zeros(())

    x = torch.zeros(1, 1, 1)
    out = TokenMixerLargeStack([Add(1.0), Add(1.0), Add(1.0), Add(1.0)], every=2)(x)
    # l1: 1, l2: 2 (+x0=0) -> 2, l3: 3, l4: 4 (last: no extra residual)
    assert float(out.x) == 4.0
    out = TokenMixerLargeStack([Add(1.0)] * 3, every=2)(torch.full((1, 1, 1), 5.0))
    # l1: 6, l2: 7 + 5 = 12, l3: 13
    assert float(out.x) == 13.0 and [float(h) for h in out.hidden] == [6.0, 12.0]


def test_unimixer_block_siamese_equations():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {"arch": "unimixer", "dim": 8, "unimixer": {"block_size": 4}, "down_init_scale": 1.0}
    )
    mixing = UniMixing(3, 8, 4, iters=5)
    blk = UniMixerBlock(3, 8, mixing, cfg)
    xb, yb = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    o = mixing(xb + rms(yb, blk.y_norm1.weight))
    xb2, yb2 = rms(xb + o, blk.x_norm1.weight), yb + o
    o2 = swiglu_ref(blk.ffn.ffn, xb2 + rms(yb2, blk.y_norm2.weight))
    ref_x, ref_y = rms(xb2 + o2, blk.x_norm2.weight), yb2 + o2
    x_out, y_out, _ = blk(xb, yb)
    torch.testing.assert_close(x_out, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_out, ref_y, atol=1e-5, rtol=1e-5)


SMALL = {
    "rankmixer": {"arch": "rankmixer", "dim": 16, "num_tokens": 4},
    "rankmixer_moe": {
        "arch": "rankmixer",
        "dim": 16,
        "num_tokens": 4,
        "moe": {"enabled": True, "l1_weight": 0.01},
    },
    "tokenmixer_large": {
        "arch": "tokenmixer_large",
        "dim": 16,
        "num_heads": 8,
        "num_layers": 3,
        "global_token": True,
        "tokenmixer_large": {"aux_loss_weight": 0.1},
        "token_proj": "mlp",
    },
    "tokenmixer_large_moe": {
        "arch": "tokenmixer_large",
        "dim": 16,
        "num_layers": 2,
        "moe": {"enabled": True},
    },
    "unimixer": {"arch": "unimixer", "dim": 16, "unimixer": {"block_size": 8}},
    "unimixer_lite": {
        "arch": "unimixer_lite",
        "dim": 16,
        "unimixer": {"block_size": 8, "flatten": "token_major"},
    },
    "dlrm": {"arch": "dlrm", "dlrm": {"dense_arch": [16], "over_arch": [32]}},
    "dcnv2": {"arch": "dcnv2", "dlrm": {"dense_arch": [16], "over_arch": [32], "dcn_rank": 8}},
}


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    schema = toy_schema(num_tasks=2)
    model = build_model(ModelConfig.from_dict(SMALL[name]), schema).train()
    batch = random_batch(schema, 64, seed=1)
    out = model(batch)
    assert out.logits.shape == (64, 2) and out.aux_loss.dim() == 0
    loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + out.aux_loss
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", ["rankmixer", "tokenmixer_large", "unimixer_lite", "dcnv2"])
def test_seed_fixes_the_output(name):
    schema = toy_schema()
    batch = random_batch(schema, 32)

    def run(seed):
        torch.manual_seed(seed)
        return build_model(ModelConfig.from_dict(SMALL[name]), schema).eval()(batch).logits

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
