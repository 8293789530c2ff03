"""MoE gates in Triton: top-k softmax gate and RankMixer's ReLU gate, with autograd.

Each program takes BLOCK_N rows of ``logits [N, E]`` (E fits one tile). Top-k is k rounds of
row-max + lowest-index argmax (ties go to the lower expert id), so weights come out in descending
order like ``torch.topk``. All math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import interpreting, kernel, next_pow2


@kernel
def _topk_gate_fwd_kernel(
    L,  # [N, E] logits
    WOUT,  # [N, K] fp32 out
    IDS,  # [N, K] int64 out
    N,
    E,
    K: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    mask = rmask[:, None] & (cols < E)[None, :]
    v = tl.load(L + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=mask, other=-float("inf"))
    v = v.to(tl.float32)
    m = tl.where(rmask, tl.max(v, axis=1), 0.0)  # padding rows: avoid inf - inf
    denom = tl.sum(tl.where(mask, tl.exp(v - m[:, None]), 0.0), axis=1)
    num = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int64)
    work = v
    for j in tl.static_range(K):
        mj = tl.max(work, axis=1)
        idx = tl.min(tl.where(work == mj[:, None], cols[None, :], BLOCK_E), axis=1)
        num = tl.where(kcols[None, :] == j, tl.exp(mj - m)[:, None], num)
        ids = tl.where(kcols[None, :] == j, idx.to(tl.int64)[:, None], ids)
        work = tl.where(cols[None, :] == idx[:, None], -float("inf"), work)
    if RENORM:
        denom = tl.sum(num, axis=1)
    denom = tl.where(rmask, denom, 1.0)
    out_mask = rmask[:, None] & (kcols < K)[None, :]
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(WOUT + out, num / denom[:, None], mask=out_mask)
    tl.store(IDS + out, ids, mask=out_mask)


@kernel
def _topk_gate_bwd_kernel(
    L,  # [N, E] logits (for the full softmax when not renormalising)
    W_,  # [N, K] fp32 forward weights
    IDS,  # [N, K]
    DW,  # [N, K] gradient w.r.t. weights
    DL,  # [N, E] out
    N,
    E,
    K: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    mask = rmask[:, None] & (cols < E)[None, :]
    rows64 = rows.to(tl.int64)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sel = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.int1)
    dw_e = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    w_e = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for j in tl.static_range(K):
        wj = tl.load(W_ + rows64 * K + j, mask=rmask, other=0.0)
        dwj = tl.load(DW + rows64 * K + j, mask=rmask, other=0.0).to(tl.float32)
        idj = tl.load(IDS + rows64 * K + j, mask=rmask, other=-1)
        s += wj * dwj
        hit = cols[None, :] == idj[:, None]
        sel = sel | hit
        dw_e = tl.where(hit, dwj[:, None], dw_e)
        w_e = tl.where(hit, wj[:, None], w_e)
    if RENORM:
        dl = tl.where(sel, w_e * (dw_e - s[:, None]), 0.0)
    else:
        v = tl.load(L + rows64[:, None] * E + cols[None, :], mask=mask, other=-float("inf"))
        v = v.to(tl.float32)
        m = tl.where(rmask, tl.max(v, axis=1), 0.0)
        p = tl.where(mask, tl.exp(v - m[:, None]), 0.0)
        p = p / tl.where(rmask, tl.sum(p, axis=1), 1.0)[:, None]
        dl = p * (dw_e - s[:, None])
    tl.store(DL + rows64[:, None] * E + cols[None, :], dl.to(DL.dtype.element_ty), mask=mask)


@kernel
def _relu_gate_fwd_kernel(
    L,  # [N, E]
    G,  # [N, E] out
    IDS,  # [N, E] int64 out
    L1,  # [N] out
    N,
    E,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    mask = rmask[:, None] & (cols < E)[None, :]
    off = rows.to(tl.int64)[:, None] * E + cols[None, :]
    v = tl.load(L + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(v > 0, v, 0.0).to(G.dtype.element_ty)
    tl.store(G + off, g, mask=mask)
    tl.store(IDS + off, tl.where(v > 0, cols[None, :], -1).to(tl.int64), mask=mask)
    tl.store(L1 + rows, tl.sum(g.to(tl.float32), axis=1).to(L1.dtype.element_ty), mask=rmask)


@kernel
def _relu_gate_bwd_kernel(
    L,  # [N, E]
    DG,  # [N, E] or dummy
    DL1,  # [N] or dummy
    DL,  # [N, E] out
    N,
    E,
    HAS_DG: tl.constexpr,
    HAS_DL1: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    mask = rmask[:, None] & (cols < E)[None, :]
    off = rows.to(tl.int64)[:, None] * E + cols[None, :]
    v = tl.load(L + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    if HAS_DG:
        g += tl.load(DG + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_DL1:
        g += tl.load(DL1 + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(DL + off, tl.where(v > 0, g, 0.0).to(DL.dtype.element_ty), mask=mask)


def _row_blocks(N: int, E: int) -> tuple[int, int, tuple[int]]:
    BLOCK_E = next_pow2(E)
    BLOCK_N = max(1, (16384 if interpreting() else 2048) // BLOCK_E)
    return BLOCK_N, BLOCK_E, (triton.cdiv(N, BLOCK_N),)


def _check_logits(logits: Tensor, what: str) -> Tensor:
    if logits.dim() != 2:
        raise ValueError(f"{what}: logits must be [N, E], got {tuple(logits.shape)}")
    return logits.contiguous()


class TopKGateFunction(torch.autograd.Function):
    """``logits [N, E] -> (weights [N, k], ids [N, k])``; ids carry no gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int, renormalize: bool):
        logits = _check_logits(logits, "topk_gate")
        N, E = logits.shape
        if not 0 < k <= E:
            raise ValueError(f"topk_gate: need 0 < k <= E={E}, got k={k}")
        w = torch.empty(N, k, device=logits.device, dtype=torch.float32)
        ids = torch.empty(N, k, device=logits.device, dtype=torch.int64)
        BLOCK_N, BLOCK_E, grid = _row_blocks(N, E)
        if N > 0:
            _topk_gate_fwd_kernel[grid](
                logits,
                w,
                ids,
                N,
                E,
                K=k,
                RENORM=renormalize,
                BLOCK_N=BLOCK_N,
                BLOCK_E=BLOCK_E,
                BLOCK_K=next_pow2(k),
            )
        ctx.save_for_backward(logits, w, ids)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(ids)
        return w.to(logits.dtype), ids

    @staticmethod
    def backward(ctx, dw: Tensor, _dids):
        logits, w, ids = ctx.saved_tensors
        N, E = logits.shape
        K = w.shape[1]
        dl = torch.empty_like(logits)
        BLOCK_N, BLOCK_E, grid = _row_blocks(N, E)
        if N > 0:
            _topk_gate_bwd_kernel[grid](
                logits,
                w,
                ids,
                dw.contiguous(),
                dl,
                N,
                E,
                K=K,
                RENORM=ctx.renormalize,
                BLOCK_N=BLOCK_N,
                BLOCK_E=BLOCK_E,
            )
        return dl, None, None


