"""Token mixing: RankMixer's TokenMixing, TokenMixer-Large's MixRevert, UniMixer's UniMixing(-Lite).

TokenMixing and MixRevert are parameter-free and go through ``kernels.token_mix`` /
``kernels.token_revert`` (the blocks use the fused ``kernels.mix_norm``). UniMixing is a learned,
Sinkhorn-normalised mixing that contains TokenMixing as the special case of a permutation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import kernels

from .config import temperature_at


class TokenMixing(nn.Module):
    """RankMixer multi-head token mixing with H = T (parameter-free): ``[B, T, D] -> [B, T, D]``.

    Token t is split into T heads of width d = D / T; new token h is the concatenation over t of
    head h of token t: ``out[b, h, t*d:(t+1)*d] = x[b, t, h*d:(h+1)*d]``. It is its own inverse.
    """

    def __init__(self, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens

    def forward(self, x: Tensor) -> Tensor:
        return kernels.token_mix(x, self.num_tokens)


class MixRevert(nn.Module):
    """TokenMixer-Large mix and revert with H heads independent of T.

    ``mix``: ``[B, T, D] -> [B, H, T*D/H]``; ``revert``: ``[B, H, T*D/H] -> [B, T, D]``, its exact
    inverse, so each token regains its meaning after the per-token stage on mixed tokens.
    """

    def __init__(self, num_tokens: int, num_heads: int):
        super().__init__()
        self.num_tokens, self.num_heads = num_tokens, num_heads

    def mix(self, x: Tensor) -> Tensor:
        return kernels.token_mix(x, self.num_heads)

    def revert(self, y: Tensor) -> Tensor:
        return kernels.token_revert(y, self.num_tokens)

    def forward(self, x: Tensor) -> Tensor:
        """``revert(mix(x))`` (the identity; the blocks put per-token stages in between)."""
        return self.revert(self.mix(x))


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in log space: ``[..., n, n]`` logits -> doubly stochastic ``exp`` matrix.

    Alternates row and column normalisation ``iters`` times (ending with columns, so columns sum
    to 1 exactly and rows to within the convergence error). Computed in fp32.
    """
    z = logits.float()
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
    return z.exp()


def symmetric_sinkhorn(w: Tensor, tau: Tensor | float, iters: int) -> Tensor:
    """UniMixer's mixing matrix: ``Sinkhorn(((W + W^T) / 2) / tau)`` over the last two dims."""
    return sinkhorn((w + w.transpose(-1, -2)) / 2 / tau, iters)


