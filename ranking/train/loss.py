"""The training objective: BCE on every task's logit, the model's auxiliary losses, and the
optional L2 penalty on the looked-up embeddings; ``RankingTrain`` puts it around the model, as
TorchRec's ``DLRMTrain`` does, so that the model itself stays the math of the forward."""

from __future__ import annotations

import contextlib

import torch


def precision(device: torch.device, compute_dtype: str):
    """The context a training or evaluation forward runs in: bf16 autocast for
    ``compute_dtype: bf16`` (``train.compute_dtype``), else nothing."""
    if compute_dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embedding_l2_term(pooled: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of the squared L2 norm of the looked-up embeddings (all features)."""
    total = torch.zeros((), device=pooled[0].device)
    for e in pooled:
        total = total + e.float().pow(2).reshape(e.shape[0], -1).sum(1).mean()
    return total


def training_loss(
    out,
    labels: torch.Tensor,
    pooled: list[torch.Tensor],
    embedding_l2: float,
    task_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, bce)`` of one batch: ``out`` is the model's output (``logits [B, n_tasks]``,
    ``aux_loss`` or None, already weighted by the model config), ``pooled`` the batch's
    looked-up embeddings when ``embedding_l2`` penalises them. ``task_weights [n_tasks]``
    (``train.task_weights``) weighs each task's mean BCE in the loss, ``sum_t w_t BCE_t /
    n_tasks`` (all 1: the mean BCE); ``bce`` is the unweighted mean either way."""
    logits = out.logits.float()
    if task_weights is None:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        objective = bce
    else:
        per_task = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none"
        ).mean(0)
        bce = per_task.mean()
        objective = (per_task * task_weights).mean()
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
    loss = objective + aux.float()
    if pooled:
        loss = loss + embedding_l2 * embedding_l2_term(pooled)
    return loss, bce


class RankingTrain(torch.nn.Module):
    """The model with its training objective: ``forward(batch) -> (loss, (bce, out))``.

    ``model`` is the (DistributedModelParallel-wrapped) ranking model; its state and its
    checkpoints are its own, this wrapper adds no parameters. ``compute_dtype: bf16`` runs the
    forward under bf16 autocast (the loss itself in fp32). With ``embedding_l2``, a forward
    hook on each of ``embedding_owners`` (the modules that own an embedding collection: their
    output is the batch's looked-up embeddings, whatever the sharding) collects what the
    penalty applies to, in training mode only.

    Example::

        train_model = RankingTrain(dmp_model)
        loss, (bce, out) = train_model(batch)
        loss.backward()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        embedding_l2: float = 0.0,
        embedding_owners=(),
        compute_dtype: str = "fp32",
        task_weights: list[float] | None = None,
    ):
        super().__init__()
        self.model = model
        self.task_weights = (
            torch.tensor(task_weights, dtype=torch.float32) if task_weights else None
        )
        self.compute_dtype = compute_dtype
        self.embedding_l2 = embedding_l2
        self._pooled: list[torch.Tensor] = []
        if embedding_l2:
            for owner in embedding_owners:
                owner.register_forward_hook(self._keep_pooled)

    def _keep_pooled(self, _module, _inputs, output) -> None:
        if isinstance(output, tuple):  # the tokenizer's (pooled, sequences, targets)
            output = output[0]
        if self.model.training and isinstance(output, torch.Tensor):
            self._pooled.append(output)

    def forward(self, batch):
        try:
            with precision(batch.dense.device, self.compute_dtype):
                out = self.model(batch)
            w = self.task_weights
            w = None if w is None else w.to(batch.labels.device)
            loss, bce = training_loss(out, batch.labels, self._pooled, self.embedding_l2, w)
        finally:
            self._pooled.clear()
        return loss, (bce, out)
