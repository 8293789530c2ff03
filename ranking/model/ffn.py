"""Per-token feed-forward stages: PerTokenFFN (RankMixer), PerTokenSwiGLU (TokenMixer-Large,
UniMixer) and SparsePerTokenMoE (both published forms, routed through ``kernels.moe_ffn``).

Per-token means every token t has its own weights; the T small GEMMs run as one batched GEMM
(``baddbmm`` over the token dim), never as a Python loop over tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels


def _uniform_(w: Tensor, fan_in: int, scale: float = 1.0) -> Tensor:
    """nn.Linear's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), times ``scale``."""
    bound = scale / math.sqrt(fan_in)
    return nn.init.uniform_(w, -bound, bound)


def _per_token(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x [B, T, Din]``, ``w [T, Din, Dout]``, ``b [T, Dout]`` -> ``[T, B, Dout]`` (token-major)."""
    xt = x.transpose(0, 1)
    if b is None:
        return torch.bmm(xt, w)
    return torch.baddbmm(b.unsqueeze(1), xt, w)


class PerTokenFFN(nn.Module):
    """RankMixer's PFFN: per token t, ``W2_t GELU(W1_t s + b1_t) + b2_t``: ``[B, T, D] -> [B, T, D]``.

    Weights ``w1 [T, D, kD]``, ``w2 [T, kD, D]`` (not shared across tokens).
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int):
        super().__init__()
        T, D = num_tokens, dim
        self.w1 = nn.Parameter(_uniform_(torch.empty(T, D, hidden), D))
        self.b1 = nn.Parameter(torch.zeros(T, hidden))
        self.w2 = nn.Parameter(_uniform_(torch.empty(T, hidden, D), hidden))
        self.b2 = nn.Parameter(torch.zeros(T, D))

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(_per_token(x, self.w1, self.b1))  # [T, B, kD]
        y = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # [T, B, D]
        return y.transpose(0, 1)


