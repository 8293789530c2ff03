"""How the embedding tables are placed: TorchRec's planner and sharders, and the fused
embedding-optimiser parameters they carry. The model never knows how it is sharded."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ranking.train.config import ExperimentConfig, sharding_type


def embedding_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Fully qualified names of the model's TorchRec embedding collections: the
    EmbeddingBagCollections, EmbeddingCollections and ManagedCollisionEmbeddingBagCollections
    (the latter as one module: its inner EmbeddingBagCollection is sharded with it)."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

    kinds = EmbeddingBagCollection | EmbeddingCollection | ManagedCollisionEmbeddingBagCollection
    out: dict[str, torch.nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, kinds) and not any(n.startswith(f"{p}.") for p in out):
            out[n] = m
    return out


def is_managed(module) -> bool:
    """A ManagedCollisionEmbeddingBagCollection (tables behind TorchRec's MCH modules)."""
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

    return isinstance(module, ManagedCollisionEmbeddingBagCollection)


def table_configs(module) -> list:
    if is_managed(module):
        module = module._embedding_module
    get = getattr(module, "embedding_bag_configs", None) or module.embedding_configs
    return list(get())


def add_managed_collision_sharder(model, sharders: list, fused: dict) -> bool:
    """Append TorchRec's ``ManagedCollisionEmbeddingBagCollectionSharder`` (with the same fused
    embedding-optimiser parameters) to ``sharders`` when ``model`` has managed-collision tables
    and none is there yet; on the CPU, also install the eviction reset FBGEMM's CPU build lacks
    (``ranking.model.managed_collision.install_cpu_eviction_reset``). True when ``model`` has
    such tables."""
    from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder

    if not any(is_managed(m) for m in embedding_modules(model).values()):
        return False
    from ranking.model.managed_collision import install_cpu_eviction_reset

    install_cpu_eviction_reset()
    if not any(isinstance(s, ManagedCollisionEmbeddingBagCollectionSharder) for s in sharders):
        sharders.append(ManagedCollisionEmbeddingBagCollectionSharder(fused_params=fused))
    return True


def fused_params(cfg: ExperimentConfig) -> dict:
    """Fused embedding-optimiser parameters for TorchRec's sharders (FBGEMM TBE)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    t = cfg.train
    optim = {
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "sgd": EmbOptimType.EXACT_SGD,
    }[t.embedding_optimizer]
    params = {"optimizer": optim, "learning_rate": t.embedding_lr, "eps": t.embedding_eps}
    if t.embedding_weight_decay:  # CUDA kernels only: the CPU ones ignore it (config refuses)
        params["weight_decay"] = t.embedding_weight_decay
        params["weight_decay_mode"] = WeightDecayMode.DECOUPLE
    return params


def sharding_plan(model, cfg: ExperimentConfig, world: int, device: torch.device, sharders):
    """TorchRec's planner on a topology of this world size and device.

    ``train.sharding`` forces a sharding type per table. Row-wise variants are not offered by
    TorchRec's planner on CPU; when one is forced there, the plan is constructed directly with
    ``construct_module_sharding_plan`` (tables not forced go table-wise, round robin).

    Managed-collision tables (``ManagedCollisionEmbeddingBagCollection``) are always row-wise,
    the one sharding TorchRec's MC sharder offers, and planned directly too; their sharder is
    appended to ``sharders`` here (the list the caller then gives DistributedModelParallel).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    mods = embedding_modules(model)
    if add_managed_collision_sharder(model, sharders, fused_params(cfg)):
        managed = {p for p, m in mods.items() if is_managed(m)}
        bad = [
            (t.name, k)
            for p in managed
            for t in table_configs(mods[p])
            if (k := sharding_type(cfg.train.sharding, t.name)) not in (None, "row_wise")
        ]
        if bad:
            raise ValueError(
                f"train.sharding: table {bad[0][0]!r} has managed collision, which TorchRec "
                f"shards row-wise only, got {bad[0][1]!r}"
            )
    tables = {c.name for m in mods.values() for c in table_configs(m)}
    forced = {t: k for t in tables if (k := sharding_type(cfg.train.sharding, t)) is not None}
    unpooled = {
        c.name
        for m in embedding_modules(model).values()
        if not hasattr(m, "embedding_bag_configs")
        for c in table_configs(m)
    }
    dp_unpooled = sorted(t for t in unpooled if forced.get(t) == "data_parallel")
    if dp_unpooled and device.type == "cpu":
        # TorchRec's data-parallel EmbeddingCollection lookup returns one row per bag on CPU
        # (construct_jagged_tensors then fails on the split sizes; tests/test_sequences.py), so
        # the sequences' tables go where the planner puts them.
        if dist.get_rank() == 0:
            print(
                f"mixrank: warning: train.sharding: data_parallel is not available for the "
                f"sequence tables on CPU ({', '.join(dp_unpooled)}); the planner places them",
                flush=True,
            )
        for t in dp_unpooled:
            del forced[t]
    needs_manual = any(is_managed(m) for m in mods.values()) or (
        device.type == "cpu" and any(v in ("row_wise", "table_row_wise") for v in forced.values())
    )
    if not needs_manual:
        topology = Topology(world_size=world, compute_device=device.type)
        constraints = {t: ParameterConstraints(sharding_types=[v]) for t, v in forced.items()}
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)

    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    fused = EmbeddingComputeKernel.FUSED.value
    plan = {}
    rr = 0
    for path, module in embedding_modules(model).items():
        per_param = {}
        for cfg_t in table_configs(module):
            kind = "row_wise" if is_managed(module) else forced.get(cfg_t.name, "table_wise")
            if kind == "row_wise":
                per_param[cfg_t.name] = row_wise(compute_kernel=fused)
            elif kind == "table_row_wise":
                per_param[cfg_t.name] = table_row_wise(host_index=0)
            elif kind == "column_wise":
                per_param[cfg_t.name] = column_wise(ranks=list(range(world)), compute_kernel=fused)
            elif kind == "data_parallel":
                per_param[cfg_t.name] = data_parallel()
            else:
                per_param[cfg_t.name] = table_wise(rank=rr % world, compute_kernel=fused)
                rr += 1
        sharder = next(s for s in sharders if isinstance(module, s.module_type))
        plan[path] = construct_module_sharding_plan(
            module,
            per_param,
            sharder=sharder,
            local_size=world,
            world_size=world,
            device_type=device.type,
        )
    return ShardingPlan(plan)


