"""Token mixing as a Triton copy kernel: ``token_mix`` / ``token_revert`` and their autograd.

Both directions are the same "swap axes 1 and 2 of ``[B, A, C, d]``" copy:
mix views x ``[B, T, D]`` as ``[B, T, H, d]`` (A = T, C = H) and writes ``[B, H, T, d]``;
revert views y ``[B, H, T*d]`` as ``[B, H, T, d]`` (A = H, C = T) and writes ``[B, T, H, d]``.
The backward of one is the other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import _check_mix
from ._triton import interpreting, kernel, next_pow2


@kernel
def _swap12_kernel(
    X,  # [B, A, C, d] contiguous
    Y,  # [B, C, A, d] contiguous
    R,  # B * C * A rows of width d
    A,
    C,
    d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Y[b, c, a, :] = X[b, a, c, :]; one program = BLOCK_R output rows x BLOCK_D columns."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    a = rows % A
    bc = rows // A
    c = bc % C
    b = bc // C
    src = ((b * A + a) * C + c).to(tl.int64) * d
    mask = (rows < R)[:, None] & (cols < d)[None, :]
    v = tl.load(X + src[:, None] + cols[None, :], mask=mask)
    tl.store(Y + rows.to(tl.int64)[:, None] * d + cols[None, :], v, mask=mask)


def swap12(x: Tensor, B: int, A: int, C: int, d: int) -> Tensor:
    """``x`` viewed as ``[B, A, C, d]`` -> contiguous ``[B, C, A, d]`` (flat ``[B, C, A*d]``)."""
    x = x.contiguous()
    y = torch.empty(B, C, A * d, device=x.device, dtype=x.dtype)
    R = B * C * A
    if R == 0 or d == 0:
        return y
    BLOCK_D = min(next_pow2(d), 1024)
    # the interpreter's cost is per program: make them big there
    BLOCK_R = max(1, (16384 if interpreting() else 2048) // BLOCK_D)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(d, BLOCK_D))
    _swap12_kernel[grid](x, y, R, A, C, d, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return y


class TokenMixFunction(torch.autograd.Function):
    """``x [B, T, D] -> [B, H, T*D/H]``; backward reverts the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, num_heads: int) -> Tensor:
        B, T, _, d = _check_mix(x, num_heads)
        ctx.dims = (B, T, num_heads, d)
        return swap12(x, B, T, num_heads, d)

    @staticmethod
    def backward(ctx, dy: Tensor):
        B, T, H, d = ctx.dims
        return swap12(dy, B, H, T, d), None


class TokenRevertFunction(torch.autograd.Function):
    """``y [B, H, T*D/H] -> [B, T, D]``; backward mixes the gradient."""

    @staticmethod
    def forward(ctx, y: Tensor, num_tokens: int) -> Tensor:
        if y.dim() != 3 or num_tokens <= 0 or y.shape[2] % num_tokens:
            raise ValueError(
                f"token_revert: y must be [B, H, T*d] with T={num_tokens} dividing the width, "
                f"got {tuple(y.shape)}"
            )
        B, H, W = y.shape
        d = W // num_tokens
        ctx.dims = (B, num_tokens, H, d)
        return swap12(y, B, H, num_tokens, d)

    @staticmethod
    def backward(ctx, dz: Tensor):
        B, T, H, d = ctx.dims
        return swap12(dz, B, T, H, d), None


def token_mix(x: Tensor, num_heads: int) -> Tensor:
    """Triton ``token_mix``: ``[B, T, D] -> [B, H, T*D/H]``."""
    return TokenMixFunction.apply(x, num_heads)


def token_revert(y: Tensor, num_tokens: int) -> Tensor:
    """Triton ``token_revert``: ``[B, H, T*D/H] -> [B, T, D]``."""
    return TokenRevertFunction.apply(y, num_tokens)
