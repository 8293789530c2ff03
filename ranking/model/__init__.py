"""The model family: RankMixer, TokenMixer-Large, UniMixer(-Lite), and the DLRM / DCNv2 baselines.

    from ranking.model import ModelConfig, build_model, load_experiment
    cfg, schema = load_experiment("configs/models/rankmixer_small.yaml")
    model = build_model(cfg, schema)
    out = model(batch)          # RankerOutput(logits [B, n_tasks], aux_loss scalar)

See docs/MODELS.md for the equations, config keys and defaults.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ranking.features import load_schema

from .config import ConfigError, ModelConfig, MoEConfig, load_experiment

if TYPE_CHECKING:
    from .ranker import Ranker, RankerOutput, build_model

# The ranker (and with it torchrec, through the tokenizer) is imported on first use, so that
# ``ranking.model.blocks`` / ``mixing`` / ``ffn`` / ``flops`` load without torchrec (the GPU
# stack benchmark runs where only torch and triton are installed).
_LAZY = {"Ranker": "ranker", "RankerOutput": "ranker", "build_model": "ranker"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