def embedding_parents(model: torch.nn.Module, embedding_paths) -> list[torch.nn.Module]:
    """The modules that own the embedding collections (the tokenizer's ``SparseEmbeddings``,
    DLRM's ``SparseArch``): their output is the looked-up embeddings of the batch. DMP shards
    the collection itself and leaves its owner an ordinary module, so a forward hook sees the
    pooled embeddings whatever the sharding."""
    out = []
    for path in embedding_paths:
        parent = path.rpartition(".")[0]
        owner = model.get_submodule(parent) if parent else model
        if any(o is owner for o in out):
            # one owner of several collections (the tokenizer's SparseEmbeddings holds the
            # pooled, the managed-collision and the sequence tables): hooked once, or its
            # penalty would count once per collection
            continue
        out.append(owner)
    return out


def embedding_param_names(named_params, embedding_paths) -> set[str]:
    """Names (as in ``named_params``) of the parameters that belong to an embedding collection
    at one of ``embedding_paths`` (module paths of the unwrapped model): the data-parallel
    tables, which the dense optimiser updates."""
    prefixes = tuple(f"{p}." for p in embedding_paths)
    out = set()
    for name, _ in named_params:
        bare = name.removeprefix("module.")  # DMP's wrapper, where a name carries it
        if bare.startswith(prefixes):
            out.add(name)
    return out
