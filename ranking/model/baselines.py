"""Baselines in the same harness: TorchRec's DLRM and DLRM_DCN (DCNv2), wrapped to ``Ranker``'s
interface (``Batch -> RankerOutput``). Multi-task: the over-arch ends in one output per task.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ranking.features import Batch, FeatureSchema

from .config import ConfigError, ModelConfig
from .output import RankerOutput


class BaselineRanker(nn.Module):
    """``Batch -> RankerOutput(logits [B, n_tasks], aux_loss = 0)`` around a TorchRec DLRM.

    With no dense features, a constant 1 column feeds DLRM's dense arch (it needs at least one).
    The EmbeddingBagCollection is ``model.sparse_arch.embedding_bag_collection``.
    """

    def __init__(self, model: nn.Module, num_dense: int):
        super().__init__()
        self.model, self.num_dense = model, num_dense

    def forward(self, batch: Batch) -> RankerOutput:
        dense = batch.dense
        if self.num_dense == 0:
            dense = torch.ones(batch.sparse.stride(), 1, device=dense.device)
        sparse = batch.sparse
        if batch.sequences is not None:  # histories pooled like id lists (their table's pooling)
            sparse = KeyedJaggedTensor.concat([sparse, batch.aligned_sequences()])
        logits = self.model(dense_features=dense, sparse_features=sparse)
        return RankerOutput(logits.float(), logits.new_zeros((), dtype=torch.float32))


def build_baseline(config: ModelConfig, schema: FeatureSchema, device=None) -> BaselineRanker:
    if schema.managed_tables:
        t = schema.managed_tables[0]
        raise ConfigError(
            f"{config.source}: model.arch: {config.arch} (TorchRec DLRM) takes a plain "
            f"EmbeddingBagCollection; table {t.name!r} of schema {schema.name!r} has managed "
            "collision, built for the token-mixer families (rankmixer, tokenmixer_large, unimixer)"
        )
    dims = {t.dim for t in schema.tables}
    if len(dims) != 1:
        raise ConfigError(
            f"{config.source}: model.arch: {config.arch} needs one embedding dim for every "
            f"table (TorchRec DLRM), the schema {schema.name!r} has {sorted(dims)}"
        )
    emb_dim = dims.pop()
    ebc = EmbeddingBagCollection(
        tables=schema.embedding_bag_configs(config.embedding_init_scale),
        device=None if device is None else torch.device(device),
    )
    n_dense = max(schema.num_dense, 1)
    d = config.dlrm
    dense_arch = [*d.dense_arch, emb_dim]
    over_arch = [*d.over_arch, len(schema.tasks)]
    if config.arch == "dlrm":
        model = DLRM(ebc, n_dense, dense_arch, over_arch)
    else:
        model = DLRM_DCN(ebc, n_dense, dense_arch, over_arch, d.dcn_layers, d.dcn_rank)
    return BaselineRanker(model, schema.num_dense)