class PerTokenSwiGLU(nn.Module):
    """Per-token SwiGLU (TokenMixer-Large's pSwiGLU), bias-free: ``[B, T, W] -> [B, T, W]``.

    ``y_t = W_down,t (Swish(W_gate,t x_t) * W_up,t x_t)``; gate and up are stored fused as
    ``w_gate_up [T, W, 2*Hd]`` (gate first); ``w_down [T, Hd, W]`` is initialised at
    ``down_init_scale`` (0.01) times the default, up and gate at 1.
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, down_init_scale: float = 0.01):
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = nn.Parameter(_uniform_(torch.empty(num_tokens, dim, 2 * hidden), dim))
        self.w_down = nn.Parameter(
            _uniform_(torch.empty(num_tokens, hidden, dim), hidden, down_init_scale)
        )

    def forward(self, x: Tensor) -> Tensor:
        gate, up = _per_token(x, self.w_gate_up).split(self.hidden, dim=-1)  # [T, B, Hd] each
        return torch.bmm(F.silu(gate) * up, self.w_down).transpose(0, 1)


class SparsePerTokenMoE(nn.Module):
    """Sparse per-token MoE: ``[B, T, W] -> ([B, T, W], aux scalar)``.

    Every token t owns E experts (global expert id ``t*E + e``) and its own router; the routed
    computation goes through ``kernels.moe_ffn`` (only the active (row, expert) pairs are
    computed).

    ``kind="rankmixer"``: GELU experts with biases, ReLU gate ``G = ReLU(h(s))``, output
    ``sum_e G_e FFN_e(s)``, aux = ``l1_weight * sum(G_infer)`` per sample. With DTSI two routers
    ``h_train`` and ``h_infer``: eval uses ``h_infer`` only; training combines them per
    ``dtsi_train_mode`` (``average``, ``sum``, ``train_router``) and puts the L1 only on h_infer.

    ``kind="tokenmixer_large"``: bias-free SwiGLU sub-experts of hidden ``expert_hidden``
    (nD/E), top-k softmax gate (softmax over the k chosen logits), output
    ``alpha * sum_topk g_e E_e(x) + E_shared(x)``, the same routing in training and eval; aux 0.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        num_experts: int,
        expert_hidden: int,
        kind: str = "rankmixer",
        top_k: int = 2,
        renormalize: bool = True,
        shared_expert: bool = True,
        alpha: float = 1.0,
        l1_weight: float = 1e-4,
        dtsi: bool = True,
        dtsi_train_mode: str = "average",
        down_init_scale: float = 0.01,
    ):
        super().__init__()
        T, D, E, Hd = num_tokens, dim, num_experts, expert_hidden
        self.num_tokens, self.num_experts, self.kind = T, E, kind
        self.top_k, self.alpha, self.l1_weight = top_k, alpha, l1_weight
        self.renormalize = renormalize
        self.dtsi, self.dtsi_train_mode = dtsi and kind == "rankmixer", dtsi_train_mode
        G = T * E
        self.w_up = nn.Parameter(_uniform_(torch.empty(G, D, Hd), D))
        if kind == "rankmixer":
            self.w_gate = None
            self.b_up = nn.Parameter(torch.zeros(G, Hd))
            self.w_down = nn.Parameter(_uniform_(torch.empty(G, Hd, D), Hd))
            self.b_down = nn.Parameter(torch.zeros(G, D))
            self.router_infer = nn.Parameter(_uniform_(torch.empty(T, D, E), D))
            self.router_infer_bias = nn.Parameter(torch.zeros(T, E))
            if self.dtsi:
                self.router_train = nn.Parameter(_uniform_(torch.empty(T, D, E), D))
                self.router_train_bias = nn.Parameter(torch.zeros(T, E))
            self.shared = None
        elif kind == "tokenmixer_large":
            self.w_gate = nn.Parameter(_uniform_(torch.empty(G, D, Hd), D))
            self.b_up = self.b_down = None
            self.w_down = nn.Parameter(_uniform_(torch.empty(G, Hd, D), Hd, down_init_scale))
            self.router_infer = nn.Parameter(_uniform_(torch.empty(T, D, E), D))
            self.router_infer_bias = None
            self.shared = PerTokenSwiGLU(T, D, Hd, down_init_scale) if shared_expert else None
        else:
            raise ValueError(
                f"model.moe.kind: expected rankmixer or tokenmixer_large, got {kind!r}"
            )

    def _logits(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Per-token router: ``[B, T, W] -> [B*T, E]`` (row n is sample n // T, token n % T)."""
        return _per_token(x, w, b).transpose(0, 1).reshape(-1, self.num_experts)

    def _global_ids(self, ids: Tensor) -> Tensor:
        """Local expert ids ``[B*T, k]`` (-1 = none) -> global ids ``t*E + e``."""
        T, E = self.num_tokens, self.num_experts
        tok = torch.arange(ids.shape[0], device=ids.device).remainder(T).unsqueeze(1)
        return torch.where(ids >= 0, ids + tok * E, ids)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, W] -> (weights [B*T, k], global ids [B*T, k], aux scalar)``."""
        B = x.shape[0]
        logits = self._logits(x, self.router_infer, self.router_infer_bias)
        if self.kind == "tokenmixer_large":
            weights, ids = kernels.topk_gate(logits, self.top_k, renormalize=self.renormalize)
            return weights * self.alpha, self._global_ids(ids), logits.new_zeros(())
        gates, ids, l1 = kernels.relu_gate(logits)
        aux = self.l1_weight * l1.float().sum() / B
        if self.dtsi and self.training:
            g_train, _, _ = kernels.relu_gate(
                self._logits(x, self.router_train, self.router_train_bias)
            )
            if self.dtsi_train_mode == "train_router":
                gates = g_train
            elif self.dtsi_train_mode == "sum":
                gates = g_train + gates
            else:
                gates = (g_train + gates) / 2
            experts = torch.arange(self.num_experts, device=x.device).expand_as(gates)
            ids = torch.where(gates > 0, experts, torch.full_like(experts, -1))
        return gates, self._global_ids(ids), aux

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, W = x.shape
        weights, ids, aux = self.route(x)
        flat = x.reshape(B * T, W)
        w_up, w_down, w_gate = self.w_up, self.w_down, self.w_gate
        b_up, b_down = self.b_up, self.b_down
        if torch.is_autocast_enabled(x.device.type):  # moe_ffn's matmuls are explicit tensors
            dt = torch.get_autocast_dtype(x.device.type)
            flat, w_up, w_down = flat.to(dt), w_up.to(dt), w_down.to(dt)
            w_gate = None if w_gate is None else w_gate.to(dt)
            b_up = None if b_up is None else b_up.to(dt)
            b_down = None if b_down is None else b_down.to(dt)
            weights = weights.to(dt)
        y = kernels.moe_ffn(
            flat,
            weights,
            ids,
            w_up,
            w_down,
            w_gate=w_gate,
            b_up=b_up,
            b_down=b_down,
            activation="gelu" if self.kind == "rankmixer" else "swiglu",
            all_routed=self.kind == "tokenmixer_large",  # top-k: every pair has an expert
        ).view(B, T, W)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, aux


def make_ffn(num_tokens: int, dim: int, mult: float, cfg, swiglu: bool) -> nn.Module:
    """The per-token stage a block uses: dense (PerTokenFFN / PerTokenSwiGLU) or the MoE.

    Returns a module mapping ``[B, T, W] -> ([B, T, W], aux)``.
    """
    m = cfg.moe
    if m.enabled:
        return SparsePerTokenMoE(
            num_tokens,
            dim,
            m.num_experts,
            int(m.expert_mult * dim),
            kind=m.kind,
            top_k=m.top_k,
            renormalize=m.renormalize,
            shared_expert=m.shared_expert,
            alpha=m.alpha,
            l1_weight=m.l1_weight,
            dtsi=m.dtsi,
            dtsi_train_mode=m.dtsi_train_mode,
            down_init_scale=cfg.down_init_scale,
        )
    hidden = int(mult * dim)
    inner = (
        PerTokenSwiGLU(num_tokens, dim, hidden, cfg.down_init_scale)
        if swiglu
        else PerTokenFFN(num_tokens, dim, hidden)
    )
    return DenseStage(inner)


class DenseStage(nn.Module):
    """Wraps a dense per-token FFN to the MoE's ``(y, aux)`` interface (aux = 0)."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.ffn(x), x.new_zeros((), dtype=torch.float32)
