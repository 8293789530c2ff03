"""The model a replica serves: load an artifact, validate it before it takes traffic, score.

``load_validated`` is the only way a model enters a replica: the manifest is read, the schema
is checked against the model it replaces (the same feature columns with the same kinds and the
same tasks, so that requests valid for the old model stay valid), and smoke forwards on two,
three and one all-missing rows must give finite probabilities of shape ``[rows, n_tasks]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ranking.data.convert import batch_from_rows
from ranking.export import Artifact, ArtifactError, load_artifact
from ranking.features import FeatureSchema


def _signature(schema: FeatureSchema) -> tuple:
    return (
        tuple(sorted((f.column, f.kind) for f in schema.features)),
        tuple(schema.task_names),
    )


def load_validated(
    path: str | Path, dtype: str | None, previous: Artifact | None, device: str = "cpu"
) -> Artifact:
    """Load ``path`` and validate it (``ArtifactError`` naming the file/key on failure).

    ``dtype``: None or "auto" keeps the artifact's own dtype; "fp32" / "bf16" / "int8" / "fp8"
    forces one.
    """
    if dtype in (None, "auto"):
        dtype = None
    art = load_artifact(path, dtype=dtype, device=device)
    if previous is not None and _signature(art.schema) != _signature(previous.schema):
        raise ArtifactError(
            f"{path}: schema is not compatible with the serving model "
            f"{previous.model_version}: features/tasks differ "
            f"({_signature(art.schema)} vs {_signature(previous.schema)})"
        )
    # Three batch sizes: a model served with inference.compile / compile_epilogues compiles for
    # the first shape; at the second, once more with the batch dimension dynamic (torch.compile's
    # automatic dynamic shapes), and a single row gets its own graph (sizes 0 and 1 are
    # specialised).
    # All of it happens here, before the model takes traffic, not on its first requests
    # (seconds each).
    for rows in (2, 3, 1):
        try:
            probs = art.predict(batch_from_rows(art.schema, [{}] * rows))
        except Exception as e:
            raise ArtifactError(f"{path}: smoke forward failed: {type(e).__name__}: {e}") from e
        if tuple(probs.shape) != (rows, len(art.schema.tasks)) or not torch.isfinite(probs).all():
            raise ArtifactError(
                f"{path}: smoke forward gave shape {tuple(probs.shape)} "
                f"(expected ({rows}, {len(art.schema.tasks)})) or non-finite values"
            )
    return art


def rank_response(art: Artifact, request_id: str, probs: np.ndarray, top_k: int | None) -> dict:
    """The answer for one request from its ``[n, n_tasks]`` probabilities. Candidates are
    ranked by the first task's score, best first (ties: lower index first)."""
    primary = probs[:, 0]
    order = np.argsort(-primary, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    out = {
        "request_id": request_id,
        "model_version": art.model_version,
        "scores": primary.tolist(),
        "ranking": order.tolist(),
    }
    tasks = art.schema.task_names
    if len(tasks) > 1:
        out["task_scores"] = {t: probs[:, j].tolist() for j, t in enumerate(tasks)}
    return out
