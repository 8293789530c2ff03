"""Evaluation metrics: AUC, logloss and normalised entropy, per task, over a whole data set.

In distributed evaluation every rank scores its own shard; ``EvalAccumulator.compute`` gathers
the predictions and labels of all ranks before computing, so the AUC is the AUC of the whole
validation set (not an average of per-rank AUCs). AUC is torchmetrics' exact
``binary_auroc`` (ties handled); logloss is the mean binary cross-entropy in nats; NE is the
logloss divided by the entropy of the data set's positive rate (He et al., 2014).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-7


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """AUC, logloss, NE and row count of one task (None where undefined: one class only).

    Args:
        probs: ``[N]`` predicted probabilities.
        labels: ``[N]`` 0/1 labels.
    """
    from torchmetrics.functional.classification import binary_auroc

    probs = probs.double().clamp(EPS, 1 - EPS)
    labels = labels.double()
    n = labels.numel()
    if n == 0:
        return {"auc": None, "logloss": None, "ne": None, "rows": 0}
    logloss = torch.nn.functional.binary_cross_entropy(probs, labels).item()
    p = labels.mean().item()
    if 0.0 < p < 1.0:
        auc = binary_auroc(probs, labels.long(), thresholds=None).item()
        base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        ne = logloss / base
    else:  # AUC and NE are undefined for a single-class set: null in JSON, not NaN
        auc, ne = None, None
    return {"auc": auc, "logloss": logloss, "ne": ne, "rows": n}


class EvalAccumulator:
    """Collects ``[B, n_tasks]`` probabilities and labels; computes metrics over all ranks."""

    def __init__(self, task_names: list[str], device=None):
        self.task_names = list(task_names)
        self.device = device  # where the gather runs (NCCL needs CUDA tensors); None: CPU
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self._probs.append(probs.detach().float().cpu().reshape(-1, len(self.task_names)))
        self._labels.append(labels.detach().float().cpu().reshape(-1, len(self.task_names)))

    def _local(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.task_names)
        if not self._probs:
            return torch.empty(0, n), torch.empty(0, n)
        return torch.cat(self._probs), torch.cat(self._labels)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' ``(probs, labels)``, concatenated in rank order (every rank gets them)."""
        probs, labels = self._local()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return probs, labels
        ws = torch.distributed.get_world_size()
        dev = self.device or torch.device("cpu")
        size = torch.tensor([probs.shape[0]], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(ws)]
        torch.distributed.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        cap = max(sizes)
        both = torch.cat([probs, labels], dim=1)
        padded = torch.zeros(cap, both.shape[1], device=dev)
        padded[: both.shape[0]] = both.to(dev)
        outs = [torch.zeros_like(padded) for _ in range(ws)]
        torch.distributed.all_gather(outs, padded)
        allrows = torch.cat([o[:s].cpu() for o, s in zip(outs, sizes)])
        n = len(self.task_names)
        return allrows[:, :n], allrows[:, n:]

    def compute(self) -> dict:
        """``{"auc", "logloss", "ne", "rows"}`` for one task, or ``{task: {...}}`` for several."""
        probs, labels = self.gathered()
        per_task = {
            t: binary_metrics(probs[:, i], labels[:, i]) for i, t in enumerate(self.task_names)
        }
        if len(self.task_names) == 1:
            return per_task[self.task_names[0]]
        return per_task
