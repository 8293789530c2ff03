"""The execution strategy for inference, as one pass over a trained model.

``optimize_for_inference(model, *, dtype="bf16", device="cpu")`` returns a model with the same
``forward(batch) -> RankerOutput`` in which the mixer blocks are swapped for their fast
implementations (``ranking.lowered``): token-major layout on the CPU, compiled epilogues, the
``kernels.cpu`` AMX ops where the CPU has AMX, weights in ``dtype`` (``int8``: the per-token
GEMMs as int8 GEMMs, ``kernels.cpu.int8``, the rest fp32). It is the one place that
picks an implementation (in the spirit of Liger-Kernel's ``apply_liger_kernel_to_*``): the
model's own code stays the papers' math. Serving, ``mixrank eval``, export and ``mixrank bench
model`` call it (through ``ranking.export.Artifact``); training never does.

The runtime choices it takes beyond ``dtype`` and ``device`` are the ``inference:`` section of
an experiment YAML (``InferenceConfig``)::

    inference:
      micro_batch: 256          # rows per chunk of the dense part (0: the whole batch)
      compile: false            # torch.compile the whole lowered stack
      compile_epilogues: true   # torch.compile the norms / SwiGLU between the GEMMs
      cpu_fused_block: true     # each block (stage) as one kernels.cpu op (bf16: AMX; int8: VNNI)
      cuda_graphs: true         # on a GPU: the dense part replayed from CUDA graphs

Example::

    fast = optimize_for_inference(model, dtype="bf16", **cfg.inference.options())
    probs = torch.sigmoid(fast(batch).logits)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import kernels
from kernels import cpu as cpu_kernels
from kernels.cpu import int8, vnni
from ranking.features import Batch
from ranking.lowered import (
    AmxRankMixer,
    AmxTokenMixerLarge,
    CompiledOrEager,
    CudaGraphs,
    Fp8Linear,
    Fp8RankMixer,
    Fp8SparseMoE,
    Fp8TokenMixerLarge,
    Int8Linear,
    Int8RankMixer,
    Int8SparseMoE,
    Int8SwiGLU,
    Int8TokenMixerLarge,
    TokenMajorRankMixer,
    TokenMajorStack,
    TokenMajorTokenMixerLarge,
    VnniInt8RankMixer,
    VnniInt8TokenMixerLarge,
    VnniInt8UniMixer,
    dense_ffn,
    has_token_major,
    int8_gemms,
    swap_linears,
)
from ranking.model.blocks import (
    RankMixerBlock,
    RankMixerStack,
    StackOutput,
    TokenMixerLargeStack,
    UniMixerStack,
)
from ranking.model.config import ConfigError, section_from_dict
from ranking.model.ffn import PerTokenSwiGLU, SparsePerTokenMoE
from ranking.model.output import RankerOutput

# ranking.model.ranker (the tokenizer: TorchRec) is imported where it is used, so that
# lower_stack and the fast blocks import on a machine with torch and triton only (the GPU
# benchmark machine: benchmarks/bench_stack_gpu.py)

log = logging.getLogger(__name__)

# The inference dtypes and the float dtype each computes in outside its GEMMs: int8 runs the
# mixer blocks' GEMMs (and a baseline's linear layers) in int8, everything else in fp32.
# fp8 runs the per-token GEMMs (and a baseline's linear layers) on e4m3 operands and the rest in
# bf16 on a GPU; on the CPU it is an emulation (the same quantization, fp32 around it) for
# accuracy checks, not for speed.
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.float32,
    "fp8": torch.bfloat16,
}


@dataclass
class InferenceConfig:
    """Runtime choices for inference (the ``inference:`` section; architecture-free).

    micro_batch: rows per chunk of the dense part (stack, pooling, heads); 0 = the whole batch.
        Exact; on the CPU chunks of about 256 rows keep the per-token GEMMs in cache.
    compile: ``torch.compile`` the lowered mixer stack (compiled on first use; a static shape
        first, then the batch dimension dynamic).
    compile_epilogues: on the CPU token-major path, only the norms and the SwiGLU activation
        between the GEMMs go through ``torch.compile`` (the GEMMs stay eager).
    cpu_fused_block: on the CPU, each RankMixer block, and each TokenMixer-Large pSwiGLU stage
        (int8: and each UniMixer FFN sub-layer),
        as one ``kernels.cpu`` op where the CPU and the build have it: bf16 with AMX GEMMs,
        int8 with AVX512-VNNI GEMMs (``kernels.cpu.vnni``), the norms, activations, biases and
        residuals fused around them; the token-major block elsewhere (logged once). The int8
        fused op is kept where it is the faster block: where oneDNN's int8 GEMMs are faster
        than the VNNI kernel (AMX-INT8 hosts), the two blocks are timed once per block shape.
    cuda_graphs: on a GPU, the dense part (stack, pooling, heads) of each chunk replayed from a
        CUDA graph, one per power-of-two row bucket (``ranking.lowered.CudaGraphs``): one launch
        instead of one per kernel; the tokenizer (TorchRec lookups) stays eager. The MoE aux
        loss is then over the padded bucket (logits are exact). Ignored off the GPU.
    """

    micro_batch: int = 0
    compile: bool = False
    compile_epilogues: bool = False
    cpu_fused_block: bool = False
    cuda_graphs: bool = False

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> InferenceConfig:
        cfg = section_from_dict(cls, data, "inference", source)
        if cfg.micro_batch < 0:
            raise ConfigError(
                f"{source}: inference.micro_batch: must be >= 0, got {cfg.micro_batch}"
            )
        return cfg

    def options(self) -> dict:
        """The keyword arguments of ``optimize_for_inference``."""
        return dataclasses.asdict(self)


_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _frozen_copy(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A deep copy in eval mode with floating parameters in ``dtype`` on ``device``, outside
    autograd; buffers keep their dtype (UniMixer's Sinkhorn temperature stays fp32; Sinkhorn
    computes in fp32 either way)."""
    part = copy.deepcopy(module).to(device)
    for m in part.modules():
        for key, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                m._parameters[key] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return part.eval()


