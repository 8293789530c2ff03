"""PyTorch reference twins of every op in ``kernels``: plain, obviously-correct torch.

These are the semantics (DESIGN.md, "Kernels"); the Triton kernels are tested against them and
the dispatch uses them for CPU tensors. Autograd comes from torch. Norms and softmaxes are
computed in fp32 and cast back to the input dtype; matmuls run in the input dtype (fp32
accumulation inside torch's GEMMs).

Shapes: B batch, T tokens, D token width, H heads (mixed tokens), d = D / H, N routed rows,
k experts per row, E / G experts (groups), M = number of valid (row, expert) pairs, Hd expert
hidden width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MoERouting",
    "grouped_ffn",
    "mix_norm",
    "moe_ffn",
    "moe_gather",
    "moe_permute",
    "moe_unpermute",
    "relu_gate",
    "token_mix",
    "token_revert",
    "topk_gate",
]


class MoERouting(NamedTuple):
    """The result of ``moe_permute``: where every (row, choice) pair goes.

    row_index: [M] int64, source row n of each permuted slot, slots sorted by expert (stable:
        within an expert, slots keep the order of the flattened ``ids``).
    slot_of:   [N, k] int64, permuted slot of pair (n, j); -1 where ``ids[n, j] == -1``.
    offsets:   [num_experts + 1] int64, expert g owns slots ``offsets[g]:offsets[g + 1]``.
    M:         int, number of valid pairs (``offsets[-1]``), known on the host.
    """

    row_index: Tensor
    slot_of: Tensor
    offsets: Tensor
    M: int


# --------------------------------------------------------------------------- token mixing


def _check_mix(x: Tensor, num_heads: int) -> tuple[int, int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"token_mix: x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if num_heads <= 0 or D % num_heads:
        raise ValueError(f"token_mix: num_heads={num_heads} must divide D={D}")
    return B, T, D, D // num_heads


def token_mix(x: Tensor, num_heads: int) -> Tensor:
    """RankMixer multi-head token mixing: ``[B, T, D] -> [B, H, T*D/H]``.

    With ``d = D / H``: ``out[b, h, t*d:(t+1)*d] = x[b, t, h*d:(h+1)*d]``.
    """
    B, T, _, d = _check_mix(x, num_heads)
    return x.reshape(B, T, num_heads, d).transpose(1, 2).reshape(B, num_heads, T * d)


def token_revert(y: Tensor, num_tokens: int) -> Tensor:
    """Exact inverse of ``token_mix``: ``[B, H, T*D/H] -> [B, T, D]`` with ``T = num_tokens``."""
    if y.dim() != 3:
        raise ValueError(f"token_revert: y must be [B, H, T*D/H], got shape {tuple(y.shape)}")
    B, H, W = y.shape
    if num_tokens <= 0 or W % num_tokens:
        raise ValueError(f"token_revert: num_tokens={num_tokens} must divide the width {W}")
    d = W // num_tokens
    return y.reshape(B, H, num_tokens, d).transpose(1, 2).reshape(B, num_tokens, H * d)


def _norm(z: Tensor, weight: Tensor, bias: Tensor | None, norm: str, eps: float) -> Tensor:
    zf = z.float()
    if norm == "rms":
        out = zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        if bias is not None:
            out = out + bias.float()
    elif norm == "layer":
        out = F.layer_norm(
            zf,
            (z.shape[-1],),
            weight.float(),
            None if bias is None else bias.float(),
            eps,
        )
    else:
        raise ValueError(f"mix_norm: norm must be 'rms' or 'layer', got {norm!r}")
    return out.to(z.dtype)


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
    """Mix (or revert), add a residual, normalise: returns ``(z, Norm(z))``.

    ``z = (token_revert(x, num_heads) if revert else token_mix(x, num_heads)) + residual``;
    with ``revert=True``, ``num_heads`` is the number of tokens T to revert to.
    x: [B, T, D] (mix) or [B, H, T*D/H] (revert); residual: the shape of z or None;
    weight, bias: [z.shape[-1]]. Norm: RMSNorm (``norm="rms"``) or LayerNorm (``"layer"``)
    over the last dim, statistics in fp32. Both outputs have x's dtype.
    """
    z = token_revert(x, num_heads) if revert else token_mix(x, num_heads)
    if residual is not None:
        if residual.shape != z.shape:
            raise ValueError(
                f"mix_norm: residual shape {tuple(residual.shape)} != mixed shape {tuple(z.shape)}"
            )
        z = z + residual
    if weight.shape != (z.shape[-1],):
        raise ValueError(f"mix_norm: weight must be [{z.shape[-1]}], got {tuple(weight.shape)}")
    return z, _norm(z, weight, bias, norm, eps)


# --------------------------------------------------------------------------- gates


def topk_gate(logits: Tensor, k: int, *, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k softmax gate: ``logits [N, E] -> (weights [N, k], ids [N, k] int64)``.

    ``renormalize=True``: softmax over the k largest logits; ``False``: softmax over all E, then
    the k largest probabilities. ids are in descending order of weight. Weights have the logits'
    dtype (softmax computed in fp32).
    """
    if logits.dim() != 2 or not 0 < k <= logits.shape[1]:
        raise ValueError(
            f"topk_gate: need logits [N, E] and 0 < k <= E, got {tuple(logits.shape)}, k={k}"
        )
    if renormalize:
        vals, ids = logits.topk(k, dim=-1)
        weights = torch.softmax(vals.float(), dim=-1)
    else:
        weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return weights.to(logits.dtype), ids


