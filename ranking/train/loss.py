"""The training objective: BCE on every task's logit, the model's auxiliary losses, and the
optional L2 penalty on the looked-up embeddings."""

from __future__ import annotations

import torch


def embedding_l2_term(pooled: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of the squared L2 norm of the looked-up embeddings (all features)."""
    total = torch.zeros((), device=pooled[0].device)
    for e in pooled:
        total = total + e.float().pow(2).reshape(e.shape[0], -1).sum(1).mean()
    return total


def training_loss(
    out, labels: torch.Tensor, pooled: list[torch.Tensor], embedding_l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, bce)`` of one batch: ``out`` is the model's output (``logits [B, n_tasks]``,
    ``aux_loss`` or None, already weighted by the model config), ``pooled`` the batch's
    looked-up embeddings when ``embedding_l2`` penalises them."""
    logits = out.logits.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
    loss = bce + aux.float()
    if pooled:
        loss = loss + embedding_l2 * embedding_l2_term(pooled)
    return loss, bce
