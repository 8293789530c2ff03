"""mixrank kernels: token mixing + norm and MoE routing ops, each with a Triton kernel, a PyTorch
reference twin (``kernels.reference``) and autograd.

Dispatch (``kernels.dispatch``): Triton for CUDA tensors, the reference for CPU tensors;
``MIXRANK_KERNELS=torch|triton`` overrides (``triton`` on CPU needs ``TRITON_INTERPRET=1``).

    token_mix(x [B, T, D], H) -> [B, H, T*D/H]     token_revert(y, T) -> [B, T, D]
    mix_norm(x, H, weight, bias=None, *, residual=None, revert=False, norm="rms", eps=1e-6)
        -> (z, Norm(z))
    topk_gate(logits [N, E], k, *, renormalize=True) -> (weights [N, k], ids [N, k])
    relu_gate(logits [N, E]) -> (gates [N, E], ids [N, E], l1 [N])
    moe_permute(ids [N, k], G) -> MoERouting(row_index [M], slot_of [N, k], offsets [G+1], M)
    moe_gather(x [N, D], routing) -> x_perm [M, D]
    grouped_ffn(x_perm [M, D], offsets [G+1], w_up, w_down, *, w_gate, b_up, b_down, activation)
    moe_unpermute(y_perm [M, D], routing, weights [N, k]) -> [N, D]
    moe_ffn(x [N, D], weights [N, k], ids [N, k], w_up, w_down, ...) -> [N, D]
    grouped_linear_fp8(x_perm [M, K], offsets [G+1], w8 [G, K, N] e4m3, w_scale [G, N],
        *, bias=None) -> [M, N]   (serving; weights from reference.fp8_quantize_weight)
    target_attention(q [B, H, d], k [S, L, H, d], v [S, L, H, d], lengths [S], seq_of [B])
        -> [B, H, d]
    backend(device=None) -> "triton" | "torch"
"""

from __future__ import annotations

# The Triton op modules live in ``kernels.triton_ops`` (imported lazily by the dispatch), so
# these names are always the dispatching functions.
from .dispatch import (
    backend,
    grouped_ffn,
    grouped_linear_fp8,
    mix_norm,
    moe_ffn,
    moe_gather,
    moe_permute,
    moe_unpermute,
    relu_gate,
    target_attention,
    token_mix,
    token_revert,
    topk_gate,
)
from .reference import MoERouting

__all__ = [
    "MoERouting",
    "backend",
    "grouped_ffn",
    "grouped_linear_fp8",
    "mix_norm",
    "moe_ffn",
    "moe_gather",
    "moe_permute",
    "moe_unpermute",
    "relu_gate",
    "target_attention",
    "token_mix",
    "token_revert",
    "topk_gate",
]