def _fused_op(block, fused: type, lib, what: str, otherwise: str, *args) -> nn.Module | None:
    """``fused(block, *args)`` where ``lib`` (``kernels.cpu``: bf16 on AMX, ``kernels.cpu.vnni``: int8
    on AVX512-VNNI) runs here and takes the block's shapes; else None, with why logged once."""
    if lib.ops() is None:
        _warn_once(
            f"cpu_fused_block {what}", "cpu_fused_block (%s): %s; %s", what, lib.reason(), otherwise
        )
        return None
    if fused.supports(block):
        return fused(block, *args)
    _warn_once(
        f"cpu_fused_block {what} {type(block).__name__}",
        "cpu_fused_block (%s): %s does not take this %s's shapes; %s",
        what,
        lib.__name__,
        type(block).__name__,
        otherwise,
    )
    return None


def _fast_block(block, dtype, device, compile_epilogues: bool, cpu_fused_block: bool):
    rankmixer = isinstance(block, RankMixerBlock)
    if cpu_fused_block and dtype == torch.bfloat16:
        amx = AmxRankMixer if rankmixer else AmxTokenMixerLarge
        fused = _fused_op(block, amx, cpu_kernels, "bf16", "running the token-major block")
        if fused is not None:
            return fused
    fast = TokenMajorRankMixer if rankmixer else TokenMajorTokenMixerLarge
    return fast(block, dtype, device, compile_epilogues)


