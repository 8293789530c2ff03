"""Weighted MoE combine (``moe_unpermute``) in Triton, with autograd.

Two kernels, each the other's backward:

- combine: ``out[n] = sum_j w[n, j] * src[slot_of[n, j]]`` (skip -1), fp32 accumulation;
  a gather over slots, no atomics.
- scatter: ``dst[slot_of[n, j]] = w[n, j] * g[n]`` and optionally
  ``dw[n, j] = <g[n], y[slot_of[n, j]]>``; every valid slot is written exactly once, so no
  atomics either.

``moe_unpermute`` is combine forward / scatter backward; ``moe_permute.moe_gather`` is scatter
(unit weights) forward / combine (unit weights) backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import MoERouting
from ._triton import interpreting, kernel, next_pow2


@kernel
def _combine_kernel(
    SRC,  # [M, D]
    SLOT,  # [N, K] int64, -1 = none
    WTS,  # [N, K] or dummy
    OUT,  # [N, D] out
    N,
    D,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        s = tl.load(SLOT + rows64 * K + j, mask=rmask, other=-1)
        valid = s >= 0
        v = tl.load(
            SRC + s[:, None] * D + cols[None, :],
            mask=valid[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_W:
            w = tl.load(WTS + rows64 * K + j, mask=rmask & valid, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    out = rows64[:, None] * D + cols[None, :]
    tl.store(OUT + out, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@kernel
def _scatter_kernel(
    G,  # [N, D] rows to scatter
    SLOT,  # [N, K]
    WTS,  # [N, K] or dummy
    Y,  # [M, D] (for DW) or dummy
    DST,  # [M, D] out
    DW,  # [N, K] out or dummy
    N,
    D,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    kcols = tl.arange(0, BLOCK_K)
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(
            G + rows64[:, None] * D + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        for j in tl.static_range(K):
            s = tl.load(SLOT + rows64 * K + j, mask=rmask, other=-1)
            valid = s >= 0
            m2 = valid[:, None] & cmask[None, :]
            v = g
            if HAS_W:
                w = tl.load(WTS + rows64 * K + j, mask=rmask & valid, other=0.0).to(tl.float32)
                v = g * w[:, None]
            tl.store(DST + s[:, None] * D + cols[None, :], v.to(DST.dtype.element_ty), mask=m2)
            if NEED_DW:
                y = tl.load(Y + s[:, None] * D + cols[None, :], mask=m2, other=0.0)
                part = tl.sum(g * y.to(tl.float32), axis=1)
                dw = tl.where(kcols[None, :] == j, dw + part[:, None], dw)
    if NEED_DW:
        tl.store(
            DW + rows64[:, None] * K + kcols[None, :],
            dw.to(DW.dtype.element_ty),
            mask=rmask[:, None] & (kcols < K)[None, :],
        )


def _blocks(D: int) -> tuple[int, int]:
    BLOCK_D = min(next_pow2(D), 256 if not interpreting() else 4096)
    BLOCK_N = max(1, (16384 if interpreting() else 2048) // BLOCK_D)
    return BLOCK_N, BLOCK_D


def combine(src: Tensor, slot_of: Tensor, weights: Tensor | None, out_dtype=None) -> Tensor:
    """``out [N, D] = sum_j weights[n, j] * src[slot_of[n, j]]`` (weights None: 1)."""
    src = src.contiguous()
    N, K = slot_of.shape
    D = src.shape[1]
    out = torch.empty(N, D, device=src.device, dtype=out_dtype or src.dtype)
    if N == 0 or D == 0:
        return out
    BLOCK_N, BLOCK_D = _blocks(D)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _combine_kernel[grid](
        src,
        slot_of.contiguous(),
        weights.contiguous() if weights is not None else slot_of,
        out,
        N,
        D,
        K=K,
        HAS_W=weights is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    return out


def scatter(
    g: Tensor,
    slot_of: Tensor,
    M: int,
    weights: Tensor | None,
    y: Tensor | None = None,
    out_dtype=None,
) -> tuple[Tensor, Tensor | None]:
    """``dst [M, D]``: ``dst[slot_of[n, j]] = weights[n, j] * g[n]``; with y also
    ``dw [N, K] (fp32) = <g[n], y[slot_of[n, j]]>``. Assumes the valid slots cover ``[0, M)``."""
    g = g.contiguous()
    N, K = slot_of.shape
    D = g.shape[1]
    dst = torch.empty(M, D, device=g.device, dtype=out_dtype or g.dtype)
    dw = torch.zeros(N, K, device=g.device, dtype=torch.float32) if y is not None else None
    if N == 0 or D == 0:
        return dst, dw
    BLOCK_N, BLOCK_D = _blocks(D)
    _scatter_kernel[(triton.cdiv(N, BLOCK_N),)](
        g,
        slot_of.contiguous(),
        weights.contiguous() if weights is not None else slot_of,
        y.contiguous() if y is not None else g,
        dst,
        dw if dw is not None else slot_of,
        N,
        D,
        K=K,
        HAS_W=weights is not None,
        NEED_DW=y is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_K=next_pow2(K),
    )
    return dst, dw


class MoEUnpermuteFunction(torch.autograd.Function):
    """``(y_perm [M, D], slot_of [N, k], weights [N, k]) -> out [N, D]``."""

    @staticmethod
    def forward(ctx, y_perm: Tensor, slot_of: Tensor, weights: Tensor) -> Tensor:
        if weights.shape != slot_of.shape:
            raise ValueError(
                f"moe_unpermute: weights {tuple(weights.shape)} != ids {tuple(slot_of.shape)}"
            )
        ctx.save_for_backward(y_perm, slot_of, weights)
        return combine(y_perm, slot_of, weights)

    @staticmethod
    def backward(ctx, dout: Tensor):
        y_perm, slot_of, weights = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[2]
        dy, dw = scatter(dout, slot_of, y_perm.shape[0], weights, y_perm if need_dw else None)
        return dy, None, dw.to(weights.dtype) if dw is not None else None


def moe_unpermute(y_perm: Tensor, routing: MoERouting, weights: Tensor) -> Tensor:
    """Triton ``moe_unpermute``: ``out[n] = sum_j weights[n, j] * y_perm[slot_of[n, j]]``."""
    return MoEUnpermuteFunction.apply(y_perm, routing.slot_of, weights)
