"""Fast inference implementations of the mixer blocks, swapped in for them by
``ranking.inference.optimize_for_inference`` (training never runs these).

Each module here is built from a block of ``ranking.model.blocks`` and owns its weights in the
inference dtype: copies, packed where a kernel wants them packed. Its forward computes the same
equations as the block's (tests/test_model_blocks.py checks both against the equations,
tests/test_inference.py whole lowered models for every architecture).

**Token-major layout.** On the CPU (where the kernel dispatch picks the PyTorch reference) the
dense RankMixer and TokenMixer-Large stacks run in ``[T, B, D]``: the per-token GEMMs then read
and write contiguous ``[T, B, *]`` batches with no transposes, token mixing is one permuted
copy, residuals and biases are folded into the second GEMM (``baddbmm``), norms run natively in
the weights' dtype (fp32 statistics inside) and activations are applied in place.

**Compiled epilogues** (``compile_epilogues``): the elementwise work between the GEMMs (the
norms, SwiGLU's ``Swish(gate) * up``) goes through ``torch.compile`` one function at a time, so
Inductor's C++ backend emits one vectorised pass per function while the GEMMs stay eager oneDNN
calls. Exact GELU stays eager: compiled, it was slower than the in-place ``gelu_``
(docs/BENCHMARKS.md, "Measurements behind code choices"). Compiling needs a C++ compiler at run
time; where there is none (the serving image ships without one) or compilation fails otherwise,
the function runs eagerly from then on, with one warning: same math, the eager speed.

**AMX ops** (``cpu_fused_block``, bf16): each RankMixer block, and each TokenMixer-Large
pSwiGLU stage, as one ``kernels.cpu`` op (AMX GEMMs with the norms, biases, residuals and
activations fused around them), where the CPU and the build have it. In int8 the same switch
takes ``kernels.cpu.vnni``'s ops (AVX512-VNNI GEMMs, the activations' quantization fused too):
``VnniInt8RankMixer`` / ``VnniInt8TokenMixerLarge``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

import kernels
from kernels import cpu as cpu_kernels
from kernels.cpu import int8, vnni
from kernels.reference import fp8_quantize_weight
from ranking.model.blocks import (
    RankMixerBlock,
    StackOutput,
    TokenMixerLargeBlock,
    UniMixerBlock,
)
from ranking.model.ffn import DenseStage, PerTokenFFN, PerTokenSwiGLU, SparsePerTokenMoE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- token mixing


def mix_tm(x: Tensor, num_heads: int) -> Tensor:
    """Token mixing in token-major layout: ``[T, B, D] -> [H, B, T*D/H]`` (a copy);
    ``out[h, b, t*d:(t+1)*d] = x[t, b, h*d:(h+1)*d]`` with ``d = D/H``."""
    T, B, D = x.shape
    d = D // num_heads
    # clone, not reshape: always a fresh tensor (reshape returns a view of x when the permuted
    # layout happens to be contiguous, e.g. T = 1, and callers add into the result in place)
    return _chunk_permute(x.view(T, B, num_heads, d)).view(num_heads, B, T * d)


def revert_tm(y: Tensor, num_tokens: int) -> Tensor:
    """Inverse of ``mix_tm``: ``[H, B, T*d] -> [T, B, H*d]`` (a copy)."""
    H, B, W = y.shape
    d = W // num_tokens
    return _chunk_permute(y.view(H, B, num_tokens, d)).view(num_tokens, B, H * d)


def _chunk_permute(v: Tensor) -> Tensor:
    """``v [P, B, Q, d] -> [Q, B, P, d]``, a contiguous copy that moves whole ``d``-chunks.

    Where a chunk is a whole number of 16-byte units, the copy moves them as complex128
    elements (the same bytes, bit for bit, fewer strided elements: faster, most for small d;
    docs/BENCHMARKS.md, "Measurements behind code choices"). Only without autograd (a dtype
    view has no gradient)."""
    nbytes = v.shape[-1] * v.element_size()
    if (
        v.is_contiguous()
        and not v.requires_grad
        and nbytes % 16 == 0
        and v.storage_offset() * v.element_size() % 16 == 0
    ):
        w = v.view(torch.complex128).permute(2, 1, 0, 3)
        return w.clone(memory_format=torch.contiguous_format).view(v.dtype)
    return v.permute(2, 1, 0, 3).clone(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- compiled functions


class CompiledOrEager:
    """``torch.compile(fn)``, or ``fn`` itself once the compiled call has failed where the
    eager one succeeds (logged once; ``fell_back`` then says so). When the eager call fails
    too, the input was at fault: its error is raised and the compiled path is kept."""

    def __init__(self, fn, what: str, **compile_kwargs):
        self.eager, self.what = fn, what
        self.fn = torch.compile(fn, **{"dynamic": None, **compile_kwargs})

    @property
    def fell_back(self) -> bool:
        return self.fn is self.eager

    def __call__(self, *args, **kwargs):
        if self.fell_back:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # Inductor: no C++ compiler, a failed build, an unsupported op
            out = self.eager(*args, **kwargs)  # raises on a bad input: compiled path kept
            text = str(e).strip()
            first = text.splitlines()[0][:300] if text else ""
            log.warning(
                "%s: torch.compile failed (%s: %s); running it eagerly",
                self.what,
                type(e).__name__,
                first,
            )
            self.fn = self.eager
            return out


class CudaGraphs:
    """``fn(x [b, ...])`` replayed from CUDA graphs, one per row bucket (powers of two from 16 up
    to ``max_rows``): the rows are copied into the bucket's static input, the rest of it zeroed,
    the graph replayed, and the first ``b`` rows of each output returned (copies). Exact when
    ``fn`` treats rows independently, as the dense part of every model here does (per-row
    norms, per-row activation scales). Batches above ``max_rows`` run ``fn`` eagerly.

    A bucket is captured on first use (after two warm-up calls on a side stream, which also
    run Triton's autotuning), all buckets in one memory pool. If a capture fails (a host sync
    inside ``fn``: RankMixer's ReLU-routed MoE reads its pair count), ``fn`` runs eagerly from
    then on, logged once. ``capture=False`` runs ``fn`` on the padded input instead of a graph:
    the same bucketing and slicing, for checks on a machine without a GPU. Replays are
    serialised (one lock): the static buffers are shared."""

    def __init__(self, fn, max_rows: int = 4096, capture: bool = True, what: str = "dense part"):
        import threading

        self.fn, self.max_rows, self.capture, self.what = fn, max_rows, capture, what
        self.graphs: dict[int, tuple] = {}  # rows -> (graph or None, static input, outputs)
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._pool = None

    def bucket(self, rows: int) -> int | None:
        if rows > self.max_rows:
            return None
        return max(16, 1 << max(rows - 1, 0).bit_length())

    def _record(self, x: Tensor, rows: int) -> tuple:
        static = x.new_zeros((rows, *x.shape[1:]))
        if not self.capture:
            return None, static, None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(static)
        return graph, static, out

    def __call__(self, x: Tensor):
        b = x.shape[0]
        rows = self.bucket(b)
        if rows is None or self.failed:
            return self.fn(x)
        with self._lock:
            entry = self.graphs.get(rows)
            if entry is None:
                try:
                    entry = self.graphs[rows] = self._record(x, rows)
                except Exception as e:  # a host sync or another op capture does not allow
                    self.failed = f"{type(e).__name__}: {str(e).strip()[:300]}"
                    log.warning("%s: CUDA graph capture failed (%s); running eagerly",
                                self.what, self.failed)  # fmt: skip
                    return self.fn(x)
            graph, static, out = entry
            static[:b].copy_(x)
            static[b:].zero_()
            if graph is None:
                out = self.fn(static)
            else:
                graph.replay()
            return _rows(out, b, rows)


def _rows(out, b: int, rows: int):
    """The first ``b`` rows (copies) of every ``rows``-row tensor in ``out``; others copied."""
    if torch.is_tensor(out):
        return out[:b].clone() if out.dim() and out.shape[0] == rows else out.clone()
    items = [_rows(o, b, rows) for o in out]
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)


def norm_epilogue(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
    """LayerNorm (``rms=False``) or RMSNorm over the last dim."""
    if rms:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def swiglu_epilogue(gate_up: Tensor, hidden: int) -> Tensor:
    """``Swish(gate) * up`` of the fused ``[..., 2*hidden]`` projection (gate first)."""
    gate, up = gate_up.split(hidden, dim=-1)
    return torch.nn.functional.silu(gate) * up


# One compiled function per epilogue for the process: compiled graphs are shared by every block.
EPILOGUES: dict[str, CompiledOrEager] = {}


def compiled(name: str, fn) -> CompiledOrEager:
    f = EPILOGUES.get(name)
    if f is None:
        f = EPILOGUES[name] = CompiledOrEager(fn, f"the {name} epilogue (compile_epilogues)")
    return f


# ----------------------------------------------------------------------------- owned weights


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else 1e-6


def _own(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A contiguous copy of ``t`` in ``dtype`` on ``device``, outside autograd."""
    return t.detach().to(device=device, dtype=dtype, copy=True).contiguous()


class Norm(nn.Module):
    """A block's LayerNorm or RMSNorm with its weights in the inference dtype; with ``compiled``
    through the compiled norm epilogue (same math)."""

    def __init__(self, norm: nn.Module, dtype: torch.dtype, device, compiled: bool = False):
        super().__init__()
        self.rms, self.eps, self.compiled = isinstance(norm, nn.RMSNorm), _eps(norm), compiled
        self.register_buffer("weight", _own(norm.weight, dtype, device))
        bias = None if self.rms else norm.bias
        self.register_buffer("bias", None if bias is None else _own(bias, dtype, device))

    def forward(self, x: Tensor) -> Tensor:
        fn = compiled("norm", norm_epilogue) if self.compiled else norm_epilogue
        return fn(x, self.weight, self.bias, self.eps, self.rms)


class SwiGLUWeights(nn.Module):
    """A dense pSwiGLU's weights in the inference dtype; ``act(x)`` is ``Swish(gate) * up`` for
    token-major ``x [T, B, W] -> [T, B, Hd]`` (``w_down`` is applied by the caller's GEMM)."""

    def __init__(self, ffn: PerTokenSwiGLU, dtype: torch.dtype, device, compiled: bool = False):
        super().__init__()
        self.hidden, self.compiled = ffn.hidden, compiled
        self.register_buffer("w_gate_up", _own(ffn.w_gate_up, dtype, device))
        self.register_buffer("w_down", _own(ffn.w_down, dtype, device))

    def act(self, x: Tensor) -> Tensor:
        gate_up = torch.bmm(x, self.w_gate_up)
        if self.compiled:
            return compiled("swiglu", swiglu_epilogue)(gate_up, self.hidden)
        gate, up = gate_up.split(self.hidden, dim=-1)
        return torch.nn.functional.silu(gate).mul_(up)


# ----------------------------------------------------------------------------- fast blocks


def dense_ffn(stage: nn.Module, kind: type) -> nn.Module | None:
    """The dense per-token FFN inside a block's stage, or None (a MoE stage)."""
    if isinstance(stage, DenseStage) and isinstance(stage.ffn, kind):
        return stage.ffn
    return None


def has_token_major(block: nn.Module) -> bool:
    """Whether ``block`` has a token-major implementation here (dense RankMixer / TokenMixer-
    Large blocks; a MoE stage or UniMixer keeps the block itself)."""
    if isinstance(block, RankMixerBlock):
        return dense_ffn(block.ffn, PerTokenFFN) is not None
    if isinstance(block, TokenMixerLargeBlock):
        return all(dense_ffn(f, PerTokenSwiGLU) is not None for f in (block.f1, block.f2))
    return False


class TokenMajorRankMixer(nn.Module):
    """``RankMixerBlock`` (dense PFFN) on token-major ``x [T, B, D] -> [T, B, D]``:
    ``S = Norm1(Mix(X) + X)``, ``Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)``."""

    def __init__(self, block: RankMixerBlock, dtype, device, compile_epilogues: bool = False):
        super().__init__()
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        self.num_tokens = block.num_tokens
        self.norm1 = Norm(block.norm1, dtype, device, compile_epilogues)
        self.norm2 = Norm(block.norm2, dtype, device, compile_epilogues)
        self.register_buffer("w1", _own(ffn.w1, dtype, device))
        self.register_buffer("b1", _own(ffn.b1.unsqueeze(1), dtype, device))  # [T, 1, kD]
        self.register_buffer("w2", _own(ffn.w2, dtype, device))
        self.register_buffer("b2", _own(ffn.b2.unsqueeze(1), dtype, device))  # [T, 1, D]

    def forward(self, x: Tensor) -> Tensor:
        s = self.norm1(mix_tm(x, self.num_tokens).add_(x))
        # the bias rides in the GEMM's accumulator: one broadcast write instead of a
        # read-add-write pass after it (docs/BENCHMARKS.md, "Measurements behind code choices")
        h = torch.ops.aten.gelu_(torch.baddbmm(self.b1, s, self.w1))
        # Norm2(PFFN(S) + S): the residual and b2 ride in the second GEMM's accumulator
        return self.norm2(torch.baddbmm(s + self.b2, h, self.w2))


class AmxRankMixer(nn.Module):
    """``RankMixerBlock`` (dense PFFN) as one ``kernels.cpu`` op on token-major bf16
    ``x [T, B, D]``; owns the op's packed weights (packed once, from bf16 copies)."""

    def __init__(self, block: RankMixerBlock):
        super().__init__()
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        rms = isinstance(block.norm1, nn.RMSNorm)
        bf = lambda t: None if t is None else t.detach().to(torch.bfloat16)  # noqa: E731
        norm = lambda n: (bf(n.weight), None if rms else bf(n.bias), _eps(n))  # noqa: E731
        self.prepared = cpu_kernels.prepare_rankmixer(
            norm(block.norm1),
            bf(ffn.w1),
            bf(ffn.b1),
            bf(ffn.w2),
            bf(ffn.b2),
            norm(block.norm2),
            rms,
        )

    @staticmethod
    def supports(block: RankMixerBlock) -> bool:
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        return cpu_kernels.supports(block.num_tokens, ffn.w1.shape[1], ffn.w1.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        return cpu_kernels.rankmixer_block(x, self.prepared)


class TokenMajorTokenMixerLarge(nn.Module):
    """``TokenMixerLargeBlock`` (dense pSwiGLU) on token-major ``x [T, B, D] -> [T, B, D]``:
    ``Hm = Mix(X)``, ``H' = Hm + F1(RMSNorm(Hm))``, ``R + F2(RMSNorm(Revert(H')))``."""

    def __init__(self, block: TokenMixerLargeBlock, dtype, device, compile_epilogues=False):
        super().__init__()
        self.num_tokens, self.num_heads = block.num_tokens, block.num_heads
        self.second_residual = block.second_residual
        self.norm1 = Norm(block.norm1, dtype, device, compile_epilogues)
        self.norm2 = Norm(block.norm2, dtype, device, compile_epilogues)
        self.f1 = SwiGLUWeights(block.f1.ffn, dtype, device, compile_epilogues)
        self.f2 = SwiGLUWeights(block.f2.ffn, dtype, device, compile_epilogues)

    def forward(self, x: Tensor) -> Tensor:
        hm = mix_tm(x, self.num_heads)  # [H, B, W]
        h = torch.baddbmm(hm, self.f1.act(self.norm1(hm)), self.f1.w_down)  # Hm + F1(...)
        r = revert_tm(h, self.num_tokens)
        base = x if self.second_residual == "input" else r
        return torch.baddbmm(base, self.f2.act(self.norm2(r)), self.f2.w_down)


class AmxTokenMixerLarge(nn.Module):
    """``TokenMixerLargeBlock`` (dense pSwiGLU) with each stage one ``kernels.cpu`` op on
    token-major bf16 ``x [T, B, D]`` (mixing and reverting stay copies); owns the packed
    weights of both stages."""

    def __init__(self, block: TokenMixerLargeBlock):
        super().__init__()
        self.num_tokens, self.num_heads = block.num_tokens, block.num_heads
        self.second_residual = block.second_residual
        bf = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
        self.prepared = tuple(
            cpu_kernels.prepare_swiglu((bf(n.weight), _eps(n)), bf(f.w_gate_up), bf(f.w_down))
            for n, f in ((block.norm1, block.f1.ffn), (block.norm2, block.f2.ffn))
        )

    @staticmethod
    def supports(block: TokenMixerLargeBlock) -> bool:
        return all(
            cpu_kernels.swiglu_supports(f.ffn.w_down.shape[-1], f.ffn.hidden)
            for f in (block.f1, block.f2)
        )

    def forward(self, x: Tensor) -> Tensor:
        hm = mix_tm(x, self.num_heads)
        r = revert_tm(cpu_kernels.swiglu_stage(hm, hm, self.prepared[0]), self.num_tokens)
        base = x if self.second_residual == "input" else r
        return cpu_kernels.swiglu_stage(r, base, self.prepared[1])


# ----------------------------------------------------------------------------- int8 blocks


def _quantizer(compiled_epilogues: bool, gemm: int8.Int8PerToken):
    """The activations' per-row int8 quantization that ``gemm``'s route reads
    (``Int8PerToken.quantizer``), or with ``compile_epilogues`` its compiled twin (one pass over
    the activations instead of about seven eager ones; the same bytes, tests/test_int8.py)."""
    if not compiled_epilogues:
        return None
    return compiled(f"int8_quantize_{gemm.route}", gemm.quantizer())


def _int8_per_token(w: Tensor, b: Tensor | None = None, rows: int = 256) -> int8.Int8PerToken:
    """Per-token weights ``w [T, K, N]`` (biases ``b [T, N]``) as int8 GEMMs, routed by their
    speed at ``rows`` rows per token (``kernels.cpu.int8.Int8PerToken``)."""
    return int8.Int8PerToken(w, b, rows=rows)


def int8_gemms(module: nn.Module) -> list[int8.Int8PerToken]:
    """Every int8 GEMM (``Int8PerToken``) of a lowered model, e.g. to read their routes."""
    found = []
    for m in module.modules():
        for v in vars(m).values():
            for x in v if isinstance(v, list) else (v,):
                if isinstance(x, int8.Int8PerToken):
                    found.append(x)
    return found


class Int8RankMixer(nn.Module):
    """``RankMixerBlock`` (dense PFFN) on token-major fp32 ``x [T, B, D]`` with both per-token
    GEMMs in int8 (``kernels.cpu.int8``: int8 weights per output channel, activations per row);
    token mixing, the norms, GELU, the biases and the residual stay fp32."""

    def __init__(self, block: RankMixerBlock, compile_epilogues: bool = False, rows: int = 256):
        super().__init__()
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        dev = torch.device("cpu")
        self.num_tokens = block.num_tokens
        self.norm1 = Norm(block.norm1, torch.float32, dev, compile_epilogues)
        self.norm2 = Norm(block.norm2, torch.float32, dev, compile_epilogues)
        self.w1 = _int8_per_token(ffn.w1, ffn.b1, rows)
        self.w2 = _int8_per_token(ffn.w2, ffn.b2, rows)
        self.compiled = compile_epilogues

    def forward(self, x: Tensor) -> Tensor:
        s = self.norm1(mix_tm(x, self.num_tokens).add_(x))
        h = torch.ops.aten.gelu_(self.w1(s, _quantizer(self.compiled, self.w1)))
        return self.norm2(self.w2(h, _quantizer(self.compiled, self.w2)).add_(s))


class Int8TokenMixerLarge(nn.Module):
    """``TokenMixerLargeBlock`` (dense pSwiGLU) on token-major fp32 ``x [T, B, D]`` with the
    four per-head GEMMs (gate/up and down of both stages) in int8; mixing, RMSNorm, Swish and the
    residuals stay fp32."""

    def __init__(
        self, block: TokenMixerLargeBlock, compile_epilogues: bool = False, rows: int = 256
    ):
        super().__init__()
        dev = torch.device("cpu")
        self.num_tokens, self.num_heads = block.num_tokens, block.num_heads
        self.second_residual = block.second_residual
        self.norm1 = Norm(block.norm1, torch.float32, dev, compile_epilogues)
        self.norm2 = Norm(block.norm2, torch.float32, dev, compile_epilogues)
        self.hidden = (block.f1.ffn.hidden, block.f2.ffn.hidden)
        self.gate_up = [_int8_per_token(f.ffn.w_gate_up, None, rows) for f in (block.f1, block.f2)]
        self.down = [_int8_per_token(f.ffn.w_down, None, rows) for f in (block.f1, block.f2)]
        self.compiled = compile_epilogues

    def _stage(self, i: int, z: Tensor, residual: Tensor) -> Tensor:
        """``residual + W_down Swish(gate) * up`` of stage ``i`` on normed ``z``."""
        gemm, down = self.gate_up[i], self.down[i]
        gate_up = gemm(z, _quantizer(self.compiled, gemm))
        if self.compiled:
            act = compiled("swiglu", swiglu_epilogue)(gate_up, self.hidden[i])
        else:
            gate, up = gate_up.split(self.hidden[i], dim=-1)
            act = torch.nn.functional.silu(gate).mul_(up)
        return down(act, _quantizer(self.compiled, down)).add_(residual)

    def forward(self, x: Tensor) -> Tensor:
        hm = mix_tm(x, self.num_heads)  # [H, B, W]
        r = revert_tm(self._stage(0, self.norm1(hm), hm), self.num_tokens)
        base = x if self.second_residual == "input" else r
        return self._stage(1, self.norm2(r), base)


def _vnni_gemm(w: Tensor, b: Tensor | None = None) -> vnni.Prepared:
    """Per-token weights ``w [T, K, N]`` (biases ``b [T, N]``) quantized as ``Int8PerToken``
    quantizes them (per output channel) and packed for ``kernels.cpu.vnni``."""
    q, scale = int8.quantize_weight(w)
    return vnni.prepare(q, scale, b)


def _f32_norm(norm: nn.Module, rms: bool) -> tuple[Tensor, Tensor | None, float]:
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    return f32(norm.weight), None if rms else f32(norm.bias), _eps(norm)


class VnniInt8RankMixer(nn.Module):
    """``RankMixerBlock`` (dense PFFN) in int8 as one ``kernels.cpu.vnni`` op on token-major
    fp32 ``x [T, B, D]``: ``Int8RankMixer``'s quantization (weights per output channel,
    activations per row), with the mixing, both norms, GELU, the biases, the residual and the
    activations' quantization fused around the two AVX512-VNNI GEMMs."""

    def __init__(self, block: RankMixerBlock):
        super().__init__()
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        self.rms = isinstance(block.norm1, nn.RMSNorm)
        self.norm1 = _f32_norm(block.norm1, self.rms)
        self.norm2 = _f32_norm(block.norm2, self.rms)
        self.g1, self.g2 = _vnni_gemm(ffn.w1, ffn.b1), _vnni_gemm(ffn.w2, ffn.b2)

    @staticmethod
    def supports(block: RankMixerBlock) -> bool:
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        return vnni.rankmixer_supports(block.num_tokens, ffn.w1.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return vnni.rankmixer_block(x, self.norm1, self.g1, self.g2, self.norm2, self.rms)


class VnniInt8TokenMixerLarge(nn.Module):
    """``TokenMixerLargeBlock`` (dense pSwiGLU) in int8 with each stage one ``kernels.cpu.vnni``
    op on token-major fp32 ``x [T, B, D]`` (RMSNorm, the gate/up GEMM, Swish * up, the down
    GEMM, the residual and the activations' quantization in one pass; mixing and reverting stay
    copies). ``Int8TokenMixerLarge``'s quantization."""

    def __init__(self, block: TokenMixerLargeBlock):
        super().__init__()
        self.num_tokens, self.num_heads = block.num_tokens, block.num_heads
        self.second_residual = block.second_residual
        self.stages = tuple(
            ((n.weight.detach().float().contiguous(), _eps(n)), _vnni_gemm(f.w_gate_up),
             _vnni_gemm(f.w_down))
            for n, f in ((block.norm1, block.f1.ffn), (block.norm2, block.f2.ffn))
        )  # fmt: skip

    @staticmethod
    def supports(block: TokenMixerLargeBlock) -> bool:
        return all(vnni.swiglu_supports(f.ffn.w_down.shape[-1]) for f in (block.f1, block.f2))

    def forward(self, x: Tensor) -> Tensor:
        hm = mix_tm(x.float(), self.num_heads)
        r = revert_tm(vnni.swiglu_stage(hm, hm, *self.stages[0]), self.num_tokens)
        base = x if self.second_residual == "input" else r
        return vnni.swiglu_stage(r, base, *self.stages[1])


class Int8SwiGLU(nn.Module):
    """A dense ``PerTokenSwiGLU`` (UniMixer's per-token FFN) with its two per-token GEMMs in
    int8 (``Int8TokenMixerLarge``'s quantization, each GEMM routed by its speed at ``rows``
    rows), on ``[B, T, D]`` as the FFN takes it: the tokens go token-major for the GEMMs and
    back; Swish * up stays fp32."""

    def __init__(self, ffn: PerTokenSwiGLU, rows: int = 256):
        super().__init__()
        self.hidden = ffn.hidden
        self.gate_up = _int8_per_token(ffn.w_gate_up, None, rows)
        self.down = _int8_per_token(ffn.w_down, None, rows)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x.transpose(0, 1)).split(self.hidden, dim=-1)  # [T, B, Hd]
        return self.down(torch.nn.functional.silu(gate).mul_(up)).transpose(0, 1)


class VnniInt8UniMixer(nn.Module):
    """A dense ``UniMixerBlock`` in int8 on its SiameseNorm streams ``(xbar, ybar) [B, T, D]``:
    the mixing sub-layer as the block runs it (``frozen``'s fp32 UniMixing and norms), the FFN
    sub-layer as one ``kernels.cpu.vnni.unimixer_ffn`` op (``Int8SwiGLU``'s quantization, with
    both norms, Swish * up and both streams' updates fused around the GEMMs)."""

    def __init__(self, block: UniMixerBlock, frozen: UniMixerBlock):
        super().__init__()
        self.mixing, self.y_norm1, self.x_norm1 = frozen.mixing, frozen.y_norm1, frozen.x_norm1
        ffn = dense_ffn(block.ffn, PerTokenSwiGLU)
        f32 = lambda n: (n.weight.detach().float().contiguous(), _eps(n))  # noqa: E731
        self.norm_y, self.norm_x = f32(block.y_norm2), f32(block.x_norm2)
        self.gate_up, self.down = _vnni_gemm(ffn.w_gate_up), _vnni_gemm(ffn.w_down)

    @staticmethod
    def supports(block: UniMixerBlock) -> bool:
        ffn = dense_ffn(block.ffn, PerTokenSwiGLU)
        return ffn is not None and vnni.swiglu_supports(ffn.w_gate_up.shape[1])

    def forward(self, xbar: Tensor, ybar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        o = self.mixing(xbar + self.y_norm1(ybar))
        xbar, ybar = self.x_norm1(xbar + o), ybar + o
        xbar, ybar = vnni.unimixer_ffn(
            xbar, ybar, self.norm_y, self.norm_x, self.gate_up, self.down
        )
        return xbar, ybar, xbar.new_zeros((), dtype=torch.float32)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` as an int8 GEMM (``kernels.cpu.int8``, one ``Int8PerToken`` of one
    token, routed by its speed at ``rows`` rows) for inference: the dense layers of models
    without a lowering of their own (the DLRM / DCNv2 baselines)."""

    def __init__(self, linear: nn.Linear, rows: int = 256, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.relu = relu  # ReLU(linear(x)): a Perceptron's layer with its activation fused
        bias = None if linear.bias is None else linear.bias.unsqueeze(0)
        self.gemm = int8.Int8PerToken(linear.weight.t().unsqueeze(0), bias, rows=rows)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.gemm(x.reshape(1, -1, self.in_features), relu=self.relu)
        return y.view(*lead, self.out_features)


# ----------------------------------------------------------------------------- fp8 blocks


class Fp8Weights(nn.Module):
    """Per-token (or, with ``G = 1``, plain) weights ``w [G, K, N]`` (biases ``b [G, N]``) in
    e4m3 with one fp32 scale per output column (``kernels.reference.fp8_quantize_weight``), for
    ``kernels.grouped_linear_fp8``: the Triton grouped GEMM on CUDA, its reference twin (the
    same quantization, products summed in fp32) on the CPU."""

    def __init__(self, w: Tensor, b: Tensor | None, device: torch.device):
        super().__init__()
        w8, scale = fp8_quantize_weight(w.detach().to(device=device, dtype=torch.float32))
        self.register_buffer("w8", w8.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if b is None else _own(b, torch.float32, device))
        self.groups, self.k, self.n = w.shape

    def forward(self, x: Tensor) -> Tensor:
        """``x [G, B, K] -> [G, B, N]`` (token-major: group g is token g's B rows), in x's
        dtype; rows quantized to e4m3 with one scale each inside the op."""
        G, B, K = x.shape
        offsets = torch.arange(0, (G + 1) * B, B, device=x.device)
        return self.grouped(x.reshape(G * B, K), offsets).view(G, B, self.n)

    def grouped(self, x_perm: Tensor, offsets: Tensor) -> Tensor:
        """Rows grouped by ``offsets [G+1]`` (expert order): ``[M, K] -> [M, N]``."""
        return kernels.grouped_linear_fp8(x_perm, offsets, self.w8, self.scale, bias=self.bias)


class Fp8RankMixer(nn.Module):
    """``RankMixerBlock`` (dense PFFN) on token-major ``x [T, B, D]`` with both per-token GEMMs
    in FP8 (e4m3 weights per output column, activations per row); token mixing, the norms,
    GELU and the residual run in ``dtype``."""

    def __init__(self, block: RankMixerBlock, dtype: torch.dtype, device: torch.device):
        super().__init__()
        ffn = dense_ffn(block.ffn, PerTokenFFN)
        self.num_tokens = block.num_tokens
        self.norm1 = Norm(block.norm1, dtype, device)
        self.norm2 = Norm(block.norm2, dtype, device)
        self.w1 = Fp8Weights(ffn.w1, ffn.b1, device)
        self.w2 = Fp8Weights(ffn.w2, ffn.b2, device)

    def forward(self, x: Tensor) -> Tensor:
        s = self.norm1(mix_tm(x, self.num_tokens).add_(x))
        h = torch.nn.functional.gelu(self.w1(s))
        return self.norm2(self.w2(h).add_(s))


class Fp8TokenMixerLarge(nn.Module):
    """``TokenMixerLargeBlock`` (dense pSwiGLU) on token-major ``x [T, B, D]`` with the four
    per-head GEMMs in FP8; mixing, RMSNorm, Swish and the residuals run in ``dtype``."""

    def __init__(self, block: TokenMixerLargeBlock, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_tokens, self.num_heads = block.num_tokens, block.num_heads
        self.second_residual = block.second_residual
        self.norm1 = Norm(block.norm1, dtype, device)
        self.norm2 = Norm(block.norm2, dtype, device)
        self.hidden = (block.f1.ffn.hidden, block.f2.ffn.hidden)
        self.gate_up = nn.ModuleList(
            Fp8Weights(f.ffn.w_gate_up, None, device) for f in (block.f1, block.f2)
        )
        self.down = nn.ModuleList(
            Fp8Weights(f.ffn.w_down, None, device) for f in (block.f1, block.f2)
        )

    def _stage(self, i: int, z: Tensor, residual: Tensor) -> Tensor:
        gate, up = self.gate_up[i](z).split(self.hidden[i], dim=-1)
        return self.down[i](torch.nn.functional.silu(gate).mul_(up)).add_(residual)

    def forward(self, x: Tensor) -> Tensor:
        hm = mix_tm(x, self.num_heads)  # [H, B, W]
        r = revert_tm(self._stage(0, self.norm1(hm), hm), self.num_tokens)
        base = x if self.second_residual == "input" else r
        return self._stage(1, self.norm2(r), base)


def _moe_router(moe: SparsePerTokenMoE, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The routing and the shared expert of ``moe`` in ``dtype``, frozen: a copy without the
    expert weights (their quantized twins replace them)."""
    experts = (moe.w_up, moe.w_down, moe.w_gate, moe.b_up, moe.b_down)
    router = copy.deepcopy(moe, memo={id(p): None for p in experts if p is not None})
    router = router.to(device)
    for m in router.modules():
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return router.eval()


class QuantizedMoE(nn.Module):
    """The forward of a ``SparsePerTokenMoE`` whose expert GEMMs run quantized: routing (the
    inference router), ``moe_permute`` / gather / unpermute as in the model, and between them
    ``grouped(rows, "up" | "down", offsets)`` (a subclass's grouped GEMM; SwiGLU's gate and up
    projections as one GEMM, the gate columns first), GELU / Swish between them.
    ``x [B, T, W] -> (y [B, T, W], aux)``, the module's own interface."""

    def __init__(self, moe: SparsePerTokenMoE):
        super().__init__()
        self.kind, self.hidden = moe.kind, moe.w_up.shape[-1]
        self.G = moe.w_up.shape[0]
        self.swiglu = moe.w_gate is not None

    def up_weights(self, moe: SparsePerTokenMoE) -> Tensor:
        return torch.cat([moe.w_gate, moe.w_up], dim=-1) if self.swiglu else moe.w_up

    def grouped(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, W = x.shape
        weights, ids, aux = self.router.route(x)
        top_k = self.kind == "tokenmixer_large"  # every pair has an expert: no host sync
        routing = kernels.moe_permute(ids, self.G, top_k)
        xp = kernels.moe_gather(x.reshape(B * T, W), routing)
        h = self.grouped(xp, "up", routing.offsets)
        if self.swiglu:
            gate, up = h.split(self.hidden, dim=-1)
            h = torch.nn.functional.silu(gate).mul_(up)
        else:
            h = torch.nn.functional.gelu(h)
        y_perm = self.grouped(h, "down", routing.offsets)
        y = kernels.moe_unpermute(y_perm, routing, weights.to(y_perm.dtype)).view(B, T, W)
        if self.router.shared is not None:
            y = y + self.router.shared(x)
        return y, aux


class Int8SparseMoE(QuantizedMoE):
    """``SparsePerTokenMoE`` (either published form) with its expert GEMMs in int8 on the CPU:
    ``kernels.cpu.vnni.grouped_linear`` (weights per output channel, activations per row, as
    every int8 GEMM here). The router stays fp32, a shared expert is an ``Int8SwiGLU``."""

    def __init__(self, moe: SparsePerTokenMoE):
        super().__init__(moe)
        # the model's SwiGLU experts are bias-free, its GELU experts have biases
        b_up = None if self.swiglu else moe.b_up.detach()
        self.up = _vnni_gemm(self.up_weights(moe).detach(), b_up)
        b_down = None if moe.b_down is None else moe.b_down.detach()
        self.down = _vnni_gemm(moe.w_down.detach(), b_down)
        self.router = _moe_router(moe, torch.float32, torch.device("cpu"))
        if moe.shared is not None:  # TokenMixer-Large's shared expert: a per-token SwiGLU
            self.router.shared = Int8SwiGLU(moe.shared)

    def grouped(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        return vnni.grouped_linear(x, getattr(self, which), offsets)


class Fp8SparseMoE(QuantizedMoE):
    """``SparsePerTokenMoE`` (either published form) with its expert GEMMs in FP8: the grouped
    GEMMs on e4m3 operands (``Fp8Weights.grouped``). The router and the shared expert run in
    ``dtype``."""

    def __init__(self, moe: SparsePerTokenMoE, dtype: torch.dtype, device: torch.device):
        super().__init__(moe)
        self.up = Fp8Weights(self.up_weights(moe), moe.b_up, device)
        self.down = Fp8Weights(moe.w_down, moe.b_down, device)
        self.router = _moe_router(moe, dtype, device)

    def grouped(self, x: Tensor, which: str, offsets: Tensor) -> Tensor:
        return getattr(self, which).grouped(x, offsets)


class Fp8Linear(nn.Module):
    """An ``nn.Linear`` as an FP8 GEMM (one group of ``kernels.grouped_linear_fp8``): the dense
    layers of models without a lowering of their own (the DLRM / DCNv2 baselines)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        b = None if linear.bias is None else linear.bias.unsqueeze(0)
        self.weight = Fp8Weights(linear.weight.t().unsqueeze(0), b, linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = self.weight(x.reshape(1, -1, self.in_features))
        return y.view(*lead, self.out_features)


def swap_linears(module: nn.Module, make, fuse_relu=None) -> int:
    """Swap every ``nn.Linear`` under ``module`` for ``make(linear)`` (in place); the count.
    With ``fuse_relu``, a TorchRec ``Perceptron`` whose activation is ``torch.relu`` (DLRM's
    and DCNv2's MLP layers) becomes ``fuse_relu(its linear)`` whole: ReLU in the GEMM's store."""
    from torchrec.modules.mlp import Perceptron

    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
            n += 1
        elif fuse_relu is not None and type(child) is Perceptron and _relu_after(child):
            setattr(module, name, fuse_relu(child._linear))
            n += 1
        else:
            n += swap_linears(child, make, fuse_relu)
    return n


def _relu_after(p: nn.Module) -> bool:
    return type(p._linear) is nn.Linear and p._activation_fn in (
        torch.relu,
        torch.nn.functional.relu,
    )


class TokenMajorStack(nn.Module):
    """A RankMixer / TokenMixer-Large stack of token-major blocks: ``[B, T, D] -> StackOutput``
    (transposed in once, out once as a view; ``hidden`` empty: inference). ``every`` is
    TokenMixer-Large's interlayer residual (0: none)."""

    def __init__(self, blocks: list[nn.Module], every: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.every = every

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        xt = x.transpose(0, 1).contiguous()
        anchor, L = xt, len(self.blocks)
        for i, blk in enumerate(self.blocks, start=1):
            xt = blk(xt)
            if self.every and i % self.every == 0 and i < L:
                xt = xt + anchor
                anchor = xt
        return StackOutput(xt.transpose(0, 1), aux, [])
