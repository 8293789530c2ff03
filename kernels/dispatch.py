"""The one dispatch point: Triton kernels for CUDA tensors, the PyTorch reference for CPU ones.

``MIXRANK_KERNELS`` (read at every call, so tests can flip it) overrides the choice:

- unset / ``auto``: Triton on CUDA tensors, the reference otherwise;
- ``torch``: always the reference;
- ``triton``: always Triton; on CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1``), otherwise a clear error is raised.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from . import reference as ref
from .reference import MoERouting

ENV = "MIXRANK_KERNELS"

# op name -> (module, attribute) of its Triton implementation (same signature as the reference).
_TRITON_SOURCES = {
    "token_mix": ("token_mix", "token_mix"),
    "token_revert": ("token_mix", "token_revert"),
    "mix_norm": ("mix_norm", "mix_norm"),
    "topk_gate": ("moe_gate", "topk_gate"),
    "relu_gate": ("moe_gate", "relu_gate"),
    "moe_permute": ("moe_permute", "moe_permute"),
    "moe_gather": ("moe_permute", "moe_gather"),
    "grouped_linear_fp8": ("grouped_ffn", "grouped_linear_fp8"),
    "grouped_ffn": ("grouped_ffn", "grouped_ffn"),
    "moe_unpermute": ("moe_unpermute", "moe_unpermute"),
    "target_attention": ("target_attention", "target_attention"),
}
_TRITON: dict[str, Callable] = {}
_TRITON_LOCK = threading.Lock()  # serving runs forwards in threads: load the modules once


def _load_triton() -> None:
    """Import the Triton op modules (``kernels.triton_ops``) on first use, so that
    ``import kernels`` (and every CPU run on the reference) never imports triton: Triton's
    interpreter must be switched on (env ``TRITON_INTERPRET=1``) before the first
    ``import triton``, which a test may do later."""
    _TRITON.update(
        {
            name: getattr(importlib.import_module(f"{__package__}.triton_ops.{mod}"), attr)
            for name, (mod, attr) in _TRITON_SOURCES.items()
        }
    )


def _interpreter_problem() -> str | None:
    """Why Triton kernels cannot run on the CPU now (None: the interpreter is usable)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return "needs Triton's interpreter: set TRITON_INTERPRET=1"
    std = sys.modules.get("triton.language.standard")
    if std is not None and type(std.max).__name__ != "InterpretedFunction":
        return (
            "needs Triton's interpreter, but triton was imported before TRITON_INTERPRET=1 was "
            "set: set it before the first `import triton` (e.g. in the environment)"
        )
    return None


def _mode() -> str:
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: expected 'torch', 'triton' or unset")
    return mode


def _choose(device: torch.device) -> str:
    mode = _mode()
    if mode == "torch":
        return "torch"
    if mode == "triton":
        problem = None if device.type == "cuda" else _interpreter_problem()
        if problem:
            raise RuntimeError(
                f"{ENV}=triton with {device.type} tensors {problem}; or unset {ENV} (or set "
                f"{ENV}=torch) to use the PyTorch reference"
            )
        return "triton"
    return "triton" if device.type == "cuda" else "torch"


def backend(device: torch.device | str | None = None) -> str:
    """``"triton"`` or ``"torch"``: what the dispatch picks for tensors on ``device`` now.

    device defaults to ``cuda`` when a GPU is visible, else ``cpu``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _choose(torch.device(device))


def _impl(name: str, t: Tensor) -> Callable:
    if _choose(t.device) == "torch":
        return getattr(ref, name)
    if not _TRITON:
        with _TRITON_LOCK:
            if not _TRITON:
                _load_triton()
    return _TRITON[name]


def token_mix(x: Tensor, num_heads: int) -> Tensor:
    """``x [B, T, D] -> [B, H, T*D/H]``; ``out[b, h, t*d:(t+1)*d] = x[b, t, h*d:(h+1)*d]``."""
    return _impl("token_mix", x)(x, num_heads)


def token_revert(y: Tensor, num_tokens: int) -> Tensor:
    """Exact inverse of ``token_mix``: ``[B, H, T*D/H] -> [B, T, D]``."""
    return _impl("token_revert", y)(y, num_tokens)


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
    """``z = mix(x) (or revert(x)) + residual``; returns ``(z, Norm(z))``. See reference.mix_norm."""
    return _impl("mix_norm", x)(
        x, num_heads, weight, bias, residual=residual, revert=revert, norm=norm, eps=eps
    )


def topk_gate(logits: Tensor, k: int, *, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """``logits [N, E] -> (weights [N, k], ids [N, k] int64)``. See reference.topk_gate."""
    return _impl("topk_gate", logits)(logits, k, renormalize=renormalize)


def relu_gate(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``logits [N, E] -> (gates [N, E], ids [N, E] (-1 = off), l1 [N])``."""
    return _impl("relu_gate", logits)(logits)


def moe_permute(ids: Tensor, num_experts: int, all_routed: bool = False) -> MoERouting:
    """Stable counting sort of (row, choice) pairs by expert: ``ids [N, k] -> MoERouting``.
    ``all_routed``: no id is -1 (top-k routing), so M = N*k needs no host sync."""
    return _impl("moe_permute", ids)(ids, num_experts, all_routed)


def moe_gather(x: Tensor, routing: MoERouting) -> Tensor:
    """``x [N, D] -> x_perm [M, D]``, ``x_perm[p] = x[routing.row_index[p]]``."""
    return _impl("moe_gather", x)(x, routing)


def grouped_linear_fp8(
    x_perm: Tensor,
    offsets: Tensor,
    w8: Tensor,
    w_scale: Tensor,
    *,
    bias: Tensor | None = None,
) -> Tensor:
    """Grouped linear on FP8 (e4m3) operands for serving: ``[M, K] -> [M, N]``. See reference."""
    return _impl("grouped_linear_fp8", x_perm)(x_perm, offsets, w8, w_scale, bias=bias)


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
    """Per-expert FFN over rows grouped by expert: ``[M, D] -> [M, D]``. See reference."""
    return _impl("grouped_ffn", x_perm)(
        x_perm,
        offsets,
        w_up,
        w_down,
        w_gate=w_gate,
        b_up=b_up,
        b_down=b_down,
        activation=activation,
    )


def target_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    seq_of: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``q [B, H, d]`` over ``k, v [S, L, H, d]`` with ``lengths [S]`` (candidate b reads
    sequence ``seq_of[b]``) -> ``[B, H, d]``. See reference.target_attention."""
    return _impl("target_attention", q)(q, k, v, lengths, seq_of, scale)


def moe_unpermute(y_perm: Tensor, routing: MoERouting, weights: Tensor) -> Tensor:
    """``out [N, D] = sum_j weights[n, j] * y_perm[slot_of[n, j]]`` (skip -1 slots)."""
    return _impl("moe_unpermute", y_perm)(y_perm, routing, weights)


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
    """Routed expert FFN ``x [N, D] -> [N, D]``: permute -> gather -> grouped_ffn -> unpermute.

    ``out[n] = sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])``; ids are global expert ids in
    ``[0, G)`` with ``G = w_up.shape[0]``, or -1 (``all_routed``: never -1, as with top-k
    routing; the routing then needs no host sync). Each stage goes through the dispatch.
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
