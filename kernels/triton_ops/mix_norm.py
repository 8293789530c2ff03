"""Fused token mix (or revert) + residual add + RMSNorm/LayerNorm, one pass over memory.

Forward reads x (through the mixing permutation) and the residual once and writes z and Norm(z)
once; statistics in fp32. Backward reads dz, dNorm, z and the per-row statistics once, writes
dx (through the inverse permutation), d_residual and per-program partial sums of dweight/dbias
(summed on the host side by torch).

Indexing: x is viewed as ``[B, A, C, d]`` and z as ``[B, C, W]`` with ``W = A*d``:
``z[b, c, a*d + i] = x[b, a, c, i] + residual[b, c, a*d + i]``.
mix: x ``[B, T, D]`` (A = T, C = H); revert: x ``[B, H, T*d]`` (A = H, C = T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import interpreting, kernel, next_pow2, num_programs_cap, num_warps_for


@kernel
def _mix_norm_fwd_kernel(
    X,  # [B, A, C, d]
    RES,  # [R, W] or dummy
    W_,  # [W]
    BIAS,  # [W] or dummy
    Z,  # [R, W] out
    Y,  # [R, W] out
    MEAN,  # [R] fp32 out (LayerNorm only)
    RSTD,  # [R] fp32 out
    R,
    A,
    C,
    d,
    W,
    eps,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < R
    cmask = cols < W
    mask = rmask[:, None] & cmask[None, :]
    c = rows % C
    b = rows // C
    a = cols // d
    i = cols % d
    src = ((b[:, None] * A + a[None, :]) * C + c[:, None]).to(tl.int64) * d + i[None, :]
    dst = rows.to(tl.int64)[:, None] * W + cols[None, :]
    xv = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        xv += tl.load(RES + dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(Z + dst, xv.to(Z.dtype.element_ty), mask=mask)
    z = xv.to(Z.dtype.element_ty).to(tl.float32)  # normalise z as stored (as the reference)
    if IS_RMS:
        zc = z
    else:
        mean = tl.sum(z, axis=1) / W
        tl.store(MEAN + rows, mean, mask=rmask)
        zc = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / W + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    w = tl.load(W_ + cols, mask=cmask, other=0.0).to(tl.float32)
    y = zc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + dst, y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _mix_norm_bwd_kernel(
    DZ,  # [R, W] or dummy: gradient w.r.t. z from z's own users
    DY,  # [R, W]: gradient w.r.t. Norm(z)
    Z,  # [R, W]
    W_,  # [W]
    MEAN,  # [R]
    RSTD,  # [R]
    DX,  # [B, A, C, d] out
    DRES,  # [R, W] out or dummy
    DW_PART,  # [n_programs, W] fp32 out
    DB_PART,  # [n_programs, W] fp32 out or dummy
    R,
    A,
    C,
    d,
    W,
    HAS_DZ: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < W
    a = cols // d
    i = cols % d
    w = tl.load(W_ + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for start in range(pid * BLOCK_R, R, nprog * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        dst = rows.to(tl.int64)[:, None] * W + cols[None, :]
        z = tl.load(Z + dst, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + dst, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if IS_RMS:
            zhat = z * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            zhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dzhat = dy * w[None, :]
        proj = tl.sum(dzhat * zhat, axis=1) / W
        if IS_RMS:
            g = (dzhat - zhat * proj[:, None]) * rstd[:, None]
        else:
            mdz = tl.sum(dzhat, axis=1) / W
            g = (dzhat - mdz[:, None] - zhat * proj[:, None]) * rstd[:, None]
        if HAS_DZ:
            g = g + tl.load(DZ + dst, mask=mask, other=0.0).to(tl.float32)
        if HAS_DRES:
            tl.store(DRES + dst, g.to(DRES.dtype.element_ty), mask=mask)
        c = rows % C
        b = rows // C
        src = ((b[:, None] * A + a[None, :]) * C + c[:, None]).to(tl.int64) * d + i[None, :]
        tl.store(DX + src, g.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * zhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * W + cols, dw_acc, mask=cmask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * W + cols, db_acc, mask=cmask)


def _blocks(W: int) -> tuple[int, int, int]:
    BLOCK_W = next_pow2(W)
    BLOCK_R = max(1, (65536 if interpreting() else 4096) // BLOCK_W)
    BLOCK_R = min(BLOCK_R, 64)
    return BLOCK_R, BLOCK_W, num_warps_for(BLOCK_R * BLOCK_W)


class MixNormFunction(torch.autograd.Function):
    """``(x, weight, bias, residual) -> (z, Norm(z))``; see ``reference.mix_norm``."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, num_heads, revert, norm, eps):
        if norm not in ("rms", "layer"):
            raise ValueError(f"mix_norm: norm must be 'rms' or 'layer', got {norm!r}")
        if x.dim() != 3:
            raise ValueError(f"mix_norm: x must be 3-d, got {tuple(x.shape)}")
        B = x.shape[0]
        if revert:
            H, Wx = x.shape[1], x.shape[2]
            if num_heads <= 0 or Wx % num_heads:
                raise ValueError(f"mix_norm: num_tokens={num_heads} must divide width {Wx}")
            A, C, d = H, num_heads, Wx // num_heads
        else:
            T, D = x.shape[1], x.shape[2]
            if num_heads <= 0 or D % num_heads:
                raise ValueError(f"mix_norm: num_heads={num_heads} must divide D={D}")
            A, C, d = T, num_heads, D // num_heads
        W = A * d
        R = B * C
        if residual is not None and residual.shape != (B, C, W):
            raise ValueError(
                f"mix_norm: residual shape {tuple(residual.shape)} != mixed shape {(B, C, W)}"
            )
        if weight.shape != (W,) or (bias is not None and bias.shape != (W,)):
            raise ValueError(f"mix_norm: weight and bias must be [{W}], got {tuple(weight.shape)}")
        x = x.contiguous()
        res = residual.contiguous() if residual is not None else x
        z = torch.empty(B, C, W, device=x.device, dtype=x.dtype)
        y = torch.empty_like(z)
        mean = torch.empty(R, device=x.device, dtype=torch.float32)
        rstd = torch.empty(R, device=x.device, dtype=torch.float32)
        BLOCK_R, BLOCK_W, nw = _blocks(W)
        if R > 0:
            _mix_norm_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](
                x,
                res,
                weight,
                bias if bias is not None else weight,
                z,
                y,
                mean,
                rstd,
                R,
                A,
                C,
                d,
                W,
                eps,
                HAS_RES=residual is not None,
                HAS_BIAS=bias is not None,
                IS_RMS=norm == "rms",
                BLOCK_R=BLOCK_R,
                BLOCK_W=BLOCK_W,
                num_warps=nw,
            )
        ctx.save_for_backward(z, weight, mean, rstd)
        ctx.dims = (B, A, C, d, W, R)
        ctx.flags = (bias is not None, residual is not None, norm == "rms")
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return z, y

    @staticmethod
    def backward(ctx, dz, dy):
        z, weight, mean, rstd = ctx.saved_tensors
        _B, A, C, d, W, R = ctx.dims
        has_bias, has_res, is_rms = ctx.flags
        if dy is None:
            dy = torch.zeros_like(z)
        dy = dy.contiguous()
        dz_c = dz.contiguous() if dz is not None else dy
        dx = torch.empty(ctx.x_shape, device=z.device, dtype=z.dtype)
        dres = torch.empty_like(z) if has_res and ctx.needs_input_grad[3] else None
        BLOCK_R, BLOCK_W, nw = _blocks(W)
        nprog = max(1, min(triton.cdiv(R, BLOCK_R), num_programs_cap(z.device)))
        dw_part = torch.zeros(nprog, W, device=z.device, dtype=torch.float32)
        db_part = torch.zeros(nprog, W, device=z.device, dtype=torch.float32) if has_bias else None
        if R > 0:
            _mix_norm_bwd_kernel[(nprog,)](
                dz_c,
                dy,
                z,
                weight,
                mean,
                rstd,
                dx,
                dres if dres is not None else dx,
                dw_part,
                db_part if db_part is not None else dw_part,
                R,
                A,
                C,
                d,
                W,
                HAS_DZ=dz is not None,
                HAS_DRES=dres is not None,
                HAS_BIAS=has_bias,
                IS_RMS=is_rms,
                BLOCK_R=BLOCK_R,
                BLOCK_W=BLOCK_W,
                num_warps=nw,
            )
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(ctx.bias_dtype) if has_bias else None
        return dx, dw, db, dres, None, None, None, None


def mix_norm(
    x: Tensor,
    num_heads: int,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    revert: bool = False,
    norm: str = "rms",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Triton ``mix_norm`` (same contract as ``reference.mix_norm``): returns ``(z, Norm(z))``."""
    return MixNormFunction.apply(x, weight, bias, residual, num_heads, revert, norm, eps)