class ReluGateFunction(torch.autograd.Function):
    """``logits [N, E] -> (gates, ids, l1)``; gradient flows to logits through gates and l1."""

    @staticmethod
    def forward(ctx, logits: Tensor):
        logits = _check_logits(logits, "relu_gate")
        N, E = logits.shape
        gates = torch.empty_like(logits)
        ids = torch.empty(N, E, device=logits.device, dtype=torch.int64)
        l1 = torch.empty(N, device=logits.device, dtype=logits.dtype)
        BLOCK_N, BLOCK_E, grid = _row_blocks(N, E)
        if N > 0:
            _relu_gate_fwd_kernel[grid](
                logits, gates, ids, l1, N, E, BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E
            )
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(ids)
        return gates, ids, l1

    @staticmethod
    def backward(ctx, dg, _dids, dl1):
        (logits,) = ctx.saved_tensors
        N, E = logits.shape
        dl = torch.empty_like(logits)
        BLOCK_N, BLOCK_E, grid = _row_blocks(N, E)
        if N > 0:
            _relu_gate_bwd_kernel[grid](
                logits,
                dg.contiguous() if dg is not None else logits,
                dl1.contiguous() if dl1 is not None else logits,
                dl,
                N,
                E,
                HAS_DG=dg is not None,
                HAS_DL1=dl1 is not None,
                BLOCK_N=BLOCK_N,
                BLOCK_E=BLOCK_E,
            )
        return dl


def topk_gate(logits: Tensor, k: int, *, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Triton ``topk_gate``: ``logits [N, E] -> (weights [N, k] (logits' dtype), ids [N, k])``."""
    return TopKGateFunction.apply(logits, k, renormalize)


def relu_gate(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``relu_gate``: ``logits [N, E] -> (gates [N, E], ids [N, E], l1 [N])``."""
    return ReluGateFunction.apply(logits)