def _int8_block(block, compile_epilogues: bool, cpu_fused_block: bool, rows: int, chosen: dict):
    """One int8 block: with ``cpu_fused_block``, the fused VNNI op where it runs and is the
    faster of the two (``_fused_or_not``, decided once per block shape in ``chosen``), else the
    token-major block with each GEMM on its fastest route."""
    rankmixer = isinstance(block, RankMixerBlock)
    unfused = Int8RankMixer if rankmixer else Int8TokenMixerLarge
    key = (type(block).__name__, *(tuple(p.shape) for p in block.parameters()))
    if cpu_fused_block and chosen.get(key) != "unfused":
        op = VnniInt8RankMixer if rankmixer else VnniInt8TokenMixerLarge
        fused = _fused_op(block, op, vnni, "int8", "running each int8 GEMM on its own")
        if fused is not None:
            if key in chosen:
                return fused
            if _vnni_is_fastest(fused, rows):
                log.info(
                    "int8 %s: fused VNNI block (every GEMM's fastest route is vnni)",
                    type(block).__name__,
                )
                chosen[key] = "fused"
                return fused
            other = unfused(block, compile_epilogues, rows)
            chosen[key] = _fused_or_not(fused, other, block, rows)
            return fused if chosen[key] == "fused" else other
    return unfused(block, compile_epilogues, rows)


def _vnni_is_fastest(fused: nn.Module, rows: int) -> bool:
    """Whether the ``vnni`` route is the fastest int8 GEMM route (``Int8PerToken``'s timing at
    load) at each GEMM shape of ``fused``, probed on one token of random weights: the fused op
    runs that kernel with the steps in between fused, so it then wins without a race. One
    token favours oneDNN (its per-call cost is paid once, not once per token), so where vnni
    wins the probe it wins the block; where it loses, the blocks are raced."""

    def prepared(obj):
        if isinstance(obj, vnni.Prepared):
            yield obj
        elif isinstance(obj, tuple | list):
            for o in obj:
                yield from prepared(o)

    shapes = {(p.k, p.scale.shape[1]) for p in prepared(tuple(vars(fused).values()))}
    g = torch.Generator().manual_seed(0)
    return bool(shapes) and all(
        int8.Int8PerToken(torch.randn(1, k, n, generator=g), rows=rows).route == "vnni"
        for k, n in sorted(shapes)
    )