def relu_gate(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RankMixer's ReLU gate: ``logits [N, E] -> (gates [N, E], ids [N, E], l1 [N])``.

    gates = relu(logits); ids[n, e] = e where gates[n, e] > 0 else -1 (so ``moe_ffn(x, gates,
    ids, ...)`` runs only the active experts); l1 = gates.sum(-1), for the L1 sparsity loss.
    """
    if logits.dim() != 2:
        raise ValueError(f"relu_gate: logits must be [N, E], got {tuple(logits.shape)}")
    gates = torch.relu(logits)
    experts = torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
    ids = torch.where(gates > 0, experts, torch.full_like(experts, -1))
    return gates, ids, gates.sum(-1)


# --------------------------------------------------------------------------- routing


def moe_permute(ids: Tensor, num_experts: int, all_routed: bool = False) -> MoERouting:
    """Stable counting sort of (row, choice) pairs by expert: ``ids [N, k] -> MoERouting``.

    ids are global expert ids in ``[0, num_experts)``, or -1 for "no expert". One host sync
    (for M and the range check). ``all_routed``: the caller promises no -1 (top-k routing), so
    M = N*k is known without a sync; the Triton op then checks on the device, this one here.
    """
    if ids.dim() != 2:
        raise ValueError(f"moe_permute: ids must be [N, k], got {tuple(ids.shape)}")
    N, k = ids.shape
    flat = ids.reshape(-1).long()
    valid = flat >= 0
    bad = int(((flat < -1) | (flat >= num_experts)).sum())
    if bad:
        raise ValueError(f"moe_permute: {bad} ids outside [-1, {num_experts})")
    if all_routed and not bool(valid.all()):
        raise ValueError("moe_permute(all_routed=True): some ids are -1")
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    M = int(valid.sum())
    order = order[:M]
    slot_of = torch.full((N * k,), -1, dtype=torch.int64, device=ids.device)
    slot_of[order] = torch.arange(M, device=ids.device)
    return MoERouting(order // k, slot_of.view(N, k), offsets, M)


def moe_gather(x: Tensor, routing: MoERouting) -> Tensor:
    """Rows of x in permuted order: ``x [N, D] -> x_perm [M, D]``, ``x_perm[p] = x[row_index[p]]``."""
    return x[routing.row_index]


def moe_unpermute(y_perm: Tensor, routing: MoERouting, weights: Tensor) -> Tensor:
    """Weighted combine: ``out[n] = sum_j weights[n, j] * y_perm[slot_of[n, j]]`` (skip -1).

    y_perm: [M, D]; weights: [N, k]; out: [N, D] in y_perm's dtype (sum in fp32).
    """
    slot_of = routing.slot_of
    if weights.shape != slot_of.shape:
        raise ValueError(
            f"moe_unpermute: weights {tuple(weights.shape)} != ids {tuple(slot_of.shape)}"
        )
    M, D = y_perm.shape
    # one zero row at index M stands in for the -1 slots
    padded = torch.cat([y_perm, y_perm.new_zeros(1, D)])
    slot = torch.where(slot_of >= 0, slot_of, torch.full_like(slot_of, M))
    rows = padded[slot].float()  # [N, k, D]
    w = torch.where(slot_of >= 0, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    return (w.unsqueeze(-1) * rows).sum(1).to(y_perm.dtype)


# --------------------------------------------------------------------------- expert FFN


def _check_ffn(x_perm, offsets, w_up, w_down, w_gate, b_up, b_down, activation) -> None:
    G, D, Hd = w_up.shape
    if x_perm.dim() != 2 or x_perm.shape[1] != D:
        raise ValueError(f"grouped_ffn: x_perm must be [M, {D}], got {tuple(x_perm.shape)}")
    if w_down.shape != (G, Hd, D):
        raise ValueError(f"grouped_ffn: w_down must be [{G}, {Hd}, {D}], got {tuple(w_down.shape)}")
    if offsets.shape != (G + 1,):
        raise ValueError(f"grouped_ffn: offsets must be [{G + 1}], got {tuple(offsets.shape)}")
    if activation == "swiglu":
        if w_gate is None or w_gate.shape != w_up.shape:
            raise ValueError("grouped_ffn: activation='swiglu' needs w_gate of w_up's shape")
    elif activation != "gelu":
        raise ValueError(f"grouped_ffn: activation must be 'swiglu' or 'gelu', got {activation!r}")
    if b_up is not None and b_up.shape != (G, Hd):
        raise ValueError(f"grouped_ffn: b_up must be [{G}, {Hd}], got {tuple(b_up.shape)}")
    if b_down is not None and b_down.shape != (G, D):
        raise ValueError(f"grouped_ffn: b_down must be [{G}, {D}], got {tuple(b_down.shape)}")


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
    """Per-expert FFN over rows grouped by expert: ``x_perm [M, D] -> y [M, D]``.

    Expert g owns rows ``offsets[g]:offsets[g+1]`` (``offsets [G+1]``, ``offsets[-1] == M``).
    w_up, w_gate: [G, D, Hd]; w_down: [G, Hd, D]; b_up: [G, Hd]; b_down: [G, D].
    swiglu: ``y = (silu(x @ w_gate[g]) * (x @ w_up[g] + b_up[g])) @ w_down[g] + b_down[g]``;
    gelu (exact, erf): ``y = gelu(x @ w_up[g] + b_up[g]) @ w_down[g] + b_down[g]``
    (absent biases are zero). A per-expert loop: one host sync for the offsets.
    """
    _check_ffn(x_perm, offsets, w_up, w_down, w_gate, b_up, b_down, activation)
    bounds = offsets.tolist()
    if bounds[-1] != x_perm.shape[0]:
        raise ValueError(
            f"grouped_ffn: offsets[-1]={bounds[-1]} != rows of x_perm {x_perm.shape[0]}"
        )
    outs = [x_perm[:0]]  # keeps the output connected to x_perm when every group is empty
    for g in range(w_up.shape[0]):
        s, e = bounds[g], bounds[g + 1]
        if s == e:
            continue
        xs = x_perm[s:e]
        up = xs @ w_up[g]
        if b_up is not None:
            up = up + b_up[g]
        if activation == "swiglu":
            h = F.silu(xs @ w_gate[g]) * up
        else:
            h = F.gelu(up)
        y = h @ w_down[g]
        if b_down is not None:
            y = y + b_down[g]
        outs.append(y)
    return torch.cat(outs)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_quantize(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric e4m3 quantization with one scale per slice along ``dim`` reduced:
    ``s = max |x| / 448`` over ``dim`` (1 where all zero), ``x8 = (x / s)`` in float8_e4m3fn
    (round to nearest). Returns ``(x8, s)`` with ``s`` fp32, ``dim`` kept as size 1."""
    xf = x.float()
    s = xf.abs().amax(dim=dim, keepdim=True) / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (xf / s).to(torch.float8_e4m3fn), s


def fp8_quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-column e4m3 weights: ``w [G, K, N] -> (w8 [G, K, N], scale [G, N])``."""
    w8, s = fp8_quantize(w, dim=-2)
    return w8, s.squeeze(-2)


def _check_fp8(x_perm, offsets, w8, w_scale, bias) -> None:
    if w8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"grouped_linear_fp8: w8 must be float8_e4m3fn, got {w8.dtype}")
    if w8.dim() != 3 or x_perm.dim() != 2 or x_perm.shape[1] != w8.shape[1]:
        raise ValueError(
            f"grouped_linear_fp8: x_perm [M, K] and w8 [G, K, N] expected, got "
            f"{tuple(x_perm.shape)} and {tuple(w8.shape)}"
        )
    G, _, N = w8.shape
    if tuple(w_scale.shape) != (G, N) or (bias is not None and tuple(bias.shape) != (G, N)):
        raise ValueError(
            f"grouped_linear_fp8: w_scale (and bias) must be [G, N] = [{G}, {N}], got "
            f"{tuple(w_scale.shape)}" + ("" if bias is None else f" and {tuple(bias.shape)}")
        )
    if offsets.shape != (G + 1,):
        raise ValueError(f"grouped_linear_fp8: offsets must be [G+1] = [{G + 1}]")


def grouped_linear_fp8(
    x_perm: Tensor,
    offsets: Tensor,
    w8: Tensor,
    w_scale: Tensor,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """Grouped linear with FP8 (e4m3) operands, for serving: ``x_perm [M, K] -> [M, N]``.

    Group g owns rows ``offsets[g]:offsets[g+1]``; its weight is ``w8[g] * w_scale[g]``
    (``fp8_quantize_weight``). Each row of ``x_perm`` is quantized to e4m3 with its own scale
    (``fp8_quantize``); ``y = s_x * s_w[g] * (x8 @ w8[g]) + bias[g]`` with the products of the
    e4m3 values (exact in fp32) summed in fp32, in ``x_perm``'s dtype. A per-group loop: one
    host sync for the offsets."""
    _check_fp8(x_perm, offsets, w8, w_scale, bias)
    x8, sx = fp8_quantize(x_perm)
    bounds = offsets.tolist()
    out = x_perm.new_empty((x_perm.shape[0], w8.shape[2]), dtype=torch.float32)
    for g in range(w8.shape[0]):
        a, b = bounds[g], bounds[g + 1]
        if a == b:
            continue
        y = (x8[a:b].float() @ w8[g].float()) * sx[a:b] * w_scale[g].float()
        out[a:b] = y if bias is None else y + bias[g].float()
    return out.to(x_perm.dtype)


def moe_ffn(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    activation: str = "swiglu",
    all_routed: bool = False,
) -> Tensor:
    """Routed expert FFN: ``x [N, D]``, ``weights, ids [N, k]`` -> ``out [N, D]``.

    ``out[n] = sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])`` (pairs with ``ids == -1`` skipped),
    computed as moe_permute -> gather -> grouped_ffn -> moe_unpermute.
    """
    routing = moe_permute(ids, w_up.shape[0], all_routed)
    y_perm = grouped_ffn(
        moe_gather(x, routing),
        routing.offsets,
        w_up,
        w_down,
        w_gate=w_gate,
        b_up=b_up,
        b_down=b_down,
        activation=activation,
    )
    return moe_unpermute(y_perm, routing, weights)


# ------------------------------------------------------------------------- target attention
# Up to this many runs of candidates sharing a sequence (serving: one run per request in the
# batch), the attention runs one sequence at a time as two matmuls over its valid items, instead
# of gathering every candidate's keys and values (B x L x H x d copies: at 256 candidates and 256
# items, 20x the time of the model without the sequence).
_RUNS_PER_SEQUENCE_LOOP = 64


def _attend_runs(q, k, v, lengths, runs, counts, scale) -> Tensor:
    """``target_attention`` for candidates in runs sharing a sequence (``seq_of`` sorted into
    runs): per run, ``softmax(scale * q k^T) v`` over the sequence's ``lengths[s]`` items."""
    outs, start = [], 0
    lens = lengths.tolist()
    for s, n in zip(runs, counts):
        qs = q[start : start + n].float()  # [n, H, d]
        m = int(lens[s])
        if m == 0:
            outs.append(torch.zeros_like(qs))
        else:
            ks, vs = k[s, :m].float(), v[s, :m].float()  # [m, H, d]
            p = torch.softmax(torch.einsum("nhd,mhd->hnm", qs, ks) * scale, dim=-1)
            outs.append(torch.einsum("hnm,mhd->nhd", p, vs))
        start += n
    return torch.cat(outs).to(q.dtype)


