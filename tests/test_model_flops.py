"""Analytic FLOP and parameter counts against torch's FlopCounterMode and the built modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ranking.model.config import ModelConfig
from ranking.model.flops import dense_params, embedding_params, forward_flops
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema

CONFIGS = {
    "rankmixer_slices": {"arch": "rankmixer", "dim": 32, "num_tokens": 4, "head_hidden": [16]},
    "rankmixer_groups": {
        "arch": "rankmixer",
        "dim": 40,
        "tokenizer": "groups",
        "global_token": True,
    },
    "rankmixer_moe_all_on": {
        "arch": "rankmixer",
        "dim": 32,
        "num_tokens": 4,
        "moe": {"enabled": True},
    },
    "tokenmixer_large": {
        "arch": "tokenmixer_large",
        "dim": 32,
        "num_heads": 8,
        "num_layers": 3,
        "token_proj": "mlp",
        "global_token": True,
        "pooling": "flatten",
    },
    "tokenmixer_large_moe": {
        "arch": "tokenmixer_large",
        "dim": 32,
        "num_heads": 4,
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2},
    },
    "unimixer": {"arch": "unimixer", "dim": 32, "unimixer": {"block_size": 16}},
    "unimixer_lite": {
        "arch": "unimixer_lite",
        "dim": 32,
        "unimixer": {"block_size": 8, "lite_rank": 4},
    },
    "dlrm": {"arch": "dlrm", "dlrm": {"dense_arch": [32], "over_arch": [64, 32]}},
    "dcnv2": {
        "arch": "dcnv2",
        "dlrm": {"dense_arch": [32], "over_arch": [64], "dcn_layers": 2, "dcn_rank": 8},
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_and_params_match_counters(name):
    schema = toy_schema(num_tasks=2)
    cfg = ModelConfig.from_dict(CONFIGS[name])
    torch.manual_seed(0)
    model = build_model(cfg, schema).eval()
    moe_active = None
    if name == "rankmixer_moe_all_on":  # open every ReLU gate: E active experts per token
        for blk in model.blocks.blocks:
            blk.ffn.router_infer_bias.data.fill_(10.0)
        moe_active = cfg.moe.num_experts
    B = 128
    batch = random_batch(schema, B)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    measured = counter.get_total_flops() / B
    analytic = forward_flops(cfg, schema, moe_active=moe_active, batch_size=B)
    assert measured > 0
    assert abs(analytic - measured) <= 0.05 * measured, (analytic, measured)
    n = sum(p.numel() for p in model.parameters()) - embedding_params(schema)
    assert n == dense_params(cfg, schema)


def test_flops_scale_as_published():
    # RankMixer's PFFN dominates: ~4 k T D^2 per layer; doubling D quadruples the FLOPs.
    schema = toy_schema()
    a = ModelConfig.from_dict({"arch": "rankmixer", "dim": 256, "num_tokens": 16})
    b = ModelConfig.from_dict({"arch": "rankmixer", "dim": 512, "num_tokens": 16})
    ratio = forward_flops(b, schema) / forward_flops(a, schema)
    assert 3.8 < ratio < 4.05
    assert forward_flops(a, schema) == pytest.approx(2 * 4 * 4 * 16 * 256**2, rel=0.05)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("dlrm", "dcnv2")])
def test_stack_flops_match_counter(name):
    """``stack_flops`` (what ``bench stack`` divides by) against FlopCounterMode on the stack
    alone, built without the tokenizer by ``blocks.build_stack``."""
    from ranking.model.blocks import build_stack
    from ranking.model.flops import stack_flops, token_layout

    schema = toy_schema(num_tasks=2)
    cfg = ModelConfig.from_dict(CONFIGS[name])
    T = token_layout(cfg, schema).num_tokens
    cfg.resolve(T)
    torch.manual_seed(0)
    stack = build_stack(cfg, T).eval()
    moe_active = None
    if name == "rankmixer_moe_all_on":
        for blk in stack.blocks:
            blk.ffn.router_infer_bias.data.fill_(10.0)
        moe_active = cfg.moe.num_experts
    B = 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        stack(torch.randn(B, T, cfg.dim))
    measured = counter.get_total_flops() / B
    analytic = stack_flops(cfg, schema, moe_active=moe_active, batch_size=B)
    assert measured > 0
    assert abs(analytic - measured) <= 0.05 * measured, (analytic, measured)
    assert analytic < forward_flops(cfg, schema, moe_active=moe_active, batch_size=B)
