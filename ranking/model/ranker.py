"""The ranking model: tokenizer -> mixer stack -> pooled task heads; and ``build_model``.

model = build_model(config, schema)
out = model(batch)               # RankerOutput(logits [B, n_tasks], aux_loss scalar)
loss = bce(out.logits, batch.labels) + out.aux_loss
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranking.features import Batch, FeatureSchema

from .blocks import build_stack, compiled_or_eager
from .config import ModelConfig, temperature_at
from .output import RankerOutput
from .tokenizer import Tokenizer


class TaskHeads(nn.Module):
    """One MLP head per task: ``[B, P] -> [B, n_tasks]``.

    ``dropout`` (training only) drops the pooled input and the output of each hidden ReLU; it is
    applied functionally, so the parameter names (``heads.<task>.<layer>``) do not depend on it.
    """

    def __init__(self, in_dim: int, tasks: list[str], hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.dropout = dropout
        heads = []
        for _ in self.tasks:
            layers, d = [], in_dim
            for h in hidden:
                layers += [nn.Linear(d, h), nn.ReLU()]
                d = h
            layers.append(nn.Linear(d, 1))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)

    def _head(self, head: nn.Sequential, z: Tensor) -> Tensor:
        if not (self.dropout and self.training):
            return head(z)
        z = F.dropout(z, self.dropout, training=True)
        for layer in head:
            z = layer(z)
            if isinstance(layer, nn.ReLU):
                z = F.dropout(z, self.dropout, training=True)
        return z

    def forward(self, z: Tensor) -> Tensor:
        return torch.cat([self._head(h, z) for h in self.heads], dim=1)


class Ranker(nn.Module):
    """``Batch -> RankerOutput``: tokenizer ``[B, T, D]`` -> stack -> pool -> task heads.

    Args:
        tokenizer: ``Tokenizer`` (holds the EmbeddingBagCollection at ``tokenizer.embeddings.ebc``).
        blocks: a stack module ``[B, T, D] -> StackOutput``.
        heads: ``TaskHeads``.
        pooling: ``mean`` over tokens, ``first`` token (the global token), or ``flatten``.
        aux_loss_weight: weight of the BCE loss of the heads on each lower layer's output
            (TokenMixer-Large), training only.
        micro_batch: run the stack on row chunks of this size (exact; better cache use on CPU).
        compute_dtype: ``bf16`` autocasts the dense part.
        compile: run the stack through ``torch.compile`` (compiled on first use).
        compile_epilogues: on the CPU inference path, run the norms and the SwiGLU activation
            between the GEMMs through ``torch.compile`` (GEMMs stay eager); settable later.
        cpu_fused_block: on the bf16 CPU inference path, run each RankMixer block (each
            TokenMixer-Large pSwiGLU stage) as one ``kernels.cpu`` op (AMX GEMMs with fused
            epilogues) where the CPU and the build have it; the eager block elsewhere;
            settable later.
        token_dropout: dropout probability on the tokens entering the stack (training only).
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        blocks: nn.Module,
        heads: nn.Module,
        pooling: str = "mean",
        aux_loss_weight: float = 0.0,
        micro_batch: int = 0,
        compute_dtype: str = "fp32",
        compile: bool = False,
        temperature: tuple[float, float] = (1.0, 0.05),
        token_dropout: float = 0.0,
        compile_epilogues: bool = False,
        cpu_fused_block: bool = False,
    ):
        super().__init__()
        self.token_dropout = token_dropout
        self.temperature = temperature  # UniMixer's Sinkhorn tau: (start, end) of the anneal
        self.tokenizer, self.blocks, self.heads = tokenizer, blocks, heads
        self.compile = compile
        self._compiled = None  # a compiled function, not a submodule: state_dict keys unchanged
        self.pooling, self.aux_loss_weight = pooling, aux_loss_weight
        self.micro_batch, self.compute_dtype = micro_batch, compute_dtype
        self.compile_epilogues = compile_epilogues
        self.cpu_fused_block = cpu_fused_block

    @property
    def cpu_fused_block(self) -> bool:
        return self._cpu_fused_block

    @cpu_fused_block.setter
    def cpu_fused_block(self, on: bool) -> None:
        self._cpu_fused_block = bool(on)
        for m in self.blocks.modules():
            if hasattr(m, "cpu_fused_block"):
                m.cpu_fused_block = bool(on)

    @property
    def compile_epilogues(self) -> bool:
        return self._compile_epilogues

    @compile_epilogues.setter
    def compile_epilogues(self, on: bool) -> None:
        self._compile_epilogues = bool(on)
        for m in self.blocks.modules():
            if hasattr(m, "compile_epilogues"):
                m.compile_epilogues = bool(on)

    def set_progress(self, fraction: float) -> None:
        """Training-schedule hook (the trainer calls it every step with steps done / total):
        anneals UniMixer's Sinkhorn temperature linearly from ``tau_start`` to ``tau_end``. The
        temperature is a buffer, so the exported model serves with the final value."""
        from .mixing import set_temperature

        start, end = self.temperature
        set_temperature(self, temperature_at(fraction, 1.0, start, end))

    def pool(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, P]``."""
        if self.pooling == "mean":
            if x.dtype in (torch.bfloat16, torch.float16):
                # the same fp32-accumulated mean as x.mean(1), faster in bf16 on CPU
                # (docs/BENCHMARKS.md, "Measurements behind code choices")
                return x.sum(1, dtype=torch.float32).div_(x.shape[1]).to(x.dtype)
            return x.mean(1)
        if self.pooling == "first":
            return x[:, 0]
        return x.flatten(1)

    def _stack(self, tokens: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Stack + heads on one chunk: ``(logits [b, n_tasks], aux summed over the chunk's rows)``."""
        if self.compile and self._compiled is None:
            self._compiled = compiled_or_eager(
                self.blocks.forward, "the mixer stack (compile)", dynamic=False
            )
        out = self._compiled(tokens) if self.compile else self.blocks(tokens)
        logits = self.heads(self.pool(out.x))
        aux = out.aux * tokens.shape[0]
        if self.training and self.aux_loss_weight and labels is not None and out.hidden:
            for h in out.hidden:
                low = self.heads(self.pool(h)).float()
                aux = (
                    aux
                    + self.aux_loss_weight
                    * F.binary_cross_entropy_with_logits(low, labels, reduction="sum")
                    / labels.shape[1]
                )
        return logits, aux

    def forward(self, batch: Batch) -> RankerOutput:
        device = batch.dense.device
        ctx = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.compute_dtype == "bf16"
            else contextlib.nullcontext()
        )
        with ctx:
            tokens = self.tokenizer(batch.dense, batch.sparse)
            if self.token_dropout and self.training:
                tokens = F.dropout(tokens, self.token_dropout, training=True)
            if not torch.is_autocast_enabled(device.type):  # weights converted with .to(dtype)
                tokens = tokens.to(self.heads.heads[0][-1].weight.dtype)
            B = tokens.shape[0]
            labels = batch.labels.float() if batch.labels is not None else None
            step = self.micro_batch if 0 < self.micro_batch < B else B
            parts = [
                self._stack(tokens[i : i + step], None if labels is None else labels[i : i + step])
                for i in range(0, B, step)
            ]
        logits = torch.cat([p[0] for p in parts]).float()
        aux = sum(p[1] for p in parts) / max(B, 1)
        return RankerOutput(logits, aux.float() if torch.is_tensor(aux) else logits.new_zeros(()))


