"""MoE routing in Triton: a stable counting sort of (row, choice) pairs by expert, and the gather
of token rows into expert order (``moe_gather``), with autograd.

moe_permute over the flattened ids (L = N*k pairs, cut into blocks of BLOCK pairs), two launches
and no torch op between them:

1. ``_hist_scan_kernel``, one program per block: the block's histogram over bins ``0..G-1``
   (experts), ``G`` (id -1) and ``G+1`` (out-of-range id) goes to ``HIST[block]``; then the
   program takes a ticket from an atomic counter, and the one that draws the last ticket (every
   other histogram is written by then) does the scan: the totals over blocks, ``offsets`` (their
   exclusive cumsum over experts), each block's first slot per expert ``BASE[block, e] =
   offsets[e] + sum of HIST[b', e] over blocks b' < block`` (a cumsum down the block axis in
   tiles of SCAN_ROWS rows), and ``META = [M, out-of-range count]``. The last-block pattern of
   CUDA's threadFenceReduction sample: the histogram stores are ordered before the ticket by a
   CTA barrier and the atomic's release; the scan reads them ``volatile`` (past L1).
2. ``_place_kernel``: each pair's slot = its block's base for its expert + its rank among the
   earlier pairs of the same expert in the block (compares in chunks); writes ``slot_of`` and
   ``row_index`` (into an L-long buffer).

Then M: with ``all_routed`` (top-k routing: every pair has an expert) M = L is known on the host
and nothing syncs (a wrong promise is caught by ``torch._assert_async`` on the device, raised at
the next sync); otherwise the one host sync reads ``META``, and ``row_index`` is the first M
entries of the buffer (a view).
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
def _hist_scan_kernel(
    IDS,  # [L] flattened ids
    HIST,  # [n_blocks, NB] int32 out: per-block histograms
    BASE,  # [n_blocks, NB] int32 out: first slot of each expert for each block
    OFFSETS,  # [G+1] int64 out
    META,  # [2] int64 out: M, out-of-range count
    TICKET,  # [1] int32, zero at launch
    L,
    G,
    n_blocks,
    NB: tl.constexpr,
    BLOCK: tl.constexpr,
    SCAN_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    e = tl.load(IDS + offs, mask=mask, other=-1)
    b = tl.where((e >= 0) & (e < G), e, tl.where(e == -1, G, G + 1)).to(tl.int32)
    h = tl.histogram(b, NB, mask=mask)
    bins = tl.arange(0, NB)
    tl.store(HIST + pid * NB + bins, h)
    tl.debug_barrier()  # every thread's histogram store before the ticket
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel")
    if ticket == n_blocks - 1:
        # the last program: every histogram is visible. Totals, then the per-block bases.
        rows = tl.arange(0, SCAN_ROWS)
        totals = tl.zeros((NB,), dtype=tl.int32)
        for r0 in range(0, n_blocks, SCAN_ROWS):
            r = r0 + rows
            tile = tl.load(
                HIST + r[:, None] * NB + bins[None, :],
                mask=(r < n_blocks)[:, None],
                other=0,
                volatile=True,
            )
            totals += tl.sum(tile, axis=0)
        is_expert = bins < G
        expert_totals = tl.where(is_expert, totals, 0)
        first = tl.cumsum(expert_totals, axis=0) - expert_totals  # exclusive, over experts
        tl.store(OFFSETS + bins, first.to(tl.int64), mask=bins < G)
        M = tl.sum(expert_totals, axis=0)
        tl.store(OFFSETS + G, M.to(tl.int64))
        tl.store(META, M.to(tl.int64))
        tl.store(META + 1, tl.sum(tl.where(bins == G + 1, totals, 0), axis=0).to(tl.int64))
        running = first
        for r0 in range(0, n_blocks, SCAN_ROWS):
            r = r0 + rows
            rmask = (r < n_blocks)[:, None]
            ptr = r[:, None] * NB + bins[None, :]
            tile = tl.load(HIST + ptr, mask=rmask, other=0, volatile=True)
            tl.store(BASE + ptr, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=rmask)
            running += tl.sum(tile, axis=0)


@kernel
def _place_kernel(
    IDS,  # [L]
    BASE,  # [n_blocks, NB] int32: first slot of each expert for this block
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
    slot = (base + rank).to(tl.int64)
    tl.store(SLOT_OF + idx, tl.where(valid, slot, -1), mask=mask)
    tl.store(ROW_INDEX + slot, (idx // K).to(tl.int64), mask=valid)


def _sizes(L: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, SCAN_ROWS): small blocks under the interpreter, so that its tests cover
    many blocks and several scan tiles."""
    if interpreting():
        return min(next_pow2(L), 128), 32, 4
    return 256, 32, 16


def moe_permute(ids: Tensor, num_experts: int, all_routed: bool = False) -> MoERouting:
    """Triton ``moe_permute``: ``ids [N, k]`` -> ``MoERouting`` (see ``reference.MoERouting``).

    Two launches; one host sync (for M and the range check), none with ``all_routed``.
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
    if L >= 2**31:
        raise ValueError(f"moe_permute: {L} (row, choice) pairs; int32 slots hold < 2^31")
    NB = next_pow2(G + 2)
    BLOCK, CHUNK, SCAN_ROWS = _sizes(L)
    n_blocks = triton.cdiv(L, BLOCK)
    hist = torch.empty(2, n_blocks, NB, dtype=torch.int32, device=dev)  # HIST, BASE
    offsets = torch.empty(G + 1, dtype=torch.int64, device=dev)
    meta = torch.empty(2, dtype=torch.int64, device=dev)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    _hist_scan_kernel[(n_blocks,)](
        flat, hist[0], hist[1], offsets, meta, ticket, L, G, n_blocks,
        NB=NB, BLOCK=BLOCK, SCAN_ROWS=SCAN_ROWS, num_warps=4,
    )  # fmt: skip
    slot_of = torch.empty(L, dtype=torch.int64, device=dev)
    row_buf = torch.empty(L, dtype=torch.int64, device=dev)
    _place_kernel[(n_blocks,)](
        flat, hist[1], slot_of, row_buf, L, G, K, NB=NB, BLOCK=BLOCK, CHUNK=CHUNK, num_warps=4
    )
    if all_routed:
        torch._assert_async(
            meta[0] == L,
            f"moe_permute(all_routed=True): some ids are -1 or outside [0, {G})",
        )
        return MoERouting(row_buf, slot_of.view(N, K), offsets, L)
    M, bad = meta.tolist()  # the one host sync
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
