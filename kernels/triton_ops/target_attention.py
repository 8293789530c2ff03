"""Target attention in Triton: each candidate's query over its padded behaviour sequence, with an
online softmax, masked by the sequence's length; forward and backward (see
``reference.target_attention`` for the math).

One program per candidate, all heads at once (tiles ``[BLOCK_L, BLOCK_H, BLOCK_D]``), looping
over the sequence in blocks of ``BLOCK_L`` items up to its length only (padding is never read).
The forward keeps a running max and sum per head (the online softmax) and stores the
log-sum-exp for the backward, which recomputes the probabilities block by block. Candidates
that share a sequence (``seq_of``: the candidates of one request in serving) read the same
keys and values; the backward writes each candidate's key/value gradients and adds them per
sequence with ``index_add_`` (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ._triton import interpreting, kernel, next_pow2


@kernel
def _ta_fwd_kernel(
    Q,  # [B, H, d]
    K,  # [S, L, H, d]
    V,  # [S, L, H, d]
    LEN,  # [S] int64
    SEQ,  # [B] int64
    OUT,  # [B, H, d]
    LSE,  # [B, H] fp32
    L,
    H,
    d,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(SEQ + b)
    n = tl.load(LEN + s)
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    hd_mask = (hs < H)[:, None] & (ds < d)[None, :]
    hd = hs[:, None] * d + ds[None, :]
    q = tl.load(Q + b * H * d + hd, mask=hd_mask, other=0.0).to(tl.float32) * scale
    m = tl.zeros((BLOCK_H,), dtype=tl.float32) - float("inf")
    lsum = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        valid = pos < n
        off = ((s * L + pos.to(tl.int64)) * H * d)[:, None, None] + hd[None, :, :]
        mask = valid[:, None, None] & hd_mask[None, :, :]
        kb = tl.load(K + off, mask=mask, other=0.0).to(tl.float32)
        sc = tl.sum(kb * q[None, :, :], axis=2)  # [BLOCK_L, BLOCK_H]
        sc = tl.where(valid[:, None], sc, -float("inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.where(m_new == -float("inf"), 1.0, tl.exp(m - m_new))
        p = tl.where(valid[:, None], tl.exp(sc - m_new[None, :]), 0.0)
        lsum = lsum * alpha + tl.sum(p, axis=0)
        vb = tl.load(V + off, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb, axis=0)
        m = m_new
    out = tl.where(lsum[:, None] > 0, acc / tl.where(lsum > 0, lsum, 1.0)[:, None], 0.0)
    tl.store(OUT + b * H * d + hd, out.to(OUT.dtype.element_ty), mask=hd_mask)
    lse = tl.where(lsum > 0, m + tl.log(tl.where(lsum > 0, lsum, 1.0)), float("inf"))
    tl.store(LSE + b * H + hs, lse, mask=hs < H)


@kernel
def _ta_bwd_kernel(
    Q,  # [B, H, d]
    K,  # [S, L, H, d]
    V,  # [S, L, H, d]
    LEN,  # [S]
    SEQ,  # [B]
    OUT,  # [B, H, d]
    LSE,  # [B, H]
    DOUT,  # [B, H, d]
    DQ,  # [B, H, d] fp32 out
    DK,  # [B, L, H, d] fp32 out (per candidate)
    DV,  # [B, L, H, d] fp32 out (per candidate)
    L,
    H,
    d,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(SEQ + b)
    n = tl.load(LEN + s)
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    hd_mask = (hs < H)[:, None] & (ds < d)[None, :]
    hd = hs[:, None] * d + ds[None, :]
    q = tl.load(Q + b * H * d + hd, mask=hd_mask, other=0.0).to(tl.float32) * scale
    do = tl.load(DOUT + b * H * d + hd, mask=hd_mask, other=0.0).to(tl.float32)
    o = tl.load(OUT + b * H * d + hd, mask=hd_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * H + hs, mask=hs < H, other=float("inf"))
    delta = tl.sum(do * o, axis=1)  # [BLOCK_H]
    dq = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        valid = pos < n
        off = ((s * L + pos.to(tl.int64)) * H * d)[:, None, None] + hd[None, :, :]
        mask = valid[:, None, None] & hd_mask[None, :, :]
        kb = tl.load(K + off, mask=mask, other=0.0).to(tl.float32)
        vb = tl.load(V + off, mask=mask, other=0.0).to(tl.float32)
        sc = tl.sum(kb * q[None, :, :], axis=2)
        p = tl.where(valid[:, None], tl.exp(sc - lse[None, :]), 0.0)  # [BLOCK_L, BLOCK_H]
        dp = tl.sum(vb * do[None, :, :], axis=2)
        dsc = p * (dp - delta[None, :])
        dq += tl.sum(dsc[:, :, None] * kb, axis=0)
        dk = dsc[:, :, None] * q[None, :, :]
        dv = p[:, :, None] * do[None, :, :]
        cand = ((b * L + pos.to(tl.int64)) * H * d)[:, None, None] + hd[None, :, :]
        tl.store(DK + cand, dk, mask=mask)
        tl.store(DV + cand, dv, mask=mask)
    tl.store(DQ + b * H * d + hd, dq * scale, mask=hd_mask)


def _blocks(L: int, H: int, d: int) -> tuple[int, int, int]:
    BLOCK_H, BLOCK_D = next_pow2(H), next_pow2(d)
    budget = 16384 if interpreting() else 4096  # elements of one [BLOCK_L, H, d] tile
    BLOCK_L = max(1, min(next_pow2(L), budget // (BLOCK_H * BLOCK_D)))
    return BLOCK_L, BLOCK_H, BLOCK_D


def _prepare(q, k, v, lengths, seq_of):
    B, H, d = q.shape
    S, L = k.shape[:2]
    if k.shape != (S, L, H, d) or v.shape != k.shape:
        raise ValueError(f"k, v: expected [S, L, {H}, {d}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if seq_of is None:
        seq_of = torch.arange(B, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int64).clamp(0, L).contiguous()
    return B, H, d, S, L, lengths, seq_of.to(device=q.device, dtype=torch.int64).contiguous()


class TargetAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, seq_of, scale):
        B, H, d, _, L, lengths, seq_of = _prepare(q, k, v, lengths, seq_of)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
        if B and L:
            BL, BH, BD = _blocks(L, H, d)
            _ta_fwd_kernel[(B,)](
                q, k, v, lengths, seq_of, out, lse, L, H, d, float(scale),
                BLOCK_L=BL, BLOCK_H=BH, BLOCK_D=BD, num_warps=4,
            )  # fmt: skip
        else:
            out.zero_()
            lse.fill_(float("inf"))
        ctx.save_for_backward(q, k, v, lengths, seq_of, out, lse)
        ctx.scale = float(scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lengths, seq_of, out, lse = ctx.saved_tensors
        B, H, d = q.shape
        S, L = k.shape[:2]
        dq = torch.zeros(B, H, d, device=q.device, dtype=torch.float32)
        dk_c = torch.zeros(B, L, H, d, device=q.device, dtype=torch.float32)
        dv_c = torch.zeros(B, L, H, d, device=q.device, dtype=torch.float32)
        if B and L:
            BL, BH, BD = _blocks(L, H, d)
            _ta_bwd_kernel[(B,)](
                q, k, v, lengths, seq_of, out, lse, dout.contiguous(), dq, dk_c, dv_c,
                L, H, d, ctx.scale, BLOCK_L=BL, BLOCK_H=BH, BLOCK_D=BD, num_warps=4,
            )  # fmt: skip
        dk = torch.zeros(S, L, H, d, device=q.device, dtype=torch.float32).index_add_(
            0, seq_of, dk_c
        )
        dv = torch.zeros(S, L, H, d, device=q.device, dtype=torch.float32).index_add_(
            0, seq_of, dv_c
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def target_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    seq_of: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """See ``reference.target_attention``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return TargetAttentionFunction.apply(q, k, v, lengths, seq_of, scale)


__all__ = ["TargetAttentionFunction", "target_attention"]
