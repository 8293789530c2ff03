"""What every ranking model returns: the one output type of the mixers and the baselines."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class RankerOutput(NamedTuple):
    """``logits [B, n_tasks]`` (pre-sigmoid, task order of the schema) and ``aux_loss``, a
    scalar to add to the task loss (MoE L1, TokenMixer-Large's lower-layer logit loss; 0 in
    eval)."""

    logits: Tensor
    aux_loss: Tensor