def _fused_or_not(fused: nn.Module, unfused: nn.Module, block, rows: int) -> str:
    """``fused`` or ``unfused``: which int8 block of the same weights runs ``rows`` rows per
    token faster, timed best of 3 (the fused one kept on a tie), where a probe found another
    route faster than ``vnni`` for some GEMM (``_vnni_is_fastest``: an AMX host, whose oneDNN
    int8 GEMMs run on AMX-INT8 tiles). Either choice scores the model (they differ only on an
    activation's rounding tie); it sets the speed."""
    routes = {g.route for g in int8_gemms(unfused)}
    if routes == {"vnni"}:  # the whole block's GEMMs took it after all
        return "fused"
    import time

    g = torch.Generator().manual_seed(0)
    x = torch.randn(block.num_tokens, max(rows, 1), block.norm2.weight.numel(), generator=g)
    best = {"fused": float("inf"), "unfused": float("inf")}
    with torch.inference_mode():
        for m in (fused, unfused):
            m(x)
        for _ in range(3):
            for name, m in (("fused", fused), ("unfused", unfused)):
                t0 = time.perf_counter()
                m(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    pick = "fused" if best["fused"] <= best["unfused"] else "unfused"
    log.info(
        "int8 %s at %d rows per token: fused VNNI block %.2f ms, unfused (GEMM routes %s) "
        "%.2f ms: %s",
        type(block).__name__, rows, best["fused"] * 1e3, ",".join(sorted(routes)),
        best["unfused"] * 1e3, pick,
    )  # fmt: skip
    return pick


def lower_stack(
    stack: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    compile_epilogues: bool = False,
    cpu_fused_block: bool = False,
    int8: bool = False,
    fp8: bool = False,
    rows: int = 256,
) -> nn.Module:
    """The fastest implementation of a mixer stack for ``device``: token-major blocks on the
    CPU (dense RankMixer / TokenMixer-Large; with ``int8`` their GEMMs in int8, each routed by
    its speed at ``rows`` rows: ``kernels.cpu.int8.Int8PerToken``), with ``fp8``
    token-major blocks whose GEMMs run on e4m3 operands (any device), else a frozen copy in
    ``dtype`` (UniMixer, MoE stages, and the GPU, where the blocks' own forward runs the Triton
    kernels); with ``int8`` a dense UniMixer block's per-token SwiGLU in int8 (``Int8SwiGLU``;
    with ``cpu_fused_block`` its FFN sub-layer as one VNNI op, ``VnniInt8UniMixer``) and the
    MoE stages' experts as grouped int8 GEMMs (``Int8SparseMoE``, where the VNNI op runs)."""
    dense = type(stack) in (RankMixerStack, TokenMixerLargeStack) and all(
        has_token_major(b) for b in stack.blocks
    )
    token_major = dense and (fp8 or (device.type == "cpu" and kernels.backend(device) == "torch"))
    if not token_major:
        frozen = _frozen_copy(stack, dtype, device)
        n_moe = n_int8 = 0
        if int8 and type(stack) is UniMixerStack:  # each block's dense per-token SwiGLU
            for i, (trained, blk) in enumerate(zip(stack.blocks, frozen.blocks)):
                ffn = dense_ffn(trained.ffn, PerTokenSwiGLU)
                if ffn is None:
                    continue
                n_int8 += 1
                if cpu_fused_block:  # the FFN sub-layer as one VNNI op
                    fused = _fused_op(
                        trained, VnniInt8UniMixer, vnni, "int8", "running its int8 GEMMs apart", blk
                    )
                    if fused is not None:
                        frozen.blocks[i] = fused
                        continue
                blk.ffn.ffn = Int8SwiGLU(ffn, rows)
        if fp8 or int8:  # the MoE stages' experts in fp8 / int8, quantized from the trained
            # (fp32) weights; routers (and fp8's shared experts) and the rest in dtype
            trained = dict(stack.named_modules())
            for name, m in list(frozen.named_modules()):
                if type(m) is SparsePerTokenMoE:
                    if int8 and vnni.ops() is None:  # the grouped int8 GEMM is the VNNI op's
                        _warn_once("int8 moe", "int8: MoE experts stay fp32 (%s)", vnni.reason())
                        continue
                    parent, _, attr = name.rpartition(".")
                    t = trained[name]
                    fast = Int8SparseMoE(t) if int8 else Fp8SparseMoE(t, dtype, device)
                    setattr(frozen.get_submodule(parent), attr, fast)
                    n_moe += 1
                    n_int8 += int(int8)
        if (int8 and not n_int8) or (fp8 and not n_moe):
            _warn_once(
                f"{'int8' if int8 else 'fp8'} {type(stack).__name__}",
                "%s: no %s lowering for %s (it covers the dense RankMixer, TokenMixer-Large "
                "%s); its blocks run in %s",
                *(
                    ("int8", "int8", "and UniMixer blocks")
                    if int8
                    else ("fp8", "fp8", "blocks and MoE experts")
                ),
                type(stack).__name__,
                str(dtype).removeprefix("torch."),
            )
        return frozen
    if fp8:
        blocks = [
            Fp8RankMixer(b, dtype, device)
            if isinstance(b, RankMixerBlock)
            else Fp8TokenMixerLarge(b, dtype, device)
            for b in stack.blocks
        ]
    elif int8:
        chosen: dict = {}  # fused or not, per block shape
        blocks = [
            _int8_block(b, compile_epilogues, cpu_fused_block, rows, chosen) for b in stack.blocks
        ]
    else:
        blocks = [
            _fast_block(b, dtype, device, compile_epilogues, cpu_fused_block) for b in stack.blocks
        ]
    return TokenMajorStack(blocks, getattr(stack, "every", 0))


class InferenceRanker(nn.Module):
    """A ``Ranker`` lowered for inference: ``Batch -> RankerOutput`` without autograd.

    The tokenizer (embedding tables, token projections) is the trained model's, shared and not
    copied; the stack is lowered (``lower_stack``) and the heads are a copy in ``dtype``. The
    tokens are cast to ``dtype`` once after the tokenizer; the dense part runs on chunks of
    ``micro_batch`` rows (0: the whole batch), through ``torch.compile`` with ``compile``.
    """

    def __init__(
        self,
        model: nn.Module,  # a ranking.model.ranker.Ranker
        stack: nn.Module,
        heads: nn.Module,
        dtype: torch.dtype,
        micro_batch: int = 0,
        compile: bool = False,
        cuda_graphs: bool = False,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.tokenizer, self.blocks, self.heads = model.tokenizer, stack, heads
        self.pooling, self.dtype, self.micro_batch = model.pooling, dtype, micro_batch
        self._stack = (
            CompiledOrEager(stack.forward, "the mixer stack (compile)", dynamic=False)
            if compile
            else stack
        )
        self.compile = compile
        self.graphs = None
        if cuda_graphs:
            if device is not None and device.type == "cuda":
                self.graphs = CudaGraphs(self._dense_part, max_rows=micro_batch or 4096)
            else:
                _warn_once("cuda_graphs", "inference.cuda_graphs: ignored off the GPU (%s)", device)
        self.training = False  # not self.eval(): that would reach the shared tokenizer

    def dense_part(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Stack, pooling and heads on one chunk: ``tokens [b, T, D] -> (logits, aux)``
        (from a CUDA graph with ``cuda_graphs``)."""
        if self.graphs is not None:
            return self.graphs(tokens.to(self.dtype))
        return self._dense_part(tokens.to(self.dtype))

    def _dense_part(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        out: StackOutput = self._stack(tokens)
        from ranking.model.ranker import pool_tokens

        return self.heads(pool_tokens(out.x, self.pooling)), out.aux

    def chunks(self, tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        B = tokens.shape[0]
        step = self.micro_batch if 0 < self.micro_batch < B else max(B, 1)
        return [self.dense_part(tokens[i : i + step]) for i in range(0, B, step)]

    @torch.no_grad()
    def forward(self, batch: Batch) -> RankerOutput:
        tokens = self.tokenizer(batch.dense, batch.sparse, batch.sequences, batch.seq_of)
        parts = self.chunks(tokens)
        logits = torch.cat([p[0] for p in parts]).float()
        B = tokens.shape[0]
        aux = sum(p[1].float() * p[0].shape[0] for p in parts) / max(B, 1)
        return RankerOutput(logits, aux if torch.is_tensor(aux) else logits.new_zeros(()))


class AutocastModel(nn.Module):
    """A model without a lowering of its own (the DLRM / DCNv2 baselines) run in eval mode
    without autograd, under autocast to ``dtype`` when that is bf16."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.model, self.dtype, self.device_type = model, dtype, device.type

    @torch.no_grad()
    def forward(self, batch: Batch) -> RankerOutput:
        bf16 = self.dtype == torch.bfloat16
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=bf16):
            return self.model(batch)


class QuantizedModel(nn.Module):
    """A model without a lowering of its own (the DLRM / DCNv2 baselines) with every
    ``nn.Linear`` outside its embedding tables a quantized GEMM (``make``:
    ``ranking.lowered.Int8Linear`` or ``Fp8Linear``): a copy that shares the tables, in eval
    mode, without autograd. DCNv2's low-rank cross layers are parameters, not ``nn.Linear``:
    they stay fp32."""

    def __init__(self, model: nn.Module, make=Int8Linear, fuse_relu=None):
        super().__init__()
        shared = {
            id(m): m
            for m in model.modules()
            if type(m).__module__.startswith(("torchrec.modules.embedding", "torchrec.quant"))
        }
        self.model = copy.deepcopy(model.eval(), memo=shared)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.swapped = swap_linears(self.model, make, fuse_relu)
        self.training = False  # not self.eval(): that would reach the shared tables

    @torch.no_grad()
    def forward(self, batch: Batch) -> RankerOutput:
        return self.model(batch)


def optimize_for_inference(
    model: nn.Module,
    *,
    dtype: str = "bf16",
    device: str | torch.device = "cpu",
    micro_batch: int = 0,
    compile: bool = False,
    compile_epilogues: bool = False,
    cpu_fused_block: bool = False,
    cuda_graphs: bool = False,
) -> nn.Module:
    """``model`` lowered for inference on ``device`` in ``dtype`` (``fp32`` | ``bf16`` |
    ``int8``: the mixer blocks' per-token GEMMs, or a baseline's linear layers, as int8 GEMMs
    with per-channel weight and per-row activation scales, the rest fp32; CPU only | ``fp8``:
    the same GEMMs on e4m3 operands with per-column weight and per-row activation scales
    (``kernels.grouped_linear_fp8``), the rest bf16; for a GPU, emulated on the CPU).

    The result has the same ``forward(batch) -> RankerOutput`` and gives the same logits within
    ``dtype``'s rounding (tests/test_inference.py, every architecture). It runs without
    autograd. A ``Ranker`` becomes an ``InferenceRanker`` that shares the embedding tables and
    holds its own copies of the dense weights: later changes to ``model``'s dense weights do not
    reach it (lower again). Other models (the baselines) run in eval mode under autocast for
    bf16 (and are put in eval mode). The keyword options are ``InferenceConfig``'s fields.
    """
    if dtype not in DTYPES:
        raise ValueError(
            f"optimize_for_inference: dtype: expected one of {list(DTYPES)}, got {dtype!r}"
        )
    dev = torch.device(device)
    int8, fp8 = dtype == "int8", dtype == "fp8"
    if int8 and dev.type != "cpu":
        raise ValueError(
            f"optimize_for_inference: dtype int8 runs on the CPU, not on {dev} (fp8, bf16 or "
            f"fp32 there)"
        )
    if fp8 and dev.type == "cpu":
        _warn_once(
            "fp8 cpu",
            "fp8 on the CPU: an emulation of the GPU's e4m3 GEMMs (same quantization, fp32 "
            "around it), for accuracy checks; it is slower than fp32",
        )
    on = {p.device.type for p in model.parameters()}
    if on and on != {dev.type}:
        raise ValueError(
            f"optimize_for_inference: the model's parameters are on {sorted(on)}, device={dev}: "
            f"move the model first (model.to(device))"
        )
    dt = torch.float32 if fp8 and dev.type == "cpu" else DTYPES[dtype]
    rows = micro_batch or 256  # what int8's GEMM routes are timed at (serving's micro-batch)
    from ranking.model.ranker import Ranker

    if not isinstance(model, Ranker):
        if int8 or fp8:
            if int8:  # Perceptron layers (linear + ReLU) with the ReLU in the GEMM's store
                relu = functools.partial(Int8Linear, rows=rows, relu=True)
                return QuantizedModel(model, functools.partial(Int8Linear, rows=rows), relu)
            return QuantizedModel(model, Fp8Linear)
        return AutocastModel(model.eval(), dt, dev)
    stack = lower_stack(
        model.blocks, dt, dev, compile_epilogues, cpu_fused_block, int8, fp8, rows=rows
    )
    heads = _frozen_copy(model.heads, dt, dev)
    return InferenceRanker(model, stack, heads, dt, micro_batch, compile, cuda_graphs, dev)
