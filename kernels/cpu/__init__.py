"""Hand-written CPU kernels for bf16 inference: the whole RankMixer block in one C++ op, and
each of TokenMixer-Large's two pSwiGLU stages (RMSNorm, gate/up GEMM, Swish * up, down GEMM,
residual) in one.

``kernels/cpu/mixer_blocks.cpp`` is built by setup.py into ``kernels/cpu/_block*.so`` (a
plain shared library registering ``torch.ops.mixrank_cpu``). Its two per-token GEMMs are
written in AMX intrinsics and everything between them (token mixing, residuals, both norms,
biases and exact GELU) runs in the GEMMs' prologue and epilogues on 32-row blocks that stay in
the core's cache. Written by hand because no route through the ecosystem fused it: Inductor's
C++ GEMM template and oneDNN's per-token linear + GELU post-op were both slower than the eager
``bmm`` (docs/BENCHMARKS.md), the torch wheel exports no oneDNN primitive API, and with oneDNN's
brgemm micro-kernel (which it does export) for the second GEMM the block ran slower than with the
hand-written loop.

    ops()      -> torch.ops.mixrank_cpu, or None where unavailable (reason() says why)
    prepare_rankmixer(norm1, w1, b1, w2, b2, norm2, rms) -> packed parameters (once per weights)
    rankmixer_block(x [T, B, D] bf16, prepared) -> [T, B, D] bf16
    prepare_swiglu(norm, w_gate_up, w_down) -> packed parameters (once per weights)
    swiglu_stage(z [T, B, W] bf16, r, prepared) -> r + pSwiGLU(RMSNorm(z))  (TokenMixer-Large)

Available on x86-64 Linux CPUs with AMX bf16 (Sapphire Rapids and later) where the library
was built; ``MIXRANK_CPU_KERNELS=0`` turns it off. Elsewhere callers run the eager path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

import torch
from torch import Tensor

_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512bw", "avx512vl", "avx512dq")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_library(
    module: str,
    namespace: str,
    flags: tuple[str, ...],
    needs: str,
    refused: str,
    fakes: dict | None = None,
) -> tuple[object | None, str]:
    """``(torch.ops.<namespace>, "")`` from the C++ library ``module`` (built by setup.py) where
    it is built, this CPU has ``flags`` (else why, naming ``needs``) and its ``available()``
    holds (else ``refused``); ``(None, why)`` otherwise. ``MIXRANK_CPU_KERNELS=0`` turns every
    library off. ``fakes``: op name -> its output's shape function, registered as the op's fake
    kernel so that ``torch.compile`` traces through the op (as an opaque call)."""
    if os.environ.get("MIXRANK_CPU_KERNELS", "1") == "0":
        return None, "turned off by MIXRANK_CPU_KERNELS=0"
    if not sys.platform.startswith("linux"):
        return None, f"built for x86-64 Linux only (this is {sys.platform})"
    missing = [f for f in flags if f not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)} (needs {needs})"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None, (
            f"the C++ library {module.replace('.', '/')} was not built (setup.py builds it where "
            "a C++ compiler is at hand: reinstall with g++ installed)"
        )
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:  # e.g. built against another torch
        return None, f"loading {spec.origin} failed: {e}"
    lib = getattr(torch.ops, namespace)
    if not lib.available():
        return None, refused
    for name, fake in (fakes or {}).items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", "Meta"):
            torch.library.register_fake(f"{namespace}::{name}")(fake)
    return lib, ""


class Library:
    """A C++ library of ``kernels.cpu``, loaded on first use (``load() -> (ops or None, why)``),
    once per process; ``state`` holds ``ops`` and ``why`` (tests replace it)."""

    def __init__(self, load):
        self.load, self.state, self.lock = load, {}, threading.Lock()

    def ops(self):
        """``torch.ops.<its namespace>`` where the library is built and the CPU runs it, else
        None."""
        if "ops" not in self.state:
            with self.lock:
                if "ops" not in self.state:
                    self.state["ops"], self.state["why"] = self.load()
        return self.state["ops"]

    def reason(self) -> str:
        """Why ``ops()`` is None ("" where it is available)."""
        self.ops()
        return str(self.state["why"])


def _like_first(x: Tensor, *args) -> Tensor:
    """A block op's output: a new contiguous tensor of its first input's shape and dtype."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


