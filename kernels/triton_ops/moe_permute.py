"""MoE routing in Triton: a stable counting sort of (row, choice) pairs by expert, and the gather
of token rows into expert order (``moe_gather``), with autograd.

moe_permute over the flattened ids (L = N*k pairs, cut into blocks of BLOCK pairs):

1. ``_hist_kernel``: per block, a histogram over bins ``0..G-1`` (experts), ``G`` (id -1) and
   ``G+1`` (out-of-range id).
2. torch prefix sums on the device (no sync): the exclusive cumsum over blocks gives each
   block's first slot per expert, the cumsum of the totals gives ``offsets``.
3. ``_place_kernel``: each pair's slot = its block's base for its expert + its rank among the
   earlier pairs of the same expert in the block (compares in chunks); writes ``slot_of`` and
   ``row_index`` (into an L-long buffer).
4. The one host sync: ``M = offsets[G]`` and the out-of-range count, read together after all
   kernels are queued; ``row_index`` is the first M entries of the buffer (a view).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import MoERouting
from ._triton import interpreting, kernel, next_pow2
from .moe_unpermute import combine, scatter


@kernel
def _hist_kernel(
    IDS,  # [L] flattened ids
    HIST,  # [n_blocks, NB] int32 out
    L,
    G,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    e = tl.load(IDS + offs, mask=mask, other=-1)
    b = tl.where((e >= 0) & (e < G), e, tl.where(e == -1, G, G + 1)).to(tl.int32)
    h = tl.histogram(b, NB, mask=mask)
    tl.store(HIST + pid * NB + tl.arange(0, NB), h)


@kernel
def _place_kernel(
    IDS,  # [L]
    BASE,  # [n_blocks, NB] int64: first slot of each expert for this block
    SLOT_OF,  # [L] int64 out
    ROW_INDEX,  # [L] int64 out (first M used)
    L,
    G,
    K,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid * BLOCK
    idx = start + tl.arange(0, BLOCK)
    mask = idx < L
    e = tl.load(IDS + idx, mask=mask, other=-1)
    valid = mask & (e >= 0) & (e < G)
    # rank of each pair among the earlier pairs of the same expert in this block
    rank = tl.zeros((BLOCK,), dtype=tl.int32)
    for c0 in range(0, BLOCK, CHUNK):
        jdx = start + c0 + tl.arange(0, CHUNK)
        ej = tl.load(IDS + jdx, mask=jdx < L, other=-1)
        same = (ej[None, :] == e[:, None]) & (jdx[None, :] < idx[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    e_safe = tl.where(valid, e, 0)
    base = tl.load(BASE + pid * NB + e_safe, mask=valid, other=0)
    slot = base + rank
    tl.store(SLOT_OF + idx, tl.where(valid, slot, -1), mask=mask)
    tl.store(ROW_INDEX + slot, (idx // K).to(tl.int64), mask=valid)


def moe_permute(ids: Tensor, num_experts: int) -> MoERouting:
    """Triton ``moe_permute``: ``ids [N, k]`` -> ``MoERouting`` (see ``reference.MoERouting``).

    One host sync, for M (needed to size ``row_index``) and the range check.
    """
    if ids.dim() != 2:
        raise ValueError(f"moe_permute: ids must be [N, k], got {tuple(ids.shape)}")
    N, K = ids.shape
    G = int(num_experts)
    dev = ids.device
    flat = ids.reshape(-1).contiguous()
    L = flat.numel()
    if L == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return MoERouting(
            empty,
            ids.new_empty(N, K, dtype=torch.int64),
            torch.zeros(G + 1, dtype=torch.int64, device=dev),
            0,
        )
    NB = next_pow2(G + 2)
    BLOCK = min(next_pow2(L), 1024) if interpreting() else 256
    CHUNK = min(BLOCK, 64 if interpreting() else 32)
    n_blocks = triton.cdiv(L, BLOCK)
    hist = torch.empty(n_blocks, NB, dtype=torch.int32, device=dev)
    _hist_kernel[(n_blocks,)](flat, hist, L, G, NB=NB, BLOCK=BLOCK, num_warps=4)
    hist = hist.long()
    totals = hist.sum(0)
    offsets = torch.zeros(G + 1, dtype=torch.int64, device=dev)
    torch.cumsum(totals[:G], 0, out=offsets[1:])
    base = hist.cumsum(0) - hist
    base[:, :G] += offsets[:G]
    slot_of = torch.empty(L, dtype=torch.int64, device=dev)
    row_buf = torch.empty(L, dtype=torch.int64, device=dev)
    _place_kernel[(n_blocks,)](
        flat, base, slot_of, row_buf, L, G, K, NB=NB, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=4
    )
    M, bad = torch.stack([offsets[G], totals[G + 1]]).tolist()  # the one host sync
    if bad:
        raise ValueError(f"moe_permute: {bad} ids outside [-1, {G})")
    return MoERouting(row_buf[:M], slot_of.view(N, K), offsets, M)


class MoEGatherFunction(torch.autograd.Function):
    """``x [N, D] -> x_perm [M, D]``; backward sums each row's k slot gradients (no atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, slot_of: Tensor, M: int) -> Tensor:
        ctx.save_for_backward(slot_of)
        x_perm, _ = scatter(x, slot_of, M, None)
        return x_perm

    @staticmethod
    def backward(ctx, dx_perm: Tensor):
        (slot_of,) = ctx.saved_tensors
        return combine(dx_perm, slot_of, None), None, None


def moe_gather(x: Tensor, routing: MoERouting) -> Tensor:
    """Triton ``moe_gather``: ``x_perm[p] = x[routing.row_index[p]]``, ``[N, D] -> [M, D]``."""
    if x.dim() != 2 or x.shape[0] != routing.slot_of.shape[0]:
        raise ValueError(
            f"moe_gather: x must be [N={routing.slot_of.shape[0]}, D], got {tuple(x.shape)}"
        )
    return MoEGatherFunction.apply(x, routing.slot_of, routing.M)