def target_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    seq_of: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of each candidate's query over its behaviour sequence (padded, with lengths).

    Args:
        q: ``[B, H, d]`` one query per candidate and head.
        k, v: ``[S, L, H, d]`` keys and values of S padded sequences of at most L items.
        lengths: ``[S]`` int, items of each sequence (positions ``>= lengths[s]`` are padding).
        seq_of: ``[B]`` int, the sequence of each candidate (default ``arange(B)``, S = B); in
            serving the candidates of one request share one sequence, computed once.
        scale: score scale (default ``1 / sqrt(d)``).

    Returns ``[B, H, d]``: ``out[b, h] = sum_{l < n} p_l v[s, l, h]`` with
    ``p = softmax_l(scale * q[b, h] . k[s, l, h])``, ``s = seq_of[b]``, ``n = lengths[s]``;
    zeros for an empty sequence. Math in fp32, output in ``q``'s dtype.
    """
    B, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if seq_of is not None and B and not grad:  # inference (serving): one sequence at a time
        runs, counts = torch.unique_consecutive(seq_of, return_counts=True)
        if runs.numel() <= _RUNS_PER_SEQUENCE_LOOP:
            return _attend_runs(q, k, v, lengths, runs.tolist(), counts.tolist(), scale)
    if seq_of is None:
        seq_of = torch.arange(B, device=q.device)
    pos = torch.arange(k.shape[1], device=q.device)
    valid = pos[None, :] < lengths[seq_of].to(pos.dtype)[:, None]  # [B, L]
    pad = ~valid[:, :, None, None]  # padding is never read (nor differentiated), even if NaN
    kk = k[seq_of].float().masked_fill(pad, 0.0)  # [B, L, H, d]
    vv = v[seq_of].float().masked_fill(pad, 0.0)
    s = torch.einsum("bhd,blhd->bhl", q.float(), kk) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # an empty sequence: every score -inf
    return torch.einsum("bhl,blhd->bhd", p, vv).to(q.dtype)
