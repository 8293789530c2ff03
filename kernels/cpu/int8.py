"""Int8 GEMMs for CPU inference: int8 weights with one scale per output channel, activations
quantized to int8 per row at run time, int32 accumulation through oneDNN's u8s8 kernel.

    quantize_weight(w [..., K, N], bits) -> (w_q int8 [..., K, N], scale fp32 [..., N])
    Int8Weight(w [K, N], bias=None)                 the packed weight of one GEMM
    int8_linear(x [M, K] fp32, weight, out=None) -> x @ w + bias   (fp32, [M, N])
    int8_bmm(x [T, B, K], weights[T], out=None)  -> per-token int8_linear (token-major)
    Int8PerToken(w [T, K, N], b=None)(x [T, B, K]) -> the same, routed: one oneDNN call per
        token, one exact fp32 bmm of the integers for all tokens, or one call of the AVX512-VNNI
        kernel (kernels.cpu.vnni) for all tokens (bit-identical; the fastest at load, timed)
    int8_linear_reference(x, w_q, scale, bias)   -> the same product summed exactly
    weight_bits() -> 8 on CPUs with VNNI / AMX-INT8, 7 elsewhere (why: below)

**The arithmetic.** A weight column ``n`` is stored as ``w_q[:, n] * s_w[n]`` with
``s_w[n] = max |w[:, n]| / Q_w`` (symmetric, round to nearest; ``Q_w = 127``, or 63 with 7-bit
weights). A row ``m`` of the activations is quantized at run time to ``q[m] = round(x[m] /
s_x[m])`` with ``s_x[m] = max |x[m]| / 127``; ``out[m, n] = s_x[m] * s_w[n] * sum_k q[m, k]
w_q[k, n] + bias[n]``. The sum is exact (int32).
Per-row scales, not one per tensor (what ``torch.ao``'s dynamic linear does), make a
candidate's score independent of the other rows of its batch: the same request scores the
same alone, in a bigger batch or in another micro-batch, as the consistency checks require.

**Why 7-bit weights without VNNI.** oneDNN's u8s8 kernel feeds the activations (shifted by
the zero point 128 into [1, 255]) to AVX2's ``vpmaddubsw``, which adds two u8 x s8 products
into a saturating int16: with 8-bit weights a pair reaches 64,516 and is clipped (measured: 3%
relative error against the exact sum, logits off by 0.05-0.96 on the test models). With weights
in [-63, 63] a pair stays below 32,767 and the sum is exact again; 7-bit weights lost less
accuracy than 7-bit activations on every test model. CPUs with AVX512-VNNI, AVX-VNNI or
AMX-INT8 accumulate u8 x s8 in int32 directly and take 8-bit weights (about half the error).
``MIXRANK_INT8_WEIGHT_BITS=7|8`` overrides (8 on an AVX2 CPU gives wrong sums: tests only).

Written here, not taken from ``torch.ao``, because its dynamic linear quantizes activations per
tensor (batch-dependent scores, and reduce-range 7-bit anyway on x86) and ``torch._int_mm``
on the CPU ran at 3-4 GOP/s on these machines against 150-300 for oneDNN's kernel. Where oneDNN's
quantized linear is missing from the torch build, ``int8_linear`` emulates it with an fp32
matmul of the integer values (same results within fp32 rounding, fp32 speed), logged once.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from kernels.cpu import vnni

log = logging.getLogger(__name__)

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    from kernels.cpu import _cpu_flags as flags

    return flags()


ACT_QMAX, ACT_ZERO_POINT = 127, 128  # activations: symmetric 8-bit, stored as u8 + 128


def weight_bits() -> int:
    """Bits of the quantized weights: 8 where the CPU multiplies u8 x s8 into int32 (VNNI /
    AMX-INT8), 7 elsewhere (AVX2's saturating int16 pairs); ``MIXRANK_INT8_WEIGHT_BITS``."""
    env = os.environ.get("MIXRANK_INT8_WEIGHT_BITS")
    if env:
        if env not in ("7", "8"):
            raise ValueError(f"MIXRANK_INT8_WEIGHT_BITS: expected 7 or 8, got {env!r}")
        return int(env)
    if "bits" not in _state:
        _state["bits"] = 8 if any(f in _cpu_flags() for f in _VNNI_FLAGS) else 7
    return int(_state["bits"])  # type: ignore[arg-type]


def has_onednn() -> bool:
    """Whether this torch build has oneDNN's quantized linear (the fast path)."""
    if "onednn" not in _state:
        ok = hasattr(torch.ops, "onednn")
        try:
            ok = ok and hasattr(torch.ops.onednn, "qlinear_pointwise")
            ok = ok and hasattr(torch.ops.onednn, "qlinear_prepack")
        except (AttributeError, RuntimeError):
            ok = False
        ok = ok and torch.backends.mkldnn.is_available()
        _state["onednn"] = ok
        if not ok:
            log.warning("int8: this torch build has no oneDNN quantized linear; emulating int8 "
                        "GEMMs with fp32 matmuls (same results, fp32 speed)")  # fmt: skip
    return bool(_state["onednn"])


def quantize_weight(w: Tensor, bits: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``w [..., K, N] -> (w_q int8 [..., K, N], s [..., N])``
    with ``s = max_k |w[..., k, n]| / Q`` (``Q = 2^(bits-1) - 1``: 127 or 63; 1 for an all-zero
    column) and ``w_q = round(w / s)``. ``bits``: ``weight_bits()`` by default."""
    qmax = 2 ** ((weight_bits() if bits is None else bits) - 1) - 1
    w = w.detach().float()
    s = w.abs().amax(dim=-2) / float(qmax)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / s.unsqueeze(-2)).clamp_(-qmax, qmax).to(torch.int8)
    return q, s


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` fp32 -> (``u8 [..., K]`` = round(x / s) + 128, ``s [..., 1]``), one
    symmetric scale per row (``s = max |x| / 127``; rows of zeros get ``s = 1``)."""
    q, s = quantize_rows_int(x)
    return q.add_(ACT_ZERO_POINT).to(torch.uint8), s


class Int8Weight:
    """One GEMM's weight ``w [K, N]`` quantized per output channel, packed for oneDNN once;
    ``bias [N]`` (fp32) is added after the scales. Once packed, the int8 values themselves
    (``q``) are dropped unless ``keep_q`` (tests and rate probes read them): the packed copy
    alone serves, so the int8 weights are held once. Without oneDNN ``q`` is what the
    emulation multiplies by, and is kept."""

    def __init__(
        self,
        w: Tensor,
        bias: Tensor | None = None,
        bits: int | None = None,
        keep_q: bool = False,
    ):
        q, self.scale = quantize_weight(w, bits)  # [K, N] int8, [N]
        self.k, self.n = q.shape
        self.bias = None if bias is None else bias.detach().float().reshape(-1).contiguous()
        self.zero_points = torch.zeros(self.n, dtype=torch.long)
        self.packed = (
            torch.ops.onednn.qlinear_prepack(q.t().contiguous(), None) if has_onednn() else None
        )
        self.q: Tensor | None = q if keep_q or self.packed is None else None
        self._qf: Tensor | None = None  # the emulation's fp32 copy of q (made on first use)

    def dequantized(self) -> Tensor:
        """``w_q * s`` as fp32 ``[K, N]``: the weight this GEMM multiplies by (needs ``q``:
        ``keep_q=True`` where oneDNN packed it)."""
        if self.q is None:
            raise ValueError("Int8Weight: its int8 values were dropped after packing (keep_q)")
        return self.q.float() * self.scale

    def product(self, q: Tensor) -> Tensor:
        """``s_w[n] * sum_k (q[m, k] - 128) w_q[k, n]`` for ``q`` u8 ``[M, K]`` (fp32 out)."""
        zp = ACT_ZERO_POINT
        if self.packed is not None:
            return torch.ops.onednn.qlinear_pointwise(
                q, 1.0, zp, self.packed, self.scale, self.zero_points, None,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip
        if self._qf is None:
            self._qf = self.q.float()
        return ((q.float() - zp) @ self._qf).mul_(self.scale)


def int8_linear(x: Tensor, weight: Int8Weight, out: Tensor | None = None) -> Tensor:
    """``x [M, K] @ w + bias`` with ``x`` quantized per row and ``w`` per output channel: fp32
    ``[M, N]`` (written into ``out`` when given)."""
    q, s = quantize_rows(x.float())
    return _rescale(weight.product(q), s, weight.bias, out)


def _rescale(y: Tensor, s: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mul(y, s, out=out) if out is not None else y.mul_(s)
    return torch.addcmul(bias, y, s, out=out) if out is not None else torch.addcmul(bias, y, s)


def int8_bmm(
    x: Tensor, weights: list[Int8Weight], out: Tensor | None = None, quantize=None
) -> Tensor:
    """Per-token int8 GEMMs on token-major ``x [T, B, K]``: ``out[t] = int8_linear(x[t],
    weights[t])`` as fp32 ``[T, B, N]``. The activations of all tokens are quantized in one
    call (``quantize``: ``quantize_rows`` or a compiled twin of it, which must give the same
    bytes); each token's product is scaled straight into its slice of ``out``."""
    T, B, _ = x.shape
    q, s = (quantize or quantize_rows)(x.float())
    if out is None:
        out = x.new_empty((T, B, weights[0].n), dtype=torch.float32)
    for t, w in enumerate(weights):
        _rescale(w.product(q[t]), s[t], w.bias, out[t])
    return out


def quantize_rows_int(x: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_rows`` for the exact fp32 route: the same integers ``round(x / s)`` in
    [-127, 127], kept as fp32 (no zero point, no u8), and the same scales."""
    s = x.abs().amax(dim=-1, keepdim=True).div_(ACT_QMAX)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.div(x, s).round_(), s


ROUTES = ("onednn", "exact_fp32", "vnni")
# the exact fp32 route holds the weights as fp32 (4x the int8 bytes): only for GEMMs this small
EXACT_FP32_MAX_BYTES = 8 << 20


def exact_in_fp32(k: int, bits: int | None = None) -> bool:
    """Whether an fp32 matmul of the quantized integers sums exactly: each product is at most
    ``127 * Q_w`` in magnitude, so every partial sum of ``k`` of them is an integer below
    ``k * 127 * Q_w``; at most 2^24 every one is an fp32 and no addition rounds, in any order."""
    qmax = 2 ** ((weight_bits() if bits is None else bits) - 1) - 1
    return k * ACT_QMAX * qmax <= 1 << 24


def _route_env() -> str:
    env = os.environ.get("MIXRANK_INT8_ROUTE", "auto")
    if env not in ("auto", *ROUTES):
        raise ValueError(f"MIXRANK_INT8_ROUTE: expected auto, {' or '.join(ROUTES)}, got {env!r}")
    return env


class Int8PerToken:
    """``T`` int8 GEMMs of one shape (per-token weights ``w [T, K, N]``, biases ``b [T, N]``;
    ``T = 1`` for a plain linear layer) on token-major ``x [T, B, K] -> [T, B, N]`` fp32,
    quantized as ``Int8Weight`` / ``int8_linear`` (per output channel, per row), through one
    of two routes that give the same bytes:

    - ``onednn``: one oneDNN u8s8 call per token (``int8_bmm``);
    - ``exact_fp32``: one fp32 ``bmm`` over all tokens of the integer values themselves. Where
      ``exact_in_fp32(K)`` every partial sum is an integer below 2^24, so the fp32 sums are the
      int32 sums exactly, and the scales are applied in the same order: the outputs are
      bit-identical (tests/test_int8.py). At small shapes (D = 32: 256 x 32 x 128 per token)
      a oneDNN call costs tens of microseconds of fixed overhead, and one batched fp32 call for
      all tokens is 2-4x faster (docs/BENCHMARKS.md, "Int8 dense inference");
    - ``vnni``: one call for all tokens of ``kernels.cpu.vnni``'s AVX512-VNNI kernel, which
      quantizes the rows itself (where the CPU and the build have it; bit-identical too).

    ``route``: ``auto`` (default; ``MIXRANK_INT8_ROUTE`` overrides) times the usable routes on
    ``rows`` rows per token once, here, and keeps the fastest: the choice changes speed, never a
    score. ``exact_fp32`` is only considered where the sums are exact and the fp32 copy of the
    weights is at most ``EXACT_FP32_MAX_BYTES``."""

    def __init__(
        self,
        w: Tensor,
        b: Tensor | None = None,
        *,
        bits: int | None = None,
        route: str | None = None,
        rows: int = 256,
    ):
        route = route or _route_env()
        if route not in ("auto", *ROUTES):
            raise ValueError(
                f"Int8PerToken: route: expected auto or one of {ROUTES}, got {route!r}"
            )
        self.t, self.k, self.n = w.shape
        bits = weight_bits() if bits is None else bits
        self.weights = [
            Int8Weight(w[t], None if b is None else b[t], bits, keep_q=True) for t in range(self.t)
        ]
        fits = exact_in_fp32(self.k, bits) and self.t * self.k * self.n * 4 <= EXACT_FP32_MAX_BYTES
        if route == "exact_fp32" and not exact_in_fp32(self.k, bits):
            raise ValueError(
                f"Int8PerToken: route exact_fp32: K = {self.k} products of {bits}-bit weights can "
                f"sum past 2^24 (fp32 would round); at most {(1 << 24) // (ACT_QMAX * (2 ** (bits - 1) - 1))}"
            )
        self.wf: Tensor | None = None  # the exact route's fp32 integers (made when timed / chosen)
        self.scale = torch.stack([wt.scale for wt in self.weights]).unsqueeze(1)  # [T, 1, N]
        self.bias = (
            None if b is None else b.detach().float().reshape(self.t, 1, self.n).contiguous()
        )
        self.prepared: vnni.Prepared | None = None  # the vnni route's packed weights
        if route == "vnni" and vnni.ops() is None:
            raise ValueError(f"Int8PerToken: route vnni: unavailable here ({vnni.reason()})")
        if route == "auto":
            usable = [
                r for r, ok in zip(ROUTES, (has_onednn(), fits, vnni.ops() is not None)) if ok
            ]
            route = self._fastest(rows, usable) if len(usable) > 1 else (usable or ["onednn"])[0]
        if route == "onednn" and not has_onednn():
            route = "exact_fp32" if exact_in_fp32(self.k, bits) else "onednn"  # emulated
        self.route = route
        if route == "exact_fp32":
            self._integers()
            self.weights, self.prepared = [], None
            return
        self.wf = None
        if route == "vnni":
            self._packed()
            self.weights = []
        else:
            self.prepared = None
            for wt in self.weights:
                if wt.packed is not None:
                    wt.q = None  # the packed copy alone serves (Int8Weight's keep_q=False)
        self.scale = self.bias = None  # type: ignore[assignment]

    def _packed(self) -> None:
        """The vnni route's weights (``kernels.cpu.vnni.prepare``), made where timed / chosen."""
        if self.prepared is None:
            q = torch.stack([wt.q for wt in self.weights])
            bias = None if self.bias is None else self.bias.reshape(self.t, self.n)
            self.prepared = vnni.prepare(q, self.scale.reshape(self.t, self.n), bias)

    def _integers(self) -> None:
        """The exact route's weights: the int8 values as fp32 ``[T, K, N]``, made only where
        the route is timed or chosen (a large layer never holds them, not even at load)."""
        if self.wf is None:
            self.wf = torch.stack([wt.q.float() for wt in self.weights])

    def quantizer(self):
        """The activations' quantization this route reads: ``quantize_rows`` (u8) or
        ``quantize_rows_int`` (the integers as fp32); None for ``vnni``, whose kernel quantizes."""
        if self.route == "vnni":
            return None
        return quantize_rows if self.route == "onednn" else quantize_rows_int

    def __call__(self, x: Tensor, quantize=None, relu: bool = False) -> Tensor:
        """``x [T, B, K] -> [T, B, N]`` fp32 (with ``relu``, ``torch.relu`` of it: fused into
        the ``vnni`` kernel's store); ``quantize``: ``self.quantizer()`` or a compiled twin of
        it (the same bytes)."""
        if self.route == "vnni":
            return vnni.linear(x, self.prepared, relu=relu)
        if self.route == "onednn":
            y = int8_bmm(x, self.weights, quantize=quantize)
        else:
            q, s = (quantize or quantize_rows_int)(x.float())
            y = _rescale(torch.bmm(q, self.wf).mul_(self.scale), s, self.bias, None)
        return torch.relu_(y) if relu else y

    def _fastest(self, rows: int, routes: list[str]) -> str:
        """Of ``routes``, the one with the shortest best-of time on ``rows`` random rows per
        token."""
        import time

        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.t, max(rows, 1), self.k, generator=g)
        if "exact_fp32" in routes:
            self._integers()
        if "vnni" in routes:
            self._packed()
        best = {}
        for route in routes:
            self.route = route
            self(x)
            best[route] = float("inf")
        for _ in range(3):
            for route in routes:
                self.route = route
                t0 = time.perf_counter()
                self(x)
                best[route] = min(best[route], time.perf_counter() - t0)
        log.debug("int8 %dx[%d, %d] x %d rows: %s", self.t, self.k, self.n, rows, best)
        return min(best, key=best.get)


def int8_linear_reference(
    x: Tensor, w_q: Tensor, scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The reference twin of ``int8_linear``: the same quantization of ``x`` (per row, 8-bit)
    and the product summed exactly in float64 (fp32 result). ``x [..., K]``, ``w_q [K, N]``
    int8 (any weight bits), ``scale [N]``."""
    x = x.float()
    s32 = x.abs().amax(dim=-1, keepdim=True) / ACT_QMAX
    s32 = torch.where(s32 > 0, s32, torch.ones_like(s32))
    q = torch.div(x, s32).round_().double()
    y = (q @ w_q.double()) * scale.double() * s32.double()
    if bias is not None:
        y = y + bias.double()
    return y.float()


def int8_gemm_rate(n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """The int8 matmul peak of this machine at ``n^3``, in GOP/s, for each route: oneDNN's u8s8
    kernel (what ``int8_linear`` runs, quantization excluded), ``kernels.cpu.vnni``'s kernel
    (quantization included) where the CPU has VNNI (``vnni``), and on AMX tiles where it has
    AMX-INT8 (``amx_int8``), ``torch._int_mm`` and ``torch.ao``'s
    dynamic linear (fbgemm). ``peak`` is the fastest."""
    import time

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    w = Int8Weight(torch.randn(n, n, generator=g), keep_q=True)
    q, _ = quantize_rows(a)
    routes = {}
    if w.packed is not None:
        routes["onednn_u8s8"] = lambda: w.product(q)
    if vnni.ops() is not None:  # kernels.cpu.vnni's GEMM (it quantizes the rows itself:
        # included), on the VNNI tiles and, where the CPU has AMX-INT8, on AMX tiles
        prepared = vnni.prepare(w.q.unsqueeze(0), w.scale.unsqueeze(0))
        a3 = a.unsqueeze(0)

        def on(backend: str):
            def run():
                with vnni.gemm_backend(backend):
                    return vnni.linear(a3, prepared)

            return run

        routes["vnni"] = on("vnni")
        if vnni.backend() == "amx":
            routes["amx_int8"] = on("amx")
    # torch._int_mm: at n^3 where it is fast, at 512^3 where it is a scalar loop (seconds at n)
    small = 512 if n > 512 else n
    a8 = torch.randint(-63, 64, (small, small), dtype=torch.int8, generator=g)
    b8 = w.q[:small, :small].contiguous()
    t0 = time.perf_counter()
    torch._int_mm(a8, b8)
    mm_n = n if time.perf_counter() - t0 < 0.05 else small
    a8 = torch.randint(-63, 64, (mm_n, mm_n), dtype=torch.int8, generator=g)
    b8 = w.q[:mm_n, :mm_n].contiguous()
    routes["torch_int_mm"] = lambda: torch._int_mm(a8, b8)
    sizes = {"torch_int_mm": mm_n}
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(
                w.q.t().float() * w.scale.unsqueeze(1), w.scale.double(),
                torch.zeros(n, dtype=torch.long), 0, torch.qint8,
            )  # fmt: skip
            packed = torch.ops.quantized.linear_prepack(qw, None)
        routes["torch_ao_dynamic"] = lambda: torch.ops.quantized.linear_dynamic(a, packed, True)
    except (RuntimeError, AttributeError):
        pass
    out: dict[str, float] = {}
    for name, fn in routes.items():
        try:
            fn()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * sizes.get(name, n) ** 3 / best / 1e9
        except RuntimeError:
            continue
    out["peak"] = max(out.values()) if out else float("nan")
    return out