def bf16_dense(model: Ranker) -> Ranker:
    """A bf16 inference copy of ``model``: the stack's and heads' parameters converted to
    bf16 (copies), the tokenizer (embedding tables and token projections, fp32) shared, not
    copied. Its forward runs without autocast: tokens are cast to bf16 once after the
    tokenizer. Buffers keep their dtype (UniMixer's Sinkhorn temperature stays fp32; Sinkhorn
    itself computes in fp32 either way).

    Why not autocast: autocast keeps fp32 weights and casts at every GEMM, and CPU autocast
    runs LayerNorm in fp32, so each block converts its activations back and forth
    (fp32 <-> bf16 copies, mixed-dtype adds): slower (docs/BENCHMARKS.md, "Measurements behind
    code choices"). ``benchmarks.bench_model``'s bf16 mode is the same conversion.
    """
    out = copy.copy(model)  # a shallow copy: give it its own module table before assigning
    out._modules = dict(model._modules)
    out._compiled = None
    for name in ("blocks", "heads"):
        part = copy.deepcopy(getattr(model, name))
        for m in part.modules():
            for key, p in m._parameters.items():
                if p is not None and p.is_floating_point():
                    m._parameters[key] = nn.Parameter(
                        p.detach().to(torch.bfloat16), requires_grad=False
                    )
        setattr(out, name, part.eval())
    out.compute_dtype = "fp32"  # no autocast inside: the weights are bf16 already
    out.training = False  # the shared tokenizer keeps its own mode
    return out


def build_model(
    config: ModelConfig, schema: FeatureSchema, device: torch.device | str | None = None
) -> nn.Module:
    """The model for ``config`` on ``schema``: a ``Ranker`` (mixers) or a baseline wrapper.

    ``device`` places the embedding tables (``"meta"`` builds without allocating); dense
    parameters follow the ambient default device (``with torch.device("meta"): ...``).
    """
    if config.arch in ("dlrm", "dcnv2"):
        from .baselines import build_baseline

        return build_baseline(config, schema, device)
    c = config
    tok = Tokenizer(
        schema,
        c.dim,
        mode=c.tokenizer,
        num_tokens=c.num_tokens,
        token_proj=c.token_proj,
        dense_token=c.dense_token,
        global_token=c.global_token,
        device=device,
        embedding_init_scale=c.embedding_init_scale,
    )
    T, D = tok.num_tokens, c.dim
    c.resolve(T)
    stack = build_stack(c, T)
    pooled = T * D if c.pooling == "flatten" else D
    heads = TaskHeads(pooled, schema.task_names, c.head_hidden, dropout=c.head_dropout)
    return Ranker(
        tok,
        stack,
        heads,
        pooling=c.pooling,
        aux_loss_weight=c.aux_loss_weight,
        micro_batch=c.micro_batch,
        compute_dtype=c.compute_dtype,
        compile=c.compile,
        temperature=(c.tau_start, c.tau_end),
        token_dropout=c.token_dropout,
        compile_epilogues=c.compile_epilogues,
        cpu_fused_block=c.cpu_fused_block,
    )
