"""Mixer blocks and the stacks that chain them: RankMixer, TokenMixer-Large, UniMixer.

Every stack maps tokens ``[B, T, D]`` to ``StackOutput(x [B, T, D], aux scalar, hidden)``;
``hidden`` holds the outputs of the lower layers (for TokenMixer-Large's auxiliary loss).

Each block has one ``forward``, the papers' equations over ``[B, T, D]``; it is what training
runs. How a block is executed at inference (token-major layout, compiled epilogues, the
``kernels.cpu`` AMX ops, bf16 weights) is chosen by ``ranking.inference.optimize_for_inference``,
which swaps blocks for the fast implementations in ``ranking.lowered``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

import kernels

from .ffn import make_ffn
from .mixing import TokenMixing, UniMixing, UniMixingLite


class StackOutput(NamedTuple):
    x: Tensor
    aux: Tensor
    hidden: list[Tensor]


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-5) if kind == "layer" else nn.RMSNorm(dim, eps=1e-6)


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else 1e-6


class RankMixerBlock(nn.Module):
    """RankMixer block (post-LN): ``S = LN(TokenMixing(X) + X)``, ``X' = LN(PFFN(S) + S)``.

    ``[B, T, D] -> ([B, T, D], aux)``; TokenMixing uses H = T heads. The first add-and-norm is
    the fused ``kernels.mix_norm``.
    """

    def __init__(self, num_tokens: int, dim: int, cfg):
        super().__init__()
        self.num_tokens = num_tokens
        self.mixing = TokenMixing(num_tokens)
        self.norm1 = _norm(cfg.norm, dim)
        self.ffn = make_ffn(num_tokens, dim, cfg.ffn_mult, cfg, swiglu=False)
        self.norm2 = _norm(cfg.norm, dim)
        self.norm_kind = cfg.norm

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, s = kernels.mix_norm(
            x,
            self.num_tokens,
            self.norm1.weight,
            getattr(self.norm1, "bias", None),
            residual=x,
            norm=self.norm_kind,
            eps=_eps(self.norm1),
        )
        f, aux = self.ffn(s)
        return self.norm2(f + s), aux


class TokenMixerLargeBlock(nn.Module):
    """TokenMixer-Large block (pre-RMSNorm, bias-free):

    ``Hm = Mix(X)`` (``[B, H, T*D/H]``); ``H' = Hm + F1(RMSNorm(Hm))``;
    ``X_next = R + F2(RMSNorm(Revert(H')))`` with ``R = X`` (``second_residual: input``) or
    ``R = Revert(H')`` (``reverted``). F1 and F2 are per-token pSwiGLU (or the sparse MoE),
    F1 over the H mixed tokens, F2 over the T original tokens.
    """

    def __init__(self, num_tokens: int, dim: int, num_heads: int, cfg):
        super().__init__()
        T, D, H = num_tokens, dim, num_heads
        W = T * D // H
        self.num_tokens, self.num_heads = T, H
        self.second_residual = cfg.tokenmixer_large.second_residual
        self.norm1 = nn.RMSNorm(W, eps=1e-6)
        self.f1 = make_ffn(H, W, cfg.ffn_mult, cfg, swiglu=True)
        self.norm2 = nn.RMSNorm(D, eps=1e-6)
        self.f2 = make_ffn(T, D, cfg.ffn_mult, cfg, swiglu=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hm, hn = kernels.mix_norm(x, self.num_heads, self.norm1.weight, norm="rms", eps=1e-6)
        f1, aux1 = self.f1(hn)
        h = hm + f1
        r, rn = kernels.mix_norm(
            h, self.num_tokens, self.norm2.weight, revert=True, norm="rms", eps=1e-6
        )
        f2, aux2 = self.f2(rn)
        base = x if self.second_residual == "input" else r
        return base + f2, aux1 + aux2


class UniMixerBlock(nn.Module):
    """UniMixer block with SiameseNorm: two streams (Xbar post-norm, Ybar pre-norm).

    Two sub-layers, each ``O = Sub(Xbar + RMSNorm(Ybar))``, ``Xbar <- RMSNorm(Xbar + O)``,
    ``Ybar <- Ybar + O``; Sub is UniMixing(-Lite), then the per-token SwiGLU.
    ``(Xbar [B, T, D], Ybar [B, T, D]) -> (Xbar, Ybar, aux)``.
    """

    def __init__(self, num_tokens: int, dim: int, mixing: nn.Module, cfg):
        super().__init__()
        self.mixing = mixing
        self.ffn = make_ffn(num_tokens, dim, cfg.ffn_mult, cfg, swiglu=True)
        self.y_norm1, self.x_norm1 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.y_norm2, self.x_norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, xbar: Tensor, ybar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        o = self.mixing(xbar + self.y_norm1(ybar))
        xbar, ybar = self.x_norm1(xbar + o), ybar + o
        o, aux = self.ffn(xbar + self.y_norm2(ybar))
        return self.x_norm2(xbar + o), ybar + o, aux


class RankMixerStack(nn.Module):
    """L RankMixer blocks in sequence: ``[B, T, D] -> StackOutput``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        hidden = []
        for blk in self.blocks:
            x, a = blk(x)
            aux = aux + a
            hidden.append(x)
        return StackOutput(x, aux, hidden[:-1])


class TokenMixerLargeStack(RankMixerStack):
    """TokenMixer-Large blocks with an extra residual every ``every`` layers (never after the
    last): after layer l (1-based) with ``l % every == 0 and l < L``, ``x <- x + x_{l-every}``."""

    def __init__(self, blocks: list[nn.Module], every: int):
        super().__init__(blocks)
        self.every = every

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        hidden, anchor, L = [], x, len(self.blocks)
        for i, blk in enumerate(self.blocks, start=1):
            x, a = blk(x)
            aux = aux + a
            if self.every and i % self.every == 0 and i < L:
                x = x + anchor
                anchor = x
            hidden.append(x)
        return StackOutput(x, aux, hidden[:-1])


class UniMixerStack(nn.Module):
    """UniMixer blocks on SiameseNorm streams: ``Xbar = Ybar = X``, then the blocks, then the
    output ``Xbar + RMSNorm(Ybar)``: ``[B, T, D] -> StackOutput``."""

    def __init__(self, blocks: list[nn.Module], dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        xbar, ybar, hidden = x, x, []
        for blk in self.blocks:
            xbar, ybar, a = blk(xbar, ybar)
            aux = aux + a
            hidden.append(xbar + self.out_norm(ybar))
        return StackOutput(hidden[-1], aux, hidden[:-1])


def build_stack(c, num_tokens: int) -> nn.Module:
    """The mixer stack of a resolved ``ModelConfig`` (``c.resolve(T)`` done) over ``T`` tokens."""
    T, D = num_tokens, c.dim
    if c.arch == "rankmixer":
        return RankMixerStack([RankMixerBlock(T, D, c) for _ in range(c.num_layers)])
    if c.arch == "tokenmixer_large":
        H = c.num_heads or T
        return TokenMixerLargeStack(
            [TokenMixerLargeBlock(T, D, H, c) for _ in range(c.num_layers)],
            c.tokenmixer_large.interlayer_residual_every,
        )
    if c.arch not in ("unimixer", "unimixer_lite"):
        raise ValueError(f"model.arch={c.arch!r} has no mixer stack")
    u = c.unimixer
    Bk = u.block_size or D

    def mixing():
        if c.arch == "unimixer":
            return UniMixing(T, D, Bk, u.sinkhorn_iters, u.flatten)
        return UniMixingLite(T, D, Bk, u.sinkhorn_iters, u.flatten, u.lite_bases, u.lite_rank)

    return UniMixerStack([UniMixerBlock(T, D, mixing(), c) for _ in range(c.num_layers)], D)
