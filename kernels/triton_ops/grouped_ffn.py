"""Grouped per-expert FFN in Triton: grouped GEMMs over variable-size row groups, with autograd.

Rows of ``x_perm [M, D]`` are grouped by expert (``offsets [G+1]``). Three kernels:

- ``_up_kernel`` (forward GEMM 1): one program per (row tile of one group, Hd tile); both
  ``x @ w_gate[g]`` and ``x @ w_up[g]`` accumulate from the same x tile, and the activation
  (SwiGLU or GELU, plus ``b_up``) is applied in the epilogue, so only ``h`` (and, when training,
  the two pre-activations) is written.
- ``_gemm_kernel``: ``C[rows of g] = A1 @ B1[g] (+ A2 @ B2[g]) (+ bias[g])`` with B given by
  strides (a transposed weight is a stride swap, no copy) and an optional backward epilogue that
  turns ``dh`` into ``d(gate pre)``, ``d(up pre)`` and recomputes ``h``. Forward GEMM 2 and the
  backward's ``dh`` and ``dx`` GEMMs.
- ``_wgrad_kernel``: ``dW[g] = A[rows of g]^T @ B[rows of g]`` (optionally a second B sharing the
  A loads, and the bias gradient ``sum_rows B``), one program per (group, K tile, N tile), looping
  over the group's rows; empty groups write zeros.

Row tiles map to groups without a host sync: the per-group tile counts are prefix-summed on the
device and each program binary-searches its group; the grid is the upper bound
``cdiv(M, BLOCK_M) + G`` row tiles (programs past the last tile return at once). BLOCK_M is chosen
on the host from the mean group size (many small groups with per-token MoE); the other block
sizes are autotuned on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import _check_ffn
from ._triton import dot_precision, interpreting, kernel, next_pow2

_SWIGLU = 0
_GELU = 1

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (128, 64, 8, 3),
        (128, 64, 4, 4),
        (64, 64, 4, 4),
        (128, 128, 8, 3),
        (256, 64, 8, 3),
        (64, 32, 4, 5),
        (64, 32, 4, 2),  # fits in shared memory in every case (fp32, two operand pairs, BM 128)
    ]
]
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bk, bn, w, s in [
        (64, 64, 4, 4),
        (128, 64, 8, 3),
        (64, 128, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 2),
    ]
]
_INTERPRET_META = {"BLOCK_N": 64, "BLOCK_K": 64}


@kernel(
    configs=_GEMM_CONFIGS,
    key=["D", "Hd", "ACT", "HAS_BU", "SAVE_PRE", "LOG_G", "PRECISION", "DOT_F32", "BLOCK_M"],
    interpret_meta=_INTERPRET_META,
)
def _up_kernel(
    X,  # [M, D]
    WU,  # [G, D, Hd]
    WG,  # [G, D, Hd] (swiglu) or dummy
    BU,  # [G, Hd] or dummy
    H,  # [M, Hd] out: activation
    PRE_A,  # [M, Hd] out: gate pre-activation (swiglu, SAVE_PRE) or dummy
    PRE_U,  # [M, Hd] out: up pre-activation incl. bias (SAVE_PRE) or dummy
    OFFS,  # [G+1] int64 row offsets
    TILE_OFFS,  # [G+1] int64 row-tile offsets
    G,
    D,
    Hd,
    stride_wg,
    stride_wk,
    stride_wn,
    ACT: tl.constexpr,
    HAS_BU: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    LOG_G: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands (the interpreter cannot dot bf16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(TILE_OFFS + G):
        return
    # group g with TILE_OFFS[g] <= pid_m < TILE_OFFS[g + 1]
    lo = 0
    hi = G
    for _ in range(LOG_G):
        mid = (lo + hi) // 2
        go_right = tl.load(TILE_OFFS + mid) <= pid_m
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    g = lo
    row0 = tl.load(OFFS + g) + (pid_m - tl.load(TILE_OFFS + g)) * BLOCK_M
    row_end = tl.load(OFFS + g + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < row_end
    cmask = cols < Hd
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * D + ks[None, :]
    w_off = g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + ks) < D
        a = tl.load(x_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        bu = tl.load(WU + w_off + k0 * stride_wk, mask=wmask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        if ACT == 0:
            bg = tl.load(WG + w_off + k0 * stride_wk, mask=wmask, other=0.0)
            if DOT_F32:
                bg = bg.to(tl.float32)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
    if HAS_BU:
        acc_u += tl.load(BU + g.to(tl.int64) * Hd + cols, mask=cmask, other=0.0).to(tl.float32)[
            None, :
        ]
    out_mask = rmask[:, None] & cmask[None, :]
    out = rows.to(tl.int64)[:, None] * Hd + cols[None, :]
    if ACT == 0:
        # round the pre-activations to the storage dtype first, as the reference does
        a_pre = acc_g.to(H.dtype.element_ty).to(tl.float32)
        u_pre = acc_u.to(H.dtype.element_ty).to(tl.float32)
        h = a_pre * tl.sigmoid(a_pre) * u_pre
        if SAVE_PRE:
            tl.store(PRE_A + out, acc_g.to(PRE_A.dtype.element_ty), mask=out_mask)
    else:
        u_pre = acc_u.to(H.dtype.element_ty).to(tl.float32)
        h = 0.5 * u_pre * (1.0 + tl.math.erf(u_pre * 0.7071067811865476))
    if SAVE_PRE:
        tl.store(PRE_U + out, acc_u.to(PRE_U.dtype.element_ty), mask=out_mask)
    tl.store(H + out, h.to(H.dtype.element_ty), mask=out_mask)


# Every constexpr the caller sets is in the key (tests/test_kernels_ops.py checks): a config tuned
# for one variant can be wrong for another. Seen on an H200 when HAS_A2 was missing: the
# backward's dx GEMM (two operand pairs) reused the forward down GEMM's config (same sizes, one
# pair) and asked for 288 KiB of shared memory (227 KiB there).
@kernel(
    configs=_GEMM_CONFIGS,
    key=[
        "Kd",
        "N",
        "HAS_A2",
        "HAS_BIAS",
        "EPI",
        "LOG_G",
        "PRECISION",
        "DOT_F32",
        "HAS_SCALES",
        "BLOCK_M",
    ],
    interpret_meta=_INTERPRET_META,
)
def _gemm_kernel(
    A1,  # [M, Kd]
    B1,  # [G, Kd, N] by strides
    A2,  # [M, Kd] or dummy
    B2,  # [G, Kd, N] by strides, or dummy
    BIAS,  # [G, N] or dummy
    C,  # [M, N] out (EPI == 0) / d(gate pre) (EPI == 1) / d(up pre) (EPI == 2)
    PRE_A,  # [M, N] gate pre-activation (EPI == 1) or dummy
    PRE_U,  # [M, N] up pre-activation (EPI >= 1) or dummy
    DU,  # [M, N] out d(up pre) (EPI == 1) or dummy
    HOUT,  # [M, N] out recomputed activation (EPI >= 1) or dummy
    OFFS,
    TILE_OFFS,
    SA,  # [M] per-row scale of A1 (HAS_SCALES: FP8 operands) or dummy
    SB,  # [G, N] per-column scale of B1[g] or dummy
    G,
    Kd,
    N,
    stride_bg,
    stride_bk,
    stride_bn,
    HAS_A2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,  # 0: store C; 1: swiglu backward; 2: gelu backward
    LOG_G: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands (the interpreter cannot dot bf16)
    HAS_SCALES: tl.constexpr,  # acc * SA[row] * SB[g, col] before the bias (FP8 serving)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(TILE_OFFS + G):
        return
    lo = 0
    hi = G
    for _ in range(LOG_G):
        mid = (lo + hi) // 2
        go_right = tl.load(TILE_OFFS + mid) <= pid_m
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    g = lo
    row0 = tl.load(OFFS + g) + (pid_m - tl.load(TILE_OFFS + g)) * BLOCK_M
    row_end = tl.load(OFFS + g + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < row_end
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_off = rows.to(tl.int64)[:, None] * Kd + ks[None, :]
    b_off = g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        kmask = (k0 + ks) < Kd
        amask = rmask[:, None] & kmask[None, :]
        bmask = kmask[:, None] & cmask[None, :]
        a = tl.load(A1 + a_off + k0, mask=amask, other=0.0)
        b = tl.load(B1 + b_off + k0 * stride_bk, mask=bmask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_A2:
            a2 = tl.load(A2 + a_off + k0, mask=amask, other=0.0)
            b2 = tl.load(B2 + b_off + k0 * stride_bk, mask=bmask, other=0.0)
            if DOT_F32:
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
            acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
    if HAS_SCALES:
        sa = tl.load(SA + rows, mask=rmask, other=0.0)
        sb = tl.load(SB + g.to(tl.int64) * N + cols, mask=cmask, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + g.to(tl.int64) * N + cols, mask=cmask, other=0.0).to(tl.float32)[
            None, :
        ]
    out_mask = rmask[:, None] & cmask[None, :]
    out = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if EPI == 0:
        tl.store(C + out, acc.to(C.dtype.element_ty), mask=out_mask)
    elif EPI == 1:
        dh = acc.to(C.dtype.element_ty).to(tl.float32)
        a_pre = tl.load(PRE_A + out, mask=out_mask, other=0.0).to(tl.float32)
        u_pre = tl.load(PRE_U + out, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a_pre)
        silu = a_pre * sig
        tl.store(
            C + out,
            (dh * u_pre * sig * (1.0 + a_pre * (1.0 - sig))).to(C.dtype.element_ty),
            mask=out_mask,
        )
        tl.store(DU + out, (dh * silu).to(DU.dtype.element_ty), mask=out_mask)
        tl.store(HOUT + out, (silu * u_pre).to(HOUT.dtype.element_ty), mask=out_mask)
    else:
        dh = acc.to(C.dtype.element_ty).to(tl.float32)
        u_pre = tl.load(PRE_U + out, mask=out_mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(u_pre * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u_pre * u_pre) * 0.3989422804014327
        tl.store(C + out, (dh * (cdf + u_pre * pdf)).to(C.dtype.element_ty), mask=out_mask)
        tl.store(HOUT + out, (u_pre * cdf).to(HOUT.dtype.element_ty), mask=out_mask)


@kernel(
    configs=_WGRAD_CONFIGS,
    key=["Kd", "N", "HAS_B2", "HAS_DB", "PRECISION", "DOT_F32", "BLOCK_M"],
    interpret_meta=_INTERPRET_META,
)
def _wgrad_kernel(
    A,  # [M, Kd]
    B1,  # [M, N]
    B2,  # [M, N] or dummy
    DW1,  # [G, Kd, N] out = A^T B1 per group
    DW2,  # [G, Kd, N] out = A^T B2 per group, or dummy
    DB1,  # [G, N] out = sum_rows B1 per group, or dummy
    OFFS,
    Kd,
    N,
    HAS_B2: tl.constexpr,
    HAS_DB: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands (the interpreter cannot dot bf16)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    nn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = kk < Kd
    nmask = nn < N
    start = tl.load(OFFS + g)
    end = tl.load(OFFS + g + 1)
    acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    accb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + ms
        rmask = rows < end
        rows64 = rows.to(tl.int64)
        at = tl.load(
            A + rows64[None, :] * Kd + kk[:, None], mask=kmask[:, None] & rmask[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_M]
        bmask = rmask[:, None] & nmask[None, :]
        b1 = tl.load(B1 + rows64[:, None] * N + nn[None, :], mask=bmask, other=0.0)
        if DOT_F32:
            at = at.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc1 = tl.dot(at, b1, acc1, input_precision=PRECISION)
        if HAS_B2:
            b2 = tl.load(B2 + rows64[:, None] * N + nn[None, :], mask=bmask, other=0.0)
            if DOT_F32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(at, b2, acc2, input_precision=PRECISION)
        if HAS_DB:
            accb += tl.sum(b1.to(tl.float32), axis=0)
    out = g.to(tl.int64) * Kd * N + kk[:, None] * N + nn[None, :]
    omask = kmask[:, None] & nmask[None, :]
    tl.store(DW1 + out, acc1.to(DW1.dtype.element_ty), mask=omask)
    if HAS_B2:
        tl.store(DW2 + out, acc2.to(DW2.dtype.element_ty), mask=omask)
    if HAS_DB and tl.program_id(1) == 0:
        tl.store(DB1 + g.to(tl.int64) * N + nn, accb.to(DB1.dtype.element_ty), mask=nmask)


class _Plan:
    """Row-tile schedule of one grouped GEMM call (device tensors, no host sync)."""

    def __init__(self, offsets: Tensor, M: int, G: int) -> None:
        mean_rows = M / max(G, 1)
        if interpreting():
            self.BLOCK_M = max(16, min(64, next_pow2(int(mean_rows))))
        else:
            self.BLOCK_M = (
                128 if mean_rows >= 96 else 64 if mean_rows >= 40 else 32 if mean_rows >= 20 else 16
            )
        counts = offsets[1:] - offsets[:-1]
        self.offsets = offsets
        self.tile_offsets = torch.zeros(G + 1, dtype=torch.int64, device=offsets.device)
        torch.cumsum(
            torch.div(counts + self.BLOCK_M - 1, self.BLOCK_M, rounding_mode="floor"),
            0,
            out=self.tile_offsets[1:],
        )
        self.row_tiles = triton.cdiv(M, self.BLOCK_M) + G  # upper bound on sum_g cdiv(count_g, BM)
        self.G = G
        self.LOG_G = max(1, math.ceil(math.log2(G))) if G > 1 else 0


def _gemm(
    plan: _Plan,
    a1: Tensor,
    b1: Tensor,
    b1_strides: tuple[int, int, int],
    N: int,
    *,
    a2: Tensor | None = None,
    b2: Tensor | None = None,
    bias: Tensor | None = None,
    epi: int = 0,
    pre_a: Tensor | None = None,
    pre_u: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Grouped ``a1 @ b1[g] (+ a2 @ b2[g]) (+ bias[g])``; see ``_gemm_kernel``'s EPI modes.
    ``scales = (s_a [M], s_b [G, N])`` multiply the accumulator (FP8 operands).

    Returns (C, DU, HOUT) with DU (swiglu) and HOUT (both activations) only for epi >= 1.
    """
    M, Kd = a1.shape
    dt = out_dtype or a1.dtype
    c = torch.empty(M, N, device=a1.device, dtype=dt)
    du = torch.empty_like(c) if epi == 1 else None
    hout = torch.empty_like(c) if epi >= 1 else None
    if M == 0:
        return c, du, hout

    def grid(meta):
        return (plan.row_tiles, triton.cdiv(N, meta["BLOCK_N"]))

    _gemm_kernel[grid](
        a1,
        b1,
        a2 if a2 is not None else a1,
        b2 if b2 is not None else b1,
        bias if bias is not None else b1,
        c,
        pre_a if pre_a is not None else c,
        pre_u if pre_u is not None else c,
        du if du is not None else c,
        hout if hout is not None else c,
        plan.offsets,
        plan.tile_offsets,
        scales[0] if scales is not None else c,
        scales[1] if scales is not None else c,
        plan.G,
        Kd,
        N,
        *b1_strides,
        HAS_A2=a2 is not None,
        HAS_BIAS=bias is not None,
        EPI=epi,
        LOG_G=plan.LOG_G,
        PRECISION=dot_precision(a1.dtype),
        DOT_F32=interpreting(),
        HAS_SCALES=scales is not None,
        BLOCK_M=plan.BLOCK_M,
    )
    return c, du, hout


