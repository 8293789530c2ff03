"""Analytic parameter and FLOP counts of the dense part (everything but the embedding tables).

``dense_params(config, schema)``: trainable parameters outside the EmbeddingBagCollection.
``forward_flops(config, schema)``: forward FLOPs per sample (eval mode) of the matmuls
(2 m n k per GEMM), the quantity ``torch.utils.flop_counter.FlopCounterMode`` counts; norms,
activations, Sinkhorn and pooling are not GEMMs and are left out. Mirrors ``build_model``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ranking.features import FeatureSchema

from .config import ModelConfig


@dataclass(frozen=True)
class TokenLayout:
    """What the tokenizer produces: T tokens, and the widths it projects from."""

    num_tokens: int
    group_widths: tuple[int, ...]
    emb_width: int
    num_dense: int
    dense_token: bool
    global_token: bool
    num_slices: int = 0
    slice_width: int = 0


def token_layout(c: ModelConfig, schema: FeatureSchema) -> TokenLayout:
    widths = tuple(
        sum(f.dim for f in schema.features_in_group(g) if f.is_sparse)
        for g in schema.groups
        if any(f.is_sparse for f in schema.features_in_group(g))
    )
    E, Nd = sum(widths), schema.num_dense
    dense_token = c.dense_token and Nd > 0
    extras = int(dense_token) + int(c.global_token)
    if c.tokenizer == "groups":
        return TokenLayout(len(widths) + extras, widths, E, Nd, dense_token, c.global_token)
    S = c.num_tokens - extras
    return TokenLayout(
        c.num_tokens, widths, E, Nd, dense_token, c.global_token, S, math.ceil(E / S)
    )


def _mlp(d_in: int, d_hid: int, d_out: int) -> tuple[int, int]:
    """(params, flops) of Linear -> ReLU -> Linear."""
    return d_in * d_hid + d_hid + d_hid * d_out + d_out, 2 * (d_in * d_hid + d_hid * d_out)


def _chain(sizes: list[int]) -> tuple[int, int]:
    """(params, flops) of Linear layers ``sizes[0] -> sizes[1] -> ...`` with biases."""
    p = sum(a * b + b for a, b in itertools.pairwise(sizes))
    return p, sum(2 * a * b for a, b in itertools.pairwise(sizes))


def _tokenizer(c: ModelConfig, lay: TokenLayout) -> tuple[int, int]:
    D, p, f = c.dim, 0, 0
    if c.tokenizer == "groups":
        for w in lay.group_widths:
            dp, df = (w * D + D, 2 * w * D) if c.token_proj == "linear" else _mlp(w, D, D)
            p, f = p + dp, f + df
    else:
        p += lay.num_slices * (lay.slice_width * D + D)
        f += 2 * lay.num_slices * lay.slice_width * D
    for on, d_in in ((lay.dense_token, lay.num_dense), (lay.global_token, lay.emb_width)):
        if on:
            dp, df = _mlp(d_in, D, D)
            p, f = p + dp, f + df
    return p, f


def _stage(
    c: ModelConfig, T: int, W: int, swiglu: bool, moe_active: float | None
) -> tuple[int, int]:
    """(params, flops/sample) of one per-token stage over T tokens of width W."""
    m = c.moe
    if not m.enabled:
        h = int(c.ffn_mult * W)
        if swiglu:
            return 3 * T * W * h, 6 * T * W * h
        return T * (2 * W * h + h + W), 4 * T * W * h
    E, Hd = m.num_experts, int(m.expert_mult * W)
    G = T * E
    if m.kind == "rankmixer":
        routers = 2 if m.dtsi else 1
        p = G * (2 * W * Hd + Hd + W) + routers * T * (W * E + E)
        active = E / 2 if moe_active is None else moe_active
        return p, 2 * T * W * E + T * active * 4 * W * Hd
    shared = int(m.shared_expert)
    p = G * 3 * W * Hd + T * W * E + shared * 3 * T * W * Hd
    return p, 2 * T * W * E + T * (m.top_k + shared) * 6 * W * Hd


def _mixer_counts(
    c: ModelConfig, schema: FeatureSchema, moe_active: float | None, batch_size: int | None
) -> tuple[int, float]:
    lay = token_layout(c, schema)
    T, D = lay.num_tokens, c.dim
    p, f = _tokenizer(c, lay)
    norm = 2 * D if c.norm == "layer" else D
    for _ in range(c.num_layers):
        if c.arch == "rankmixer":
            sp, sf = _stage(c, T, D, False, moe_active)
            p, f = p + sp + 2 * norm, f + sf
        elif c.arch == "tokenmixer_large":
            H = c.num_heads or T
            W = T * D // H
            p1, f1 = _stage(c, H, W, True, moe_active)
            p2, f2 = _stage(c, T, D, True, moe_active)
            p, f = p + p1 + p2 + W + D, f + f1 + f2
        else:
            Bk = c.unimixer.block_size or D
            n = T * D // Bk
            if c.arch == "unimixer":
                mp, per_batch = n * Bk * Bk + n * n, 0
            else:
                b, r = c.unimixer.lite_bases, c.unimixer.lite_rank
                mp = b * Bk * Bk + n * b + 2 * n * r
                per_batch = 2 * n * b * Bk * Bk + 2 * n * r * n
            sp, sf = _stage(c, T, D, True, moe_active)
            p += mp + sp + 4 * D
            f += 2 * n * Bk * Bk + 2 * n * n * Bk + sf
            if batch_size:
                f += per_batch / batch_size
    if c.arch in ("unimixer", "unimixer_lite"):
        p += D
    pooled = T * D if c.pooling == "flatten" else D
    hp, hf = _chain([pooled, *c.head_hidden, 1])
    n_tasks = len(schema.tasks)
    return p + n_tasks * hp, f + n_tasks * hf


def _baseline_counts(c: ModelConfig, schema: FeatureSchema) -> tuple[int, float]:
    D = schema.tables[0].dim
    F = len(schema.sparse_features)
    Nd = max(schema.num_dense, 1)
    dp, df = _chain([Nd, *c.dlrm.dense_arch, D])
    n_tasks = len(schema.tasks)
    if c.arch == "dlrm":
        over_in = D + F * (F + 1) // 2
        ip, inf = 0, 2 * (F + 1) * (F + 1) * D
    else:
        d_in = (F + 1) * D
        r = c.dlrm.dcn_rank
        over_in = d_in
        ip = c.dlrm.dcn_layers * (d_in * r + r * d_in + d_in)
        inf = c.dlrm.dcn_layers * 4 * d_in * r
    op, of = _chain([over_in, *c.dlrm.over_arch, n_tasks])
    return dp + ip + op, df + inf + of


def dense_params(c: ModelConfig, schema: FeatureSchema) -> int:
    """Trainable parameters outside the embedding tables."""
    if c.arch in ("dlrm", "dcnv2"):
        return _baseline_counts(c, schema)[0]
    return _mixer_counts(c, schema, None, None)[0]


def forward_flops(
    c: ModelConfig,
    schema: FeatureSchema,
    moe_active: float | None = None,
    batch_size: int | None = None,
) -> float:
    """Forward GEMM FLOPs per sample of the dense part (eval mode).

    moe_active: active experts per token of a RankMixer ReLU-gated MoE (data dependent;
        default E/2). batch_size: adds per-batch costs (UniMixing-Lite's matrix synthesis)
        divided by it.
    """
    if c.arch in ("dlrm", "dcnv2"):
        return float(_baseline_counts(c, schema)[1])
    return float(_mixer_counts(c, schema, moe_active, batch_size)[1])


def embedding_params(schema: FeatureSchema) -> int:
    return sum(t.num_buckets * t.dim for t in schema.tables)


def stack_flops(
    c: ModelConfig,
    schema: FeatureSchema,
    moe_active: float | None = None,
    batch_size: int | None = None,
) -> float:
    """Forward GEMM FLOPs per sample of the mixer stack alone (no tokenizer, no task heads)."""
    if c.arch in ("dlrm", "dcnv2"):
        raise ValueError(f"model.arch={c.arch!r} has no mixer stack")
    total = _mixer_counts(c, schema, moe_active, batch_size)[1]
    tok = _tokenizer(c, token_layout(c, schema))[1]
    pooled = c.dim * token_layout(c, schema).num_tokens if c.pooling == "flatten" else c.dim
    heads = len(schema.tasks) * _chain([pooled, *c.head_hidden, 1])[1]
    return float(total - tok - heads)