LIBRARY = Library(
    lambda: load_library(
        "kernels.cpu._block", "mixrank_cpu", _FLAGS, "AMX bf16 and AVX-512 BF16",
        "the Linux kernel refused this process the AMX tile state (arch_prctl)",
        fakes={"rankmixer_block": _like_first, "swiglu_stage": _like_first},
    )
)  # fmt: skip
ops, reason = LIBRARY.ops, LIBRARY.reason  # torch.ops.mixrank_cpu or None; why it is None


def supports(num_tokens: int, dim: int, hidden: int) -> bool:
    """Whether ``rankmixer_block`` takes these shapes (H = T heads)."""
    return (
        dim % num_tokens == 0
        and dim % 32 == 0
        and (dim // num_tokens) % 16 == 0
        and hidden % 32 == 0
    )


def prepare_rankmixer(
    norm1: tuple[Tensor, Tensor | None, float],
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    norm2: tuple[Tensor, Tensor | None, float],
    rms: bool,
) -> tuple:
    """The block's parameters as ``rankmixer_block`` takes them: the per-token weights
    ``w1 [T, D, Hd]`` and ``w2 [T, Hd, D]`` packed in bf16 as AMX B tiles
    (``[T, N/16, K/2, 16, 2]``), biases and norm parameters in fp32; ``norm*`` are
    ``(weight, bias or None, eps)``. Prepare once per set of weights, not per call."""

    def f32(t: Tensor | None) -> Tensor:
        return torch.empty(0) if t is None else t.detach().float().contiguous()

    lib = ops()
    (g1, be1, eps1), (g2, be2, eps2) = norm1, norm2
    bf16 = lambda w: w.detach().to(torch.bfloat16).contiguous()  # noqa: E731
    return (
        f32(g1),
        f32(be1),
        float(eps1),
        lib.pack_tiles(bf16(w1)),
        f32(b1),
        lib.pack_tiles(bf16(w2)),
        f32(b2),
        f32(g2),
        f32(be2),
        float(eps2),
        bool(rms),
    )


def rankmixer_block(x: Tensor, prepared: tuple, row_block: int = 32) -> Tensor:
    """``Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)`` with ``S = Norm1(Mix(X) + X)`` on
    token-major bf16 ``x [T, B, D]`` (token mixing with H = T heads), ``prepared`` from
    ``prepare_rankmixer``; returns bf16 ``[T, B, D]``. GELU is exact (erf to 3e-7)."""
    return ops().rankmixer_block(x.contiguous(), *prepared, int(row_block))


def swiglu_supports(width: int, hidden: int) -> bool:
    """Whether ``swiglu_stage`` takes a stage of this token width and hidden width."""
    return width % 32 == 0 and hidden % 32 == 0


def prepare_swiglu(norm: tuple[Tensor, float], w_gate_up: Tensor, w_down: Tensor) -> tuple:
    """A TokenMixer-Large stage's parameters as ``swiglu_stage`` takes them: the RMSNorm
    ``(weight, eps)`` in fp32, ``w_gate_up [T, W, 2 Hd]`` (gate columns first) and
    ``w_down [T, Hd, W]`` packed in bf16 as AMX B tiles. Once per set of weights."""
    lib = ops()
    (g, eps) = norm
    bf16 = lambda w: w.detach().to(torch.bfloat16).contiguous()  # noqa: E731
    return (
        g.detach().float().contiguous(),
        float(eps),
        lib.pack_tiles(bf16(w_gate_up)),
        lib.pack_tiles(bf16(w_down)),
    )


def swiglu_stage(z: Tensor, r: Tensor, prepared: tuple, row_block: int = 32) -> Tensor:
    """``r + W_down,t (Swish(W_gate,t s_t) * W_up,t s_t)`` with ``s = RMSNorm(z)``, per token
    ``t`` (bias-free pSwiGLU), on token-major bf16 ``z``, ``r [T, B, W]``; returns bf16."""
    return ops().swiglu_stage(z.contiguous(), r.contiguous(), *prepared, int(row_block))
