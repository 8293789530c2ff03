"""Int8 inference kernels for CPUs with AVX512-VNNI: per-token int8 GEMMs and whole int8 mixer
blocks (fp32 activations in and out), hand-written in ``kernels/cpu/int8_blocks.cpp`` and built
by setup.py into ``kernels/cpu/_int8*.so`` (``torch.ops.mixrank_int8``).

The arithmetic is ``kernels.cpu.int8``'s (per-output-channel int8 weights, activations
quantized per row at run time, exact int32 sums, the same rescale): ``linear`` gives the same
bytes as ``Int8PerToken``'s other routes. The blocks fuse everything between the GEMMs (token
mixing, norms, GELU / Swish, the activations' quantization, biases, residuals) on row blocks
that stay in the core's cache. Written by hand because oneDNN's u8s8 kernel, the fastest int8
GEMM torch exposes on the CPU, takes one call per token (tens of microseconds of fixed cost at
the mixers' small per-token shapes) and writes each fp32 intermediate through memory, which at
D = 256 cost int8 more than the GEMMs themselves (docs/BENCHMARKS.md, "Int8 dense inference").

    ops()      -> torch.ops.mixrank_int8, or None where unavailable (reason() says why)
    prepare(w_q int8 [T, K, N], scale [T, N], bias [T, N] | None) -> a prepared GEMM
    linear(x [T, B, K] fp32, prepared, relu=False) -> [T, B, N] fp32
    grouped_linear(x [M, K] fp32, prepared, offsets [G + 1]) -> [M, N] fp32 (MoE experts)
    rankmixer_block(x [T, B, D] fp32, norm1, g1, g2, norm2, rms) -> [T, B, D] fp32
    swiglu_stage(z, r [T, B, W] fp32, norm, gate_up, down) -> r + pSwiGLU(RMSNorm(z))
    unimixer_ffn(xbar, ybar [B, T, D] fp32, norm_y, norm_x, gate_up, down) -> (xbar', ybar')

``MIXRANK_CPU_KERNELS=0`` turns them off (as ``kernels.cpu``'s bf16 ops). On CPUs with
AMX-INT8 the GEMMs run on AMX tiles instead (``backend()``; ``MIXRANK_INT8_AMX=0`` keeps them on
the VNNI tiles): the same operands, packing and rescale, the same bytes. That path also runs on
emulated tiles (``gemm_backend("amx_emulated")``), which is how it is tested without AMX.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from kernels.cpu import Library, _like_first, load_library

_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def _linear_out(x: Tensor, packed, corr, scale: Tensor, *args) -> Tensor:
    """``int8_linear``'s output: ``[T, B, N]`` fp32, ``N`` the scales' columns."""
    return x.new_empty((x.shape[0], x.shape[1], scale.shape[1]), dtype=torch.float32)


BACKENDS = ("vnni", "amx", "amx_emulated")  # the GEMM the ops run: gemm_backend(kind)
_AMX = {"why": "the library is not loaded"}  # why the GEMMs are not on AMX tiles


def _use_amx(lib) -> None:
    """Where the CPU has AMX-INT8 (and ``MIXRANK_INT8_AMX`` is not 0), the ops' GEMMs run on
    AMX tiles (``int8_blocks.cpp``'s ``gemm_amx``: the same bytes); else on the VNNI tiles,
    with why kept for ``amx_reason()``."""
    import os

    from kernels.cpu import _cpu_flags

    if os.environ.get("MIXRANK_INT8_AMX", "1") == "0":
        _AMX["why"] = "turned off by MIXRANK_INT8_AMX=0"
    elif not {"amx_tile", "amx_int8"} <= _cpu_flags():
        _AMX["why"] = "this CPU lacks AMX-INT8"
    else:
        try:
            lib.gemm_backend(1)
            _AMX["why"] = ""
        except RuntimeError as e:  # the kernel refused the tile state; a build without AMX
            _AMX["why"] = str(e).splitlines()[0]


def _grouped_out(x: Tensor, packed, corr, scale: Tensor, *args) -> Tensor:
    """``int8_grouped_linear``'s output: ``[M, N]`` fp32."""
    return x.new_empty((x.shape[0], scale.shape[1]), dtype=torch.float32)


def _two_like_first(x: Tensor, *args) -> tuple[Tensor, Tensor]:
    """``int8_unimixer_ffn``'s outputs: both streams, each of ``xbar``'s shape."""
    return _like_first(x), _like_first(x)


def _load():
    lib, why = load_library(
        "kernels.cpu._int8", "mixrank_int8", _FLAGS, "AVX512-VNNI",
        "the library reports this CPU lacks AVX512-VNNI",
        fakes={"int8_linear": _linear_out, "int8_rankmixer_block": _like_first,
               "int8_swiglu_stage": _like_first, "int8_unimixer_ffn": _two_like_first,
               "int8_grouped_linear": _grouped_out},
    )  # fmt: skip
    if lib is not None:
        _use_amx(lib)
    return lib, why


LIBRARY = Library(_load)
ops, reason = LIBRARY.ops, LIBRARY.reason  # torch.ops.mixrank_int8 or None; why it is None


def backend() -> str:
    """The GEMM the ops run: ``vnni`` (AVX512-VNNI tiles), ``amx`` (AMX-INT8 tiles, where the
    CPU has them) or ``amx_emulated`` (the AMX path on emulated tiles: tests). The AMX path
    takes GEMMs whose K (padded to 4) is a multiple of 64 and N (padded to 16) of 32; the
    others run on the VNNI tiles. Every backend gives the same bytes."""
    return BACKENDS[ops().gemm_backend(-1)]


def amx_reason() -> str:
    """Why the GEMMs do not run on AMX tiles ("" where they do)."""
    ops()
    return _AMX["why"]


@contextlib.contextmanager
def gemm_backend(name: str):
    """``with gemm_backend("amx_emulated"): ...`` runs the ops' GEMMs on that backend inside
    the block (process-wide: for tests and benchmarks), restoring the previous one after."""
    if name not in BACKENDS:
        raise ValueError(f"gemm_backend: expected one of {BACKENDS}, got {name!r}")
    prev = ops().gemm_backend(BACKENDS.index(name))
    try:
        yield
    finally:
        ops().gemm_backend(prev)


class Prepared(NamedTuple):
    """One GEMM per token, as the kernels take it: the int8 weights packed as
    ``[T, N/16, K/4, 16, 4]`` (zero-padded), ``-128 * sum_k w_q`` per column (int32 ``[T, N']``:
    the activations' zero point taken back out), the scales ``[T, N]``, the bias ``[T, N]``
    (empty without one) and ``K``."""

    packed: Tensor
    corr: Tensor
    scale: Tensor
    bias: Tensor
    k: int


def prepare(w_q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Prepared:
    """``w_q`` int8 ``[T, K, N]`` (per-output-channel ``scale [T, N]``, ``bias [T, N]`` or None)
    packed for ``linear`` and the blocks. Once per set of weights, not per call."""
    if w_q.dtype != torch.int8 or w_q.dim() != 3:
        raise ValueError(f"vnni.prepare: w_q: expected int8 [T, K, N], got {w_q.dtype} {w_q.shape}")
    t, k, n = w_q.shape
    kp, np_ = -(-k // 4) * 4, -(-n // 16) * 16
    q = torch.zeros(t, kp, np_, dtype=torch.int8)  # zero-padded to K % 4 == 0, N % 16 == 0
    q[:, :k, :n] = w_q
    # [t, K/4, 4, N/16, 16] -> [t, N/16, K/4, 16, 4]: a 16-column group's 4 k of each column
    packed = q.view(t, kp // 4, 4, np_ // 16, 16).permute(0, 3, 1, 4, 2).contiguous()
    packed = packed.view(t, np_ // 16, kp // 4, 64)
    corr = q.sum(dim=1, dtype=torch.int32).mul_(-128)  # the zero point 128, taken back out
    b = torch.empty(0) if bias is None else bias.detach().float().reshape(t, n).contiguous()
    return Prepared(packed, corr, scale.detach().float().reshape(t, n).contiguous(), b, k)


ROW_BLOCK = 48  # rows per (token, block) work item: 8 micro-tiles of 6 rows


def linear(x: Tensor, p: Prepared, row_block: int = ROW_BLOCK, relu: bool = False) -> Tensor:
    """Per-token ``x [T, B, K]`` fp32 (each row quantized to int8 here) times the prepared int8
    weights: ``[T, B, N]`` fp32, the same bytes as ``kernels.cpu.int8.Int8PerToken``; with
    ``relu``, ``torch.relu`` of it, applied as the product is stored."""
    return ops().int8_linear(x.float(), *p, int(row_block), bool(relu))


def grouped_linear(
    x: Tensor, p: Prepared, offsets: Tensor, row_block: int = ROW_BLOCK, relu: bool = False
) -> Tensor:
    """Grouped GEMMs (the MoE experts): rows ``offsets[g] .. offsets[g + 1]`` of ``x [M, K]``
    fp32 times group ``g``'s prepared int8 weights (``prepare`` of ``[G, K, N]``), each row
    quantized as ``linear`` quantizes it: ``[M, N]`` fp32, rows outside every group 0."""
    return ops().int8_grouped_linear(
        x.float(), *p[:4], p.k, offsets.to(torch.int64), int(row_block), bool(relu)
    )


def rankmixer_supports(num_tokens: int, dim: int) -> bool:
    """Whether ``rankmixer_block`` takes a block of these shapes (H = T heads)."""
    return dim % num_tokens == 0 and dim % 16 == 0


def rankmixer_block(
    x: Tensor,
    norm1: tuple[Tensor, Tensor | None, float],
    g1: Prepared,
    g2: Prepared,
    norm2: tuple[Tensor, Tensor | None, float],
    rms: bool,
    row_block: int = ROW_BLOCK,
) -> Tensor:
    """``Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)`` with ``S = Norm1(Mix(X) + X)`` on
    token-major fp32 ``x [T, B, D]``, both GEMMs in int8 (``g1``, ``g2`` from ``prepare``);
    ``norm*`` are ``(weight, bias or None, eps)`` in fp32. Exact GELU (erf to 3e-7)."""
    (w1, b1, e1), (w2, b2, e2) = norm1, norm2
    empty = torch.empty(0)
    return ops().int8_rankmixer_block(
        x.float(), w1, empty if b1 is None else b1, float(e1), *g1, *g2,
        w2, empty if b2 is None else b2, float(e2), bool(rms), int(row_block),
    )  # fmt: skip


def swiglu_supports(width: int) -> bool:
    """Whether ``swiglu_stage`` takes a stage of this token width."""
    return width % 16 == 0


def swiglu_stage(
    z: Tensor,
    r: Tensor,
    norm: tuple[Tensor, float],
    gate_up: Prepared,
    down: Prepared,
    row_block: int = ROW_BLOCK,
) -> Tensor:
    """``r + W_down,t (Swish(W_gate,t s_t) * W_up,t s_t)`` with ``s = RMSNorm(z)`` per token
    ``t``, on token-major fp32 ``z, r [T, B, W]``, the GEMMs in int8 (``gate_up`` with the gate
    columns first, both bias-free, from ``prepare``)."""
    g, eps = norm
    return ops().int8_swiglu_stage(
        z.float(),
        r.float(),
        g,
        float(eps),
        *gate_up[:3],
        gate_up.k,
        *down[:3],
        down.k,
        int(row_block),
    )


def unimixer_ffn(
    xbar: Tensor,
    ybar: Tensor,
    norm_y: tuple[Tensor, float],
    norm_x: tuple[Tensor, float],
    gate_up: Prepared,
    down: Prepared,
    row_block: int = ROW_BLOCK,
) -> tuple[Tensor, Tensor]:
    """UniMixer's FFN sub-layer on its SiameseNorm streams ``xbar, ybar [B, T, D]`` fp32:
    ``O = W_down,t (Swish(W_gate,t z) * W_up,t z)`` with ``z = xbar + RMSNorm_y(ybar)``, returns
    ``(RMSNorm_x(xbar + O), ybar + O)``; the GEMMs in int8 (``gate_up`` with the gate columns
    first, both bias-free, from ``prepare``); ``norm_*`` are ``(weight, eps)``."""
    (gy, ey), (gx, ex) = norm_y, norm_x
    return ops().int8_unimixer_ffn(
        xbar.float(), ybar.float(), gy, float(ey), gx, float(ex),
        *gate_up[:3], gate_up.k, *down[:3], down.k, int(row_block),
    )  # fmt: skip
