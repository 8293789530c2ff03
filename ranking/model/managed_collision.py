"""Managed-collision tables: TorchRec's MCH modules in front of an EmbeddingBagCollection.

A table whose schema feature has ``collision: {kind: managed, ...}`` (``ranking.features.
CollisionSpec``) is built as TorchRec's ``ManagedCollisionEmbeddingBagCollection``: a
``ManagedCollisionCollection`` of ``MCHManagedCollisionModule`` (one per table, with the
schema's eviction policy) remaps the hashed ids (``[0, id_space)``) to table rows, then an
``EmbeddingBagCollection`` looks them up. In training mode the module counts the ids it sees
and, every ``eviction_interval`` steps, admits the most frequent new ids into free or evicted
rows (TorchRec re-initialises an evicted row); in eval mode (serving, evaluation) the mapping is
read only, and an id it does not hold reads the reserved last row. The mapping (sorted raw ids,
their rows, the policy's counts / last-access steps) is a set of persistent buffers of the MCH
module: it travels in the model's ``state_dict``, hence in DCP checkpoints and artifacts.

``ranking.train.sharding`` shards it with TorchRec's
``ManagedCollisionEmbeddingBagCollectionSharder`` (row-wise, the only sharding TorchRec offers
for MC modules).
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)

from ranking.features import CollisionSpec, TableSpec


def eviction_policy(c: CollisionSpec):
    """TorchRec's MCH eviction policy for a ``CollisionSpec``."""
    if c.policy == "lfu":
        return LFU_EvictionPolicy()
    if c.policy == "distance_lfu":
        return DistanceLFU_EvictionPolicy(decay_exponent=c.decay_exponent)
    if c.policy == "lru":
        return LRU_EvictionPolicy(decay_exponent=c.decay_exponent)
    raise ValueError(f"collision.policy: unknown {c.policy!r}")


def build_mc_ebc(
    tables: tuple[TableSpec, ...], configs: list, device: torch.device | None
) -> ManagedCollisionEmbeddingBagCollection:
    """The MC-EBC of the managed ``tables`` (``configs``: their ``EmbeddingBagConfig``s).

    The MCH modules' buffers are small (a few int64 per row) and always built on the CPU when
    the tables go to the meta device (an artifact's load assigns them all)."""
    mc_dev = torch.device("cpu") if device is None or device.type == "meta" else device
    by_name = {t.name: t for t in tables}
    mcs = {
        c.name: MCHManagedCollisionModule(
            zch_size=c.num_embeddings,
            device=mc_dev,
            eviction_policy=eviction_policy(by_name[c.name].collision),
            eviction_interval=by_name[c.name].collision.eviction_interval,
            input_hash_size=by_name[c.name].collision.id_space,
            name=c.name,
        )
        for c in configs
    }
    ebc = EmbeddingBagCollection(tables=configs, device=device)
    mcc = ManagedCollisionCollection(mcs, configs)
    return ManagedCollisionEmbeddingBagCollection(ebc, mcc, return_remapped_features=False)


def mch_modules(model: torch.nn.Module) -> dict[str, MCHManagedCollisionModule]:
    """Every (unsharded) MCH module of ``model``, by table name."""
    return {
        m._name or n: m
        for n, m in model.named_modules()
        if isinstance(m, MCHManagedCollisionModule)
    }


_CPU_RESET_INSTALLED = False


def install_cpu_eviction_reset() -> None:
    """Let TorchRec's sharded MC modules evict on the CPU.

    On eviction, TorchRec's ``ShardedManagedCollisionEmbeddingBagCollection`` calls FBGEMM's
    ``SplitTableBatchedEmbeddingBagsCodegen.reset_embedding_weight_momentum``, whose op
    ``fbgemm::reset_weight_momentum`` has no CPU kernel in fbgemm-gpu-cpu 1.8.0
    (``NotImplementedError: Could not run 'fbgemm::reset_weight_momentum' with arguments from
    the 'CPU' backend``); it also takes the device/UVM buffers only, not the CPU TBE's
    ``*_host`` ones. On a CPU TBE this does what the CUDA op does, on the host buffers: zero the
    evicted rows' weights and, for row-wise Adagrad, their momentum (TorchRec then writes the
    table's init into the weights). Other devices keep FBGEMM's method. Idempotent."""
    global _CPU_RESET_INSTALLED
    if _CPU_RESET_INSTALLED:
        return
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        SplitTableBatchedEmbeddingBagsCodegen as TBE,
    )

    fbgemm_reset = TBE.reset_embedding_weight_momentum

    @torch.no_grad()
    def reset(self, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids):
        if self.current_device.type != "cpu":
            return fbgemm_reset(
                self, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids
            )
        offs = pruned_indices_offsets.tolist()
        for i, t in enumerate(logical_table_ids.tolist()):
            idx = pruned_indices[offs[i] : offs[i + 1]].long()
            if idx.numel() == 0:
                continue
            d = int(self.D_offsets[t + 1] - self.D_offsets[t])
            w0 = int(self.weights_offsets[t])
            cols = torch.arange(d, dtype=torch.long)
            self.weights_host[w0 + (idx[:, None] * d + cols).flatten()] = 0
            if self.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
                self.momentum1_host[int(self.momentum1_offsets[t]) + idx] = 0

    TBE.reset_embedding_weight_momentum = reset
    _CPU_RESET_INSTALLED = True
