"""Mixer blocks and the stacks that chain them: RankMixer, TokenMixer-Large, UniMixer.

Every stack maps tokens ``[B, T, D]`` to ``StackOutput(x [B, T, D], aux scalar, hidden)``;
``hidden`` holds the outputs of the lower layers (for TokenMixer-Large's auxiliary loss).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

import kernels
from kernels import cpu as cpu_kernels

from .ffn import DenseStage, PerTokenFFN, PerTokenSwiGLU, make_ffn
from .mixing import TokenMixing, UniMixing, UniMixingLite

log = logging.getLogger(__name__)


class StackOutput(NamedTuple):
    x: Tensor
    aux: Tensor
    hidden: list[Tensor]


# ----------------------------------------------------------------------------- token-major path
# On the CPU (when the kernel dispatch picks the PyTorch reference), the dense stacks run in a
# token-major layout ``[T, B, D]``: the per-token GEMMs then read and write contiguous
# ``[T, B, *]`` batches with no transposes, token mixing is one permuted copy, residuals and
# biases are folded into the second GEMM (``baddbmm``), norms run natively in bf16 (fp32
# statistics inside) and, without autograd, activations are applied in place. Same math as the
# ``[B, T, D]`` path (tests/test_model_blocks.py compares both, values and gradients); the
# GPU path keeps ``[B, T, D]`` for the Triton kernels.


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


def _gelu_ffn_hidden(ffn: PerTokenFFN, s: Tensor) -> Tensor:
    """``GELU(W1_t s_t + b1_t)`` for token-major ``s [T, B, D]`` -> ``[T, B, kD]``."""
    # the bias rides in the GEMM's accumulator: one broadcast write instead of a read-add-write
    # pass after it, identical outputs (docs/BENCHMARKS.md, "Measurements behind code choices")
    h = torch.baddbmm(ffn.b1.unsqueeze(1), s, ffn.w1)
    if torch.is_grad_enabled():
        return torch.nn.functional.gelu(h)
    return torch.ops.aten.gelu_(h)


# Compiled epilogues (``compile_epilogues``, inference on the CPU path only): the elementwise
# work between the GEMMs goes through ``torch.compile`` one function at a time, so Inductor's C++
# backend emits one vectorised pass per function while the GEMMs stay eager oneDNN calls.
# Exact GELU stays eager: compiled, it was slower than the in-place ``gelu_`` (the timings:
# docs/BENCHMARKS.md, "Measurements behind code choices").
# Compiling needs a working C++ compiler at run time (Inductor's CPU backend); where there is
# none (the serving image ships without one) or compilation fails otherwise, the function runs
# eagerly from then on, with one warning: same math, the eager speed.
_EPILOGUES: dict[str, object] = {}


def _compiled(name: str, fn):
    f = _EPILOGUES.get(name)
    if f is None:
        f = _EPILOGUES[name] = compiled_or_eager(fn, f"the {name} epilogue (compile_epilogues)")
    return f


def compiled_or_eager(fn, what: str, **compile_kwargs) -> CompiledOrEager:
    return CompiledOrEager(fn, what, **compile_kwargs)


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


def _swiglu_epilogue(gate_up: Tensor, hidden: int) -> Tensor:
    gate, up = gate_up.split(hidden, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _norm_epilogue(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool):
    if rms:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _normed(norm: nn.Module, x: Tensor, fused: bool) -> Tensor:
    """``norm(x)``; with ``fused``, through the compiled norm epilogue (same math)."""
    if not fused:
        return norm(x)
    rms = isinstance(norm, nn.RMSNorm)
    bias = None if rms else norm.bias
    return _compiled("norm", _norm_epilogue)(x, norm.weight, bias, _eps(norm), rms)


def _swiglu_act(ffn: PerTokenSwiGLU, x: Tensor, fused: bool = False) -> Tensor:
    """``Swish(gate) * up`` for token-major ``x [T, B, W]`` -> ``[T, B, Hd]``."""
    gate_up = torch.bmm(x, ffn.w_gate_up)
    if fused:
        return _compiled("swiglu", _swiglu_epilogue)(gate_up, ffn.hidden)
    gate, up = gate_up.split(ffn.hidden, dim=-1)
    act = torch.nn.functional.silu(gate)
    return act * up if torch.is_grad_enabled() else act.mul_(up)


_WARNED: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _cpu_args(block: nn.Module, x: Tensor, shapes_ok: bool, parts: list, prepare):
    """A block's ``kernels.cpu`` arguments, cached on ``block._prepared`` and made again by
    ``prepare()`` whenever a parameter of ``parts`` changed (``load_state_dict``, an optimizer
    step, a dtype move: pointer, version or dtype); None where the op cannot run: a non-CPU
    tensor, shapes it does not take, or no library / AMX (logged once)."""
    if x.device.type != "cpu" or not shapes_ok:
        return None
    if cpu_kernels.ops() is None:
        _warn_once(
            "cpu_fused_block", "cpu_fused_block: %s; running the eager block", cpu_kernels.reason()
        )
        return None
    params = [p for m in parts for p in m.parameters()]
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    if block._prepared is None or block._prepared[0] != key:
        block._prepared = (key, prepare())
    return block._prepared[1]


def _fused(block: nn.Module) -> bool:
    return block.compile_epilogues and not torch.is_grad_enabled()


def _dense_inner(stage: nn.Module, kind: type) -> nn.Module | None:
    if isinstance(stage, DenseStage) and isinstance(stage.ffn, kind):
        return stage.ffn
    return None


def token_major(blocks, x: Tensor) -> bool:
    """Whether a stack runs in the token-major CPU layout for input ``x``."""
    return (
        x.device.type != "cuda"
        and kernels.backend(x.device) == "torch"
        and all(getattr(b, "supports_token_major", False) for b in blocks)
    )


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-5) if kind == "layer" else nn.RMSNorm(dim, eps=1e-6)


def _eps(norm: nn.Module) -> float:
    return norm.eps if norm.eps is not None else 1e-6


class RankMixerBlock(nn.Module):
    """RankMixer block (post-LN): ``S = LN(TokenMixing(X) + X)``, ``X' = LN(PFFN(S) + S)``.

    ``[B, T, D] -> ([B, T, D], aux)``; TokenMixing uses H = T heads. The first add-and-norm is
    the fused ``kernels.mix_norm``.
    """

    def __init__(self, num_tokens: int, dim: int, cfg):
        super().__init__()
        self.num_tokens = num_tokens
        self.mixing = TokenMixing(num_tokens)
        self.norm1 = _norm(cfg.norm, dim)
        self.ffn = make_ffn(num_tokens, dim, cfg.ffn_mult, cfg, swiglu=False)
        self.norm2 = _norm(cfg.norm, dim)
        self.norm_kind = cfg.norm
        self.compile_epilogues = False  # set through Ranker.compile_epilogues
        self.cpu_fused_block = False  # set through Ranker.cpu_fused_block
        self._prepared: tuple | None = None  # (weights' identity, kernels.cpu arguments)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, s = kernels.mix_norm(
            x,
            self.num_tokens,
            self.norm1.weight,
            getattr(self.norm1, "bias", None),
            residual=x,
            norm=self.norm_kind,
            eps=_eps(self.norm1),
        )
        f, aux = self.ffn(s)
        return self.norm2(f + s), aux

    @property
    def supports_token_major(self) -> bool:
        return _dense_inner(self.ffn, PerTokenFFN) is not None

    def forward_tm(self, x: Tensor) -> Tensor:
        """The same block on token-major ``x [T, B, D]`` (dense PFFN only)."""
        ffn = _dense_inner(self.ffn, PerTokenFFN)
        if self.cpu_fused_block and not torch.is_grad_enabled() and x.dtype == torch.bfloat16:
            prepared = self._cpu_block_args(ffn, x)
            if prepared is not None:
                return cpu_kernels.rankmixer_block(x, prepared)
        fused = _fused(self)
        m = mix_tm(x, self.num_tokens).add_(x)
        s = _normed(self.norm1, m, fused)
        h = _gelu_ffn_hidden(ffn, s)
        # LN(PFFN(S) + S): the residual and b2 ride in the second GEMM's accumulator
        return _normed(self.norm2, torch.baddbmm(s + ffn.b2.unsqueeze(1), h, ffn.w2), fused)

    def _cpu_block_args(self, ffn: PerTokenFFN, x: Tensor) -> tuple | None:
        """``kernels.cpu``'s packed arguments for this block (re-packed whenever a parameter
        changed: ``load_state_dict``, an optimizer step, a dtype move), or None where the
        kernel cannot run it: no library or AMX (logged once), a non-CPU tensor or a shape it
        does not take. The caller then runs the eager path (same math)."""
        T, D, hidden = self.num_tokens, x.shape[-1], ffn.w1.shape[-1]
        rms = isinstance(self.norm1, nn.RMSNorm)

        def prepare():
            norm = lambda n: (n.weight, None if rms else n.bias, _eps(n))  # noqa: E731
            return cpu_kernels.prepare_rankmixer(
                norm(self.norm1), ffn.w1, ffn.b1, ffn.w2, ffn.b2, norm(self.norm2), rms
            )

        ok = cpu_kernels.supports(T, D, hidden)
        return _cpu_args(self, x, ok, [self.norm1, ffn, self.norm2], prepare)


class TokenMixerLargeBlock(nn.Module):
    """TokenMixer-Large block (pre-RMSNorm, bias-free):

    ``Hm = Mix(X)`` (``[B, H, T*D/H]``); ``H' = Hm + F1(RMSNorm(Hm))``;
    ``X_next = R + F2(RMSNorm(Revert(H')))`` with ``R = X`` (``second_residual: input``) or
    ``R = Revert(H')`` (``reverted``). F1 and F2 are per-token pSwiGLU (or the sparse MoE),
    F1 over the H mixed tokens, F2 over the T original tokens.
    """

    def __init__(self, num_tokens: int, dim: int, num_heads: int, cfg):
        super().__init__()
        T, D, H = num_tokens, dim, num_heads
        W = T * D // H
        self.num_tokens, self.num_heads = T, H
        self.second_residual = cfg.second_residual
        self.norm1 = nn.RMSNorm(W, eps=1e-6)
        self.f1 = make_ffn(H, W, cfg.ffn_mult, cfg, swiglu=True)
        self.norm2 = nn.RMSNorm(D, eps=1e-6)
        self.f2 = make_ffn(T, D, cfg.ffn_mult, cfg, swiglu=True)
        self.compile_epilogues = False  # set through Ranker.compile_epilogues
        self.cpu_fused_block = False  # set through Ranker.cpu_fused_block
        self._prepared: tuple | None = None  # (weights' identity, kernels.cpu arguments)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hm, hn = kernels.mix_norm(x, self.num_heads, self.norm1.weight, norm="rms", eps=1e-6)
        f1, aux1 = self.f1(hn)
        h = hm + f1
        r, rn = kernels.mix_norm(
            h, self.num_tokens, self.norm2.weight, revert=True, norm="rms", eps=1e-6
        )
        f2, aux2 = self.f2(rn)
        base = x if self.second_residual == "input" else r
        return base + f2, aux1 + aux2

    @property
    def supports_token_major(self) -> bool:
        return all(_dense_inner(f, PerTokenSwiGLU) is not None for f in (self.f1, self.f2))

    def forward_tm(self, x: Tensor) -> Tensor:
        """The same block on token-major ``x [T, B, D]`` (dense pSwiGLU only)."""
        f1, f2 = _dense_inner(self.f1, PerTokenSwiGLU), _dense_inner(self.f2, PerTokenSwiGLU)
        if self.cpu_fused_block and not torch.is_grad_enabled() and x.dtype == torch.bfloat16:
            prepared = self._cpu_stage_args(f1, f2, x)
            if prepared is not None:  # each stage one kernels.cpu op; mixing stays a copy
                hm = mix_tm(x, self.num_heads)
                r = revert_tm(cpu_kernels.swiglu_stage(hm, hm, prepared[0]), self.num_tokens)
                base = x if self.second_residual == "input" else r
                return cpu_kernels.swiglu_stage(r, base, prepared[1])
        fused = _fused(self)
        hm = mix_tm(x, self.num_heads)  # [H, B, W]
        a1 = _swiglu_act(f1, _normed(self.norm1, hm, fused), fused)
        h = torch.baddbmm(hm, a1, f1.w_down)  # Hm + F1(...)
        r = revert_tm(h, self.num_tokens)
        base = x if self.second_residual == "input" else r
        a2 = _swiglu_act(f2, _normed(self.norm2, r, fused), fused)
        return torch.baddbmm(base, a2, f2.w_down)

    def _cpu_stage_args(self, f1: PerTokenSwiGLU, f2: PerTokenSwiGLU, x: Tensor):
        """``kernels.cpu``'s packed arguments for the two stages (re-packed whenever a
        parameter changed), or None where the op cannot run them (see RankMixerBlock)."""
        ok = all(cpu_kernels.swiglu_supports(f.w_down.shape[-1], f.hidden) for f in (f1, f2))

        def prepare():
            return tuple(
                cpu_kernels.prepare_swiglu((n.weight, _eps(n)), f.w_gate_up, f.w_down)
                for n, f in ((self.norm1, f1), (self.norm2, f2))
            )

        return _cpu_args(self, x, ok, [self.norm1, f1, self.norm2, f2], prepare)


class UniMixerBlock(nn.Module):
    """UniMixer block with SiameseNorm: two streams (Xbar post-norm, Ybar pre-norm).

    Two sub-layers, each ``O = Sub(Xbar + RMSNorm(Ybar))``, ``Xbar <- RMSNorm(Xbar + O)``,
    ``Ybar <- Ybar + O``; Sub is UniMixing(-Lite), then the per-token SwiGLU.
    ``(Xbar [B, T, D], Ybar [B, T, D]) -> (Xbar, Ybar, aux)``.
    """

    def __init__(self, num_tokens: int, dim: int, mixing: nn.Module, cfg):
        super().__init__()
        self.mixing = mixing
        self.ffn = make_ffn(num_tokens, dim, cfg.ffn_mult, cfg, swiglu=True)
        self.y_norm1, self.x_norm1 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.y_norm2, self.x_norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, xbar: Tensor, ybar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        o = self.mixing(xbar + self.y_norm1(ybar))
        xbar, ybar = self.x_norm1(xbar + o), ybar + o
        o, aux = self.ffn(xbar + self.y_norm2(ybar))
        return self.x_norm2(xbar + o), ybar + o, aux


class RankMixerStack(nn.Module):
    """L RankMixer blocks in sequence: ``[B, T, D] -> StackOutput``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        if token_major(self.blocks, x):
            hidden = []
            xt = x.transpose(0, 1).contiguous()
            for blk in self.blocks:
                xt = blk.forward_tm(xt)
                hidden.append(xt.transpose(0, 1))
            return StackOutput(hidden[-1], aux, hidden[:-1])
        hidden = []
        for blk in self.blocks:
            x, a = blk(x)
            aux = aux + a
            hidden.append(x)
        return StackOutput(x, aux, hidden[:-1])


class TokenMixerLargeStack(RankMixerStack):
    """TokenMixer-Large blocks with an extra residual every ``every`` layers (never after the
    last): after layer l (1-based) with ``l % every == 0 and l < L``, ``x <- x + x_{l-every}``."""

    def __init__(self, blocks: list[nn.Module], every: int):
        super().__init__(blocks)
        self.every = every

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        tm = token_major(self.blocks, x)
        if tm:
            x = x.transpose(0, 1).contiguous()
        hidden, anchor, L = [], x, len(self.blocks)
        for i, blk in enumerate(self.blocks, start=1):
            if tm:
                x = blk.forward_tm(x)
            else:
                x, a = blk(x)
                aux = aux + a
            if self.every and i % self.every == 0 and i < L:
                x = x + anchor
                anchor = x
            hidden.append(x.transpose(0, 1) if tm else x)
        return StackOutput(hidden[-1], aux, hidden[:-1])


class UniMixerStack(nn.Module):
    """UniMixer blocks on SiameseNorm streams: ``Xbar = Ybar = X``, then the blocks, then the
    output ``Xbar + RMSNorm(Ybar)``: ``[B, T, D] -> StackOutput``."""

    def __init__(self, blocks: list[nn.Module], dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> StackOutput:
        aux = x.new_zeros((), dtype=torch.float32)
        xbar, ybar, hidden = x, x, []
        for blk in self.blocks:
            xbar, ybar, a = blk(xbar, ybar)
            aux = aux + a
            hidden.append(xbar + self.out_norm(ybar))
        return StackOutput(hidden[-1], aux, hidden[:-1])


def build_stack(c, num_tokens: int) -> nn.Module:
    """The mixer stack of a resolved ``ModelConfig`` (``c.resolve(T)`` done) over ``T`` tokens."""
    T, D = num_tokens, c.dim
    if c.arch == "rankmixer":
        return RankMixerStack([RankMixerBlock(T, D, c) for _ in range(c.num_layers)])
    if c.arch == "tokenmixer_large":
        H = c.num_heads or T
        return TokenMixerLargeStack(
            [TokenMixerLargeBlock(T, D, H, c) for _ in range(c.num_layers)],
            c.interlayer_residual_every,
        )
    if c.arch not in ("unimixer", "unimixer_lite"):
        raise ValueError(f"model.arch={c.arch!r} has no mixer stack")
    Bk = c.block_size or D

    def mixing():
        if c.arch == "unimixer":
            return UniMixing(T, D, Bk, c.sinkhorn_iters, c.flatten)
        return UniMixingLite(T, D, Bk, c.sinkhorn_iters, c.flatten, c.lite_bases, c.lite_rank)

    return UniMixerStack([UniMixerBlock(T, D, mixing(), c) for _ in range(c.num_layers)], D)
