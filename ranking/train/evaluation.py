"""Evaluation over a whole validation set on every rank, and model selection on it."""

from __future__ import annotations

import math

import torch

from ranking.train.distributed import all_ranks


def evaluate(
    model,
    batches,
    schema,
    device: torch.device,
    compute_dtype: str = "fp32",
    on_batch=None,
) -> dict:
    """AUC/logloss/NE of ``model`` over this rank's ``batches``, gathered over all ranks.

    Every rank runs the same number of forwards (DistributedModelParallel's lookups are
    collective): a rank out of rows runs a batch it already scored (or an empty one) and
    discards the output, until no rank has data. ``compute_dtype`` as in training.
    ``on_batch(batch)`` sees every batch read (the trainer counts bad rows with it)."""
    from ranking.data.convert import batch_from_rows
    from ranking.metrics import EvalAccumulator
    from ranking.train.loss import precision

    model.eval()
    acc = EvalAccumulator(schema.task_names, device=device)
    it = iter(batches)
    dummy = None
    with torch.no_grad():
        while True:
            batch = next(it, None)
            if all_ranks(batch is not None, "sum", device) == 0:
                break
            real = batch is not None
            if real and on_batch is not None:
                on_batch(batch)
            if real and dummy is None:
                dummy = batch
            if not real:  # labels of the stand-in are zeros; its outputs are discarded
                batch = dummy if dummy is not None else batch_from_rows(schema, [{}])
            with precision(device, compute_dtype):
                out = model(batch.to(device))
            if real:
                acc.update(torch.sigmoid(out.logits.float()), batch.labels)
    model.train()
    return acc.compute()


def selection_value(m: dict, metric: str) -> float | None:
    """``metric`` of an evaluation: the single task's, or the first task's of a multi-task one."""
    if metric not in m:
        m = next((v for v in m.values() if isinstance(v, dict) and metric in v), {})
    v = m.get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def improves(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (AUC: higher; logloss: lower)."""
    if value is None:
        return False
    if best is None:
        return True
    return value > best if metric == "auc" else value < best