def _wgrad(
    plan: _Plan, a: Tensor, b1: Tensor, b2: Tensor | None, want_db: bool, w_dtype
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per group ``a^T b1`` (and ``a^T b2``, ``sum_rows b1``): ``[G, Kd, N]`` (and ``[G, N]``)."""
    _M, Kd = a.shape
    N = b1.shape[1]
    G = plan.G
    dw1 = torch.empty(G, Kd, N, device=a.device, dtype=w_dtype)
    dw2 = torch.empty_like(dw1) if b2 is not None else None
    db = torch.empty(G, N, device=a.device, dtype=w_dtype) if want_db else None

    def grid(meta):
        return (G, triton.cdiv(Kd, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

    _wgrad_kernel[grid](
        a,
        b1,
        b2 if b2 is not None else b1,
        dw1,
        dw2 if dw2 is not None else dw1,
        db if db is not None else dw1,
        plan.offsets,
        Kd,
        N,
        HAS_B2=b2 is not None,
        HAS_DB=want_db,
        PRECISION=dot_precision(a.dtype),
        DOT_F32=interpreting(),
        BLOCK_M=32 if interpreting() else 64,
    )
    return dw1, dw2, db


class GroupedFFNFunction(torch.autograd.Function):
    """``(x_perm [M, D], offsets, w_up, w_gate, b_up, w_down, b_down) -> y [M, D]``."""

    @staticmethod
    def forward(ctx, x_perm, offsets, w_up, w_gate, b_up, w_down, b_down, activation):
        _check_ffn(x_perm, offsets, w_up, w_down, w_gate, b_up, b_down, activation)
        G, D, Hd = w_up.shape
        M = x_perm.shape[0]
        dt = x_perm.dtype
        for name, t in (("w_up", w_up), ("w_gate", w_gate), ("w_down", w_down)):
            if t is not None and t.dtype != dt:
                raise TypeError(f"grouped_ffn: {name} is {t.dtype} but x_perm is {dt}")
        x_perm = x_perm.contiguous()
        w_up = w_up.contiguous()
        w_gate = w_gate.contiguous() if w_gate is not None else None
        w_down = w_down.contiguous()
        offsets = offsets.to(torch.int64).contiguous()
        plan = _Plan(offsets, M, G)
        swiglu = activation == "swiglu"
        save_pre = any(ctx.needs_input_grad)
        h = torch.empty(M, Hd, device=x_perm.device, dtype=dt)
        pre_a = torch.empty_like(h) if save_pre and swiglu else None
        pre_u = torch.empty_like(h) if save_pre else None
        if M > 0:

            def grid(meta):
                return (plan.row_tiles, triton.cdiv(Hd, meta["BLOCK_N"]))

            _up_kernel[grid](
                x_perm,
                w_up,
                w_gate if swiglu else w_up,
                b_up if b_up is not None else w_up,
                h,
                pre_a if pre_a is not None else h,
                pre_u if pre_u is not None else h,
                offsets,
                plan.tile_offsets,
                G,
                D,
                Hd,
                *w_up.stride(),
                ACT=_SWIGLU if swiglu else _GELU,
                HAS_BU=b_up is not None,
                SAVE_PRE=save_pre,
                LOG_G=plan.LOG_G,
                PRECISION=dot_precision(dt),
                DOT_F32=interpreting(),
                BLOCK_M=plan.BLOCK_M,
            )
        y, _, _ = _gemm(plan, h, w_down, w_down.stride(), D, bias=b_down)
        ctx.save_for_backward(x_perm, w_up, w_gate, w_down, pre_a, pre_u)
        ctx.plan = plan
        ctx.swiglu = swiglu
        ctx.has_bias = (b_up is not None, b_down is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_perm, w_up, w_gate, w_down, pre_a, pre_u = ctx.saved_tensors
        plan = ctx.plan
        _G, D, Hd = w_up.shape
        dy = dy.contiguous().to(x_perm.dtype)
        # dh = dy @ w_down[g]^T, with the activation's backward in the epilogue
        wd_t = (w_down.stride(0), w_down.stride(2), w_down.stride(1))
        if ctx.swiglu:
            da, du, h = _gemm(plan, dy, w_down, wd_t, Hd, epi=1, pre_a=pre_a, pre_u=pre_u)
        else:
            du, _, h = _gemm(plan, dy, w_down, wd_t, Hd, epi=2, pre_u=pre_u)
            da = None
        has_bu, has_bd = ctx.has_bias
        dw_down, _, db_down = _wgrad(plan, h, dy, None, has_bd, w_down.dtype)
        dw_up, dw_gate, db_up = _wgrad(plan, x_perm, du, da, has_bu, w_up.dtype)
        wu_t = (w_up.stride(0), w_up.stride(2), w_up.stride(1))
        dx, _, _ = _gemm(
            plan,
            du,
            w_up,
            wu_t,
            D,
            a2=da,
            b2=w_gate,
        )
        return dx, None, dw_up, dw_gate, db_up, dw_down, db_down, None


def grouped_ffn(
    x_perm: Tensor,
    offsets: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str = "swiglu",
) -> Tensor:
    """Triton ``grouped_ffn`` (same contract as ``reference.grouped_ffn``): ``[M, D] -> [M, D]``."""
    return GroupedFFNFunction.apply(x_perm, offsets, w_up, w_gate, b_up, w_down, b_down, activation)


@triton.jit
def _e4m3_round(v):
    """Round fp32 ``v`` (|v| <= 448) to the nearest e4m3 value, ties to even, in fp32: the
    value a round-to-nearest cast gives, made exact beforehand so that the cast itself cannot
    round (Triton's interpreter mis-rounds values just below a power of two; the GPU's
    ``cvt.rn.satfinite`` does not, and gets the same bytes). ulp = 2^(max(e, -6) - 3)."""
    bits = v.to(tl.int32, bitcast=True)
    ue = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    inv_ulp = ((127 - ue) << 23).to(tl.float32, bitcast=True)
    ulp = ((127 + ue) << 23).to(tl.float32, bitcast=True)
    a = tl.abs(v * inv_ulp)
    r = (a + 12582912.0) - 12582912.0  # + 1.5 * 2^23 rounds to an integer, ties to even
    return tl.where(v < 0, -r, r) * ulp


@kernel
def _fp8_rows_kernel(
    X,  # [M, K]
    X8,  # [M, K] float8_e4m3fn out
    S,  # [M] fp32 out: max |row| / 448 (1 for a zero row)
    M,
    K,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    base = rows.to(tl.int64)[:, None] * K
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(X + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    s = tl.math.div_rn(amax, tl.full((ROWS,), 448.0, tl.float32))  # as reference.fp8_quantize
    s = tl.where(s > 0, s, 1.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(X + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        q = _e4m3_round(tl.math.div_rn(x, s[:, None]))
        tl.store(X8 + base + cols[None, :], q.to(X8.dtype.element_ty), mask=m)
    tl.store(S + rows, s, mask=rmask)


def fp8_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``reference.fp8_quantize(x)`` (per-row e4m3, ``x [M, K]``) in one Triton pass over x
    (two reads of each row, one write): ``(x8 [M, K] float8_e4m3fn, s [M] fp32)``; the same
    values as the reference (a zero may carry the other sign)."""
    M, K = x.shape
    x = x.contiguous()
    x8 = torch.empty(M, K, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, device=x.device, dtype=torch.float32)
    if M == 0:
        return x8, s
    if interpreting():
        rows, block_k = 8, min(64, next_pow2(K))
    else:
        block_k = min(1024, next_pow2(K))
        rows = max(1, 4096 // block_k)
    _fp8_rows_kernel[(triton.cdiv(M, rows),)](
        x, x8, s, M, K, ROWS=rows, BLOCK_K=block_k, num_warps=4
    )
    return x8, s


def grouped_linear(
    x_perm: Tensor, offsets: Tensor, w: Tensor, *, bias: Tensor | None = None
) -> Tensor:
    """Grouped ``x_perm[rows of g] @ w[g] (+ bias[g])`` in x's dtype with the same grouped GEMM
    and no quantization: what ``grouped_linear_fp8`` is compared with (``bench kernels``).
    Inference only (no autograd)."""
    M = x_perm.shape[0]
    G, _, N = w.shape
    plan = _Plan(offsets.to(torch.int64), M, G)
    c, _, _ = _gemm(
        plan,
        x_perm.contiguous(),
        w,
        (w.stride(0), w.stride(1), w.stride(2)),
        N,
        bias=bias,
    )
    return c


def grouped_linear_fp8(
    x_perm: Tensor,
    offsets: Tensor,
    w8: Tensor,
    w_scale: Tensor,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """``kernels.reference.grouped_linear_fp8`` in Triton: rows quantized to e4m3 per row
    (``fp8_quantize_rows``, one pass), then one grouped GEMM on the FP8 operands with the row
    and column scales and the bias in its epilogue (fp32 accumulation, rounded once to x's
    dtype as it is stored; no host sync). Inference only (no autograd)."""
    from ..reference import _check_fp8

    _check_fp8(x_perm, offsets, w8, w_scale, bias)
    M = x_perm.shape[0]
    G, _, N = w8.shape
    x8, sx = fp8_quantize_rows(x_perm)
    plan = _Plan(offsets.to(torch.int64), M, G)
    c, _, _ = _gemm(
        plan,
        x8.contiguous(),
        w8,
        (w8.stride(0), w8.stride(1), w8.stride(2)),
        N,
        bias=None if bias is None else bias.float().contiguous(),
        scales=(sx, w_scale.float().contiguous()),
        out_dtype=x_perm.dtype,
    )
    return c
