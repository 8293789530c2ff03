"""Small artifacts built in-process (random weights) for tests, benchmarks and smoke runs: the
artifact format of ``ranking.export`` with an untrained model, no training run needed."""

from __future__ import annotations

from pathlib import Path

from ranking.export import write_artifact


def make_artifact(
    out: str | Path,
    *,
    schema: str = "frappe",
    model: dict | None = None,
    seed: int = 0,
    dtype: str = "fp32",
    tasks: list[dict] | None = None,
    inference: dict | None = None,
) -> Path:
    """Write an artifact of an untrained model (weights from ``seed``) to ``out``.

    ``tasks`` replaces the schema's tasks (e.g. two tasks for a multi-task model);
    ``inference`` is the config's ``inference:`` section (how the artifact is served).
    """
    import torch

    from ranking.features import FeatureSchema, load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model

    fs = load_schema(schema)
    if tasks is not None:
        d = fs.to_dict()
        d["tasks"] = tasks
        fs = FeatureSchema.from_dict(d)
    model_cfg = model or {"arch": "rankmixer", "dim": 32, "num_tokens": 8, "num_layers": 1}
    torch.manual_seed(seed)
    net = build_model(ModelConfig.from_dict(model_cfg), fs)
    # Random-init embeddings are tiny; widen them so scores differ visibly between candidates.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "embedding" in name:
                p.normal_(0, 0.5)
    config = {"name": f"test-{seed}", "schema": fs.to_dict(), "model": model_cfg}
    if inference is not None:
        config["inference"] = inference
    return write_artifact(
        out, net.state_dict(), config=config, schema=fs, dtype=dtype, metrics={}, step=seed
    )
