"""The model family: RankMixer, TokenMixer-Large, UniMixer(-Lite), and the DLRM / DCNv2 baselines.

    from ranking.model import ModelConfig, build_model, load_experiment
    cfg, schema = load_experiment("configs/models/rankmixer_small.yaml")
    model = build_model(cfg, schema)
    out = model(batch)          # RankerOutput(logits [B, n_tasks], aux_loss scalar)

See docs/MODELS.md for the equations, config keys and defaults.
"""

from ranking.features import load_schema

from .config import ConfigError, ModelConfig, MoEConfig, load_experiment
from .ranker import Ranker, RankerOutput, build_model

__all__ = [
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "Ranker",
    "RankerOutput",
    "build_model",
    "load_experiment",
    "load_schema",
]
