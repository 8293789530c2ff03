"""The ranking model: tokenizer -> mixer stack -> pooled task heads; and ``build_model``.

model = build_model(config, schema)
out = model(batch)               # RankerOutput(logits [B, n_tasks], aux_loss scalar)
loss = bce(out.logits, batch.labels) + out.aux_loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ranking.features import Batch, FeatureSchema

from .blocks import build_stack
from .config import ModelConfig, temperature_at
from .heads import TaskHeads, build_heads  # noqa: F401 - TaskHeads: re-exported
from .output import RankerOutput
from .tokenizer import Tokenizer


def pool_tokens(x: Tensor, pooling: str) -> Tensor:
    """``[B, T, D] -> [B, P]``: ``mean`` over tokens, the ``first`` token, or ``flatten``."""
    if pooling == "mean":
        if x.dtype in (torch.bfloat16, torch.float16):
            # the same fp32-accumulated mean as x.mean(1), faster in bf16 on CPU
            # (docs/BENCHMARKS.md, "Measurements behind code choices")
            return x.sum(1, dtype=torch.float32).div_(x.shape[1]).to(x.dtype)
        return x.mean(1)
    if pooling == "first":
        return x[:, 0]
    return x.flatten(1)


class Ranker(nn.Module):
    """``Batch -> RankerOutput``: tokenizer ``[B, T, D]`` -> stack -> pool -> task heads.

    Args:
        tokenizer: ``Tokenizer`` (holds the EmbeddingBagCollection at ``tokenizer.embeddings.ebc``).
        blocks: a stack module ``[B, T, D] -> StackOutput``.
        heads: ``TaskHeads``.
        pooling: ``mean`` over tokens, ``first`` token (the global token), or ``flatten``.
        aux_loss_weight: weight of the BCE loss of the heads on each lower layer's output
            (TokenMixer-Large), training only.
        temperature: UniMixer's Sinkhorn temperature ``(start, end)`` over training.
        token_dropout: dropout probability on the tokens entering the stack (training only).

    The model is the math only: how it is executed (bf16 weights, token-major layout, compiled
    or fused kernels, micro-batches) is ``ranking.inference.optimize_for_inference``'s choice,
    and mixed precision in training is the trainer's (``train.compute_dtype``).

    Example::

        model = build_model(ModelConfig.from_dict({"arch": "rankmixer", "num_tokens": 4}), schema)
        out = model(batch)  # RankerOutput(logits [B, n_tasks], aux_loss scalar)
    """

    def __init__(
        self,
        tokenizer: nn.Module,
        blocks: nn.Module,
        heads: nn.Module,
        pooling: str = "mean",
        aux_loss_weight: float = 0.0,
        temperature: tuple[float, float] = (1.0, 0.05),
        token_dropout: float = 0.0,
    ):
        super().__init__()
        self.token_dropout = token_dropout
        self.temperature = temperature  # UniMixer's Sinkhorn tau: (start, end) of the anneal
        self.tokenizer, self.blocks, self.heads = tokenizer, blocks, heads
        self.pooling, self.aux_loss_weight = pooling, aux_loss_weight

    def set_progress(self, fraction: float) -> None:
        """Training-schedule hook (the trainer calls it every step with steps done / total):
        anneals UniMixer's Sinkhorn temperature linearly from ``tau_start`` to ``tau_end``. The
        temperature is a buffer, so the exported model serves with the final value."""
        from .mixing import set_temperature

        start, end = self.temperature
        set_temperature(self, temperature_at(fraction, 1.0, start, end))

    def pool(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, P]``."""
        return pool_tokens(x, self.pooling)

    def dense_part(self, tokens: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Stack, pooling and heads: ``tokens [B, T, D] -> (logits [B, n_tasks], aux scalar)``.

        In training with ``aux_loss_weight`` and ``labels``, ``aux`` adds the heads' BCE on
        each lower layer's output (mean over rows and tasks, times the weight)."""
        out = self.blocks(tokens)
        logits = self.heads(self.pool(out.x))
        aux = out.aux
        if self.training and self.aux_loss_weight and labels is not None and out.hidden:
            for h in out.hidden:
                low = self.heads(self.pool(h)).float()
                aux = aux + self.aux_loss_weight * F.binary_cross_entropy_with_logits(low, labels)
        return logits, aux

    def forward(self, batch: Batch) -> RankerOutput:
        tokens = self.tokenizer(batch.dense, batch.sparse, batch.sequences, batch.seq_of)
        if self.token_dropout and self.training:
            tokens = F.dropout(tokens, self.token_dropout, training=True)
        labels = batch.labels.float() if batch.labels is not None else None
        logits, aux = self.dense_part(tokens, labels)
        return RankerOutput(logits.float(), aux.float())


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
        sequence=c.sequence,
    )
    T, D = tok.num_tokens, c.dim
    c.resolve(T)
    stack = build_stack(c, T)
    pooled = T * D if c.pooling == "flatten" else D
    heads = build_heads(pooled, schema.task_names, c.head_hidden, c.head_dropout, c.heads)
    return Ranker(
        tok,
        stack,
        heads,
        pooling=c.pooling,
        aux_loss_weight=c.tokenmixer_large.aux_loss_weight,
        temperature=(c.unimixer.tau_start, c.unimixer.tau_end),
        token_dropout=c.token_dropout,
    )