class _SinkhornMixing(nn.Module):
    """Shared plumbing: flatten order, block shapes, the temperature buffer."""

    def __init__(self, num_tokens: int, dim: int, block_size: int, iters: int, flatten: str):
        super().__init__()
        L = num_tokens * dim
        if L % block_size:
            raise ValueError(f"model.block_size: B={block_size} must divide T*D={L}")
        if flatten not in ("channel_major", "token_major"):
            raise ValueError(
                f"model.flatten: expected channel_major or token_major, got {flatten!r}"
            )
        self.num_tokens, self.dim, self.block_size = num_tokens, dim, block_size
        self.num_blocks = L // block_size
        self.iters, self.flatten = iters, flatten
        self.register_buffer("tau", torch.tensor(1.0))
        self._cache = None

    def set_temperature(self, tau: float) -> None:
        """Set the Sinkhorn temperature (annealed 1.0 -> 0.05 during training; kept for serving)."""
        self.tau.fill_(float(tau))

    def _flatten(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, n, Bk]``: channel-major flattens X^T (index d*T + t), token-major X."""
        B = x.shape[0]
        if self.flatten == "channel_major":
            x = x.transpose(1, 2)
        return x.reshape(B, self.num_blocks, self.block_size)

    def _unflatten(self, f: Tensor) -> Tensor:
        """``[B, n, Bk] -> [B, T, D]`` read token-major in both modes (as the authors' code does).
        With identity mixing, channel-major flattening is a fixed token-mixing permutation: new
        token i holds channels ``i*D/T .. (i+1)*D/T`` of every input token (the same set as
        RankMixer's head mixing with H = T), interleaved by token instead of grouped by token;
        it equals head mixing exactly only when D = T."""
        return f.reshape(f.shape[0], self.num_tokens, self.dim)

    def mix_flat(self, blocks: Tensor, local: Tensor, glob: Tensor) -> Tensor:
        """``blocks [B, n, Bk]``, ``local [n, Bk, Bk]``, ``glob [n, n]`` -> ``[B, n, Bk]``:
        ``h_i = x_i W_B^i`` then ``out = W_G H``."""
        h = torch.bmm(blocks.transpose(0, 1), local.to(blocks.dtype))  # [n, B, Bk]
        out = torch.matmul(glob.to(h.dtype), h.flatten(1))  # [n, B*Bk]
        return out.view_as(h).transpose(0, 1)

    def mixing_matrices(self) -> tuple[Tensor, Tensor]:
        """``matrices()``, reused across calls without autograd while the parameters, their
        storage and tau are unchanged (a micro-batched eval forward normalises once, not once
        per chunk; training always recomputes)."""
        if torch.is_grad_enabled():
            self._cache = None
            return self.matrices()
        key = (float(self.tau), *((p.data_ptr(), p._version, p.dtype) for p in self.parameters()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.matrices())
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        local, glob = self.mixing_matrices()
        return self._unflatten(self.mix_flat(self._flatten(x), local, glob))


class UniMixing(_SinkhornMixing):
    """UniMixer's learnable mixing: ``[B, T, D] -> [B, T, D]``.

    Flatten X (L = T*D) into n = L / Bk blocks of size Bk; local mixing ``h_i = x_i W_B^i`` with
    ``W_B^i = Sinkhorn(((W_i + W_i^T)/2)/tau)`` (``[Bk, Bk]`` per block), global mixing
    ``out = W_G H`` with ``W_G = Sinkhorn(((W + W^T)/2)/tau)`` (``[n, n]``). Sinkhorn runs in
    training and in eval alike. Params n^2 + n Bk^2.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        block_size: int,
        iters: int = 10,
        flatten: str = "channel_major",
    ):
        super().__init__(num_tokens, dim, block_size, iters, flatten)
        n, Bk = self.num_blocks, block_size
        self.local_logits = nn.Parameter(torch.randn(n, Bk, Bk))
        self.global_logits = nn.Parameter(torch.randn(n, n))

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(local [n, Bk, Bk], global [n, n])``, both doubly stochastic."""
        return (
            symmetric_sinkhorn(self.local_logits, self.tau, self.iters),
            symmetric_sinkhorn(self.global_logits, self.tau, self.iters),
        )


class UniMixingLite(_SinkhornMixing):
    """UniMixing-Lite: local matrices from b shared bases, a rank-r global matrix.

    ``W_B^i = Sinkhorn(sym(sum_l c_il Z_l) / tau)`` with bases ``Z [b, Bk, Bk]`` and coefficients
    ``c [n, b]``; ``W_G = Sinkhorn(sym(A_G B_G) / tau)`` with ``A_G [n, r]``, ``B_G [r, n]``
    (sym(M) = (M + M^T)/2, kept as in UniMixing). Params b Bk^2 + n b + 2 n r.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        block_size: int,
        iters: int = 10,
        flatten: str = "channel_major",
        num_bases: int = 4,
        rank: int = 8,
    ):
        super().__init__(num_tokens, dim, block_size, iters, flatten)
        n, Bk = self.num_blocks, block_size
        self.bases = nn.Parameter(torch.randn(num_bases, Bk, Bk))
        self.coeffs = nn.Parameter(torch.randn(n, num_bases) / num_bases**0.5)
        self.global_a = nn.Parameter(torch.randn(n, rank) / rank**0.25)
        self.global_b = nn.Parameter(torch.randn(rank, n) / rank**0.25)

    def matrices(self) -> tuple[Tensor, Tensor]:
        local = torch.einsum("nl,lij->nij", self.coeffs, self.bases)
        return (
            symmetric_sinkhorn(local, self.tau, self.iters),
            symmetric_sinkhorn(self.global_a @ self.global_b, self.tau, self.iters),
        )


def set_temperature(model: nn.Module, tau: float) -> None:
    """Set the Sinkhorn temperature of every UniMixing(-Lite) in ``model``."""
    for m in model.modules():
        if isinstance(m, _SinkhornMixing):
            m.set_temperature(tau)


def anneal_temperature(
    model: nn.Module, step: int, total_steps: int, start: float = 1.0, end: float = 0.05
) -> float:
    """Linear schedule ``start -> end`` over ``total_steps``; sets and returns the temperature."""
    tau = temperature_at(step, total_steps, start, end)
    set_temperature(model, tau)
    return tau
