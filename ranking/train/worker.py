"""The per-rank training program that ``mixrank train`` starts under ``torchrun``.

It reads the resolved experiment config from the run directory, wraps the model in TorchRec's
``DistributedModelParallel`` (embedding tables sharded by the planner, fused embedding
optimiser; dense part data-parallel), trains with periodic evaluation over the whole validation
set, checkpoints atomically with ``torch.distributed.checkpoint`` and resumes from the newest
complete checkpoint, and exports the serving artifact of the final step.

Run it through ``mixrank train`` (which validates the config before any process starts)::

    python -m torch.distributed.run --nproc-per-node 2 -m ranking.train.worker --run-dir DIR
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist

from ranking.export import schema_dict
from ranking.train import checkpoint as ckpt
from ranking.train.config import ExperimentConfig, load_experiment, sharding_type

# --------------------------------------------------------------------------- set-up


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Start the process group from torchrun's environment: gloo on CPU, nccl on CUDA. A worker
    that trains several runs (``--run-dir`` more than once) starts it once and reuses it."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, device
    if "MASTER_ADDR" not in os.environ:  # plain `python -m ranking.train.worker`
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedding_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Fully qualified names of the model's TorchRec embedding collections."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, EmbeddingBagCollection | EmbeddingCollection)
    }


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

    tables = {c.name for m in embedding_modules(model).values() for c in _table_configs(m)}
    forced = {t: k for t in tables if (k := sharding_type(cfg.train.sharding, t)) is not None}
    needs_manual = device.type == "cpu" and any(
        v in ("row_wise", "table_row_wise") for v in forced.values()
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
        for cfg_t in _table_configs(module):
            kind = forced.get(cfg_t.name, "table_wise")
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
        out.append(model.get_submodule(parent) if parent else model)
    return out


def embedding_l2_term(pooled: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of the squared L2 norm of the looked-up embeddings (all features)."""
    total = torch.zeros((), device=pooled[0].device)
    for e in pooled:
        total = total + e.float().pow(2).reshape(e.shape[0], -1).sum(1).mean()
    return total


def _table_configs(module) -> list:
    get = getattr(module, "embedding_bag_configs", None) or module.embedding_configs
    return list(get())


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


def dense_param_groups(named_params: dict, embedding_names: set[str], cfg: ExperimentConfig):
    """Parameter groups of the dense optimiser: data-parallel embedding tables decay by
    ``train.embedding_weight_decay``, everything else by ``train.weight_decay``."""
    t = cfg.train
    emb = [p for n, p in named_params.items() if n in embedding_names]
    rest = [p for n, p in named_params.items() if n not in embedding_names]
    groups = []
    if rest:
        groups.append({"params": rest, "weight_decay": t.weight_decay})
    if emb:
        groups.append({"params": emb, "weight_decay": t.embedding_weight_decay})
    return groups


def dense_optimizer_factory(cfg: ExperimentConfig, embedding_names: set[str] | None = None):
    """A factory for TorchRec's ``KeyedOptimizerWrapper``: it gets the ``{name: param}`` dict and
    returns the dense optimiser, with the embedding/dense parameter groups above."""
    t = cfg.train
    names = embedding_names or set()

    def make(named: dict):
        groups = dense_param_groups(named, names, cfg)
        if t.dense_optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=t.lr)
        if t.dense_optimizer == "adam":
            return torch.optim.Adam(groups, lr=t.lr)
        if t.dense_optimizer == "adagrad":
            return torch.optim.Adagrad(groups, lr=t.lr)
        return torch.optim.RMSprop(groups, lr=t.lr, momentum=t.momentum, alpha=0.99, eps=1e-8)

    return make


def lr_lambda(cfg: ExperimentConfig, total_steps: int):
    """Linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``."""
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant" or total_steps <= t.warmup_steps:
            return 1.0
        frac = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        if t.schedule == "linear":
            decay = 1.0 - frac
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return f


# --------------------------------------------------------------------------- the trainer


@dataclass
class Position:
    """Where the training loop stands: what a checkpoint restores besides the tensors."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_eval: dict = field(default_factory=dict)
    stopped_early: bool = False


class Trainer:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.rank, self.world, self.local_rank, self.device = init_distributed()
        self.cfg = load_experiment(run_dir / "config.yaml")
        threads = self.cfg.train.threads or max(
            1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        )
        torch.set_num_threads(threads)
        torch.manual_seed(self.cfg.train.seed)
        self.log = _RankZeroLog(self.rank, run_dir / "metrics.jsonl")
        self.exporter = _PromExporter(self.rank, self.cfg.train.prometheus_port)
        self._row_counts: dict[str, int] = {}
        # model selection on valid (train.select_best): the best evaluation so far, its step and
        # epoch, and evaluations since it; saved in every checkpoint's marker for resuming
        self.selection: dict = {"best": None, "step": None, "epoch": None, "since": 0}
        self._build()

    # ----------------------------------------------------------- model and optimisers
    def _build(self) -> None:
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from ranking.model.ranker import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical dense init on every rank
        model = build_model(cfg.model, cfg.schema)
        fp = fused_params(cfg)
        sharders = [
            EmbeddingBagCollectionSharder(fused_params=fp),
            EmbeddingCollectionSharder(fused_params=fp),
        ]
        plan = sharding_plan(model, cfg, self.world, self.device, sharders)
        self.plan = plan
        emb_paths = list(embedding_modules(model))
        self.model = DistributedModelParallel(
            model, device=self.device, plan=plan, sharders=sharders
        )
        dense_params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.dense_params = list(dense_params.values())
        emb_names = embedding_param_names(dense_params.items(), emb_paths)
        self.dense_opt = KeyedOptimizerWrapper(
            dense_params, dense_optimizer_factory(cfg, emb_names), pass_params_dict=True
        )
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_opt])
        self._pooled: list[torch.Tensor] = []
        if cfg.train.embedding_l2:
            for parent in embedding_parents(self.model.module, emb_paths):
                parent.register_forward_hook(self._keep_pooled)
        if self.rank == 0:
            print(f"[mixrank] sharding plan:\n{plan}", file=sys.stderr, flush=True)

    def _keep_pooled(self, _module, _inputs, output) -> None:
        """Forward hook on the module that owns an embedding collection: its output is the
        batch's looked-up (pooled) embeddings, which ``train.embedding_l2`` penalises."""
        if self.model.training and isinstance(output, torch.Tensor):
            self._pooled.append(output)

    # ----------------------------------------------------------- data
    def _reader(self, path: str, batch_size: int, shuffle: bool, epoch: int, drop_last: bool):
        from ranking.data.reader import ParquetBatches

        # Units small enough that ranks get near-equal rows (every rank runs the same number of
        # steps: the epoch ends when the first rank runs out).
        shards = self.world * max(1, self.cfg.data.num_workers)
        unit_rows = int(min(65536, max(1024, self._rows(path) // (shards * 32))))
        reader = ParquetBatches(
            self.cfg.schema,
            path,
            batch_size,
            rank=self.rank,
            world_size=self.world,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            drop_last=drop_last,
            unit_rows=unit_rows,
        )
        reader.set_epoch(epoch)
        return reader

    def _loader(self, reader):
        if self.cfg.data.num_workers > 0:
            return torch.utils.data.DataLoader(
                reader,
                batch_size=None,
                num_workers=self.cfg.data.num_workers,
                persistent_workers=False,
            )
        return reader

    def _any_rank_done(self, have: bool) -> bool:
        """True when some rank has no batch left: every rank must run the same number of steps."""
        flag = torch.tensor([0 if have else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ----------------------------------------------------------- state
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def save(
        self,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        metrics: dict | None = None,
        stopped_early: bool = False,
    ):
        import yaml

        info = {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "world_size": self.world,
            "selection": self.selection,
            "stopped_early": stopped_early,
        }
        local = {"rng": ckpt.rng_state(), "scheduler": self.scheduler.state_dict()}
        path = ckpt.save(
            self.state(),
            self.run_dir / "checkpoints",
            step,
            keep=self.cfg.train.keep_checkpoints,
            info={
                **info,
                "metrics": metrics or {},
                "config": self.cfg.raw,
                "schema": schema_dict(self.cfg.schema),
            },
            local=local,
        )
        if self.rank == 0:
            (path / "config.yaml").write_text(yaml.safe_dump(self.cfg.raw, sort_keys=False))
        return path

    def try_resume(self) -> Position:
        """Load the newest complete checkpoint; returns where the loop stood when it was saved.
        Everything the loop carries from step to step comes back: parameters and buffers, both
        optimisers' state, the learning rate, RNG, data position, the last evaluation, the
        model-selection state and whether the run had stopped early."""
        path = ckpt.latest(self.run_dir / "checkpoints")
        if path is None:
            return Position()
        marker = ckpt.read_marker(path)
        if marker.get("world_size", self.world) != self.world:
            raise RuntimeError(
                f"{path}: this checkpoint was written by {marker['world_size']} ranks and cannot "
                f"resume with {self.world} (the data position and per-rank state depend on it); "
                f"rerun with --nproc/--nnodes giving {marker['world_size']} ranks, or export it "
                f"and start a new run"
            )
        self.selection = marker.get("selection") or self.selection
        self._init_dense_state(ckpt.saved_keys(path))
        state = self.state()
        ckpt.load(state, path)  # strict: a key on either side only is an error naming it
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        local = ckpt.load_local(path)
        ckpt.set_rng_state(local["rng"])
        self.scheduler.load_state_dict(local["scheduler"])
        # LambdaLR writes a group's lr only in step(): until the first step after resuming the
        # groups would keep the lr of step 0 (the warm-up's smallest).
        for group, lr in zip(self.dense_opt.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.log.info(f"resumed from {path.name} (step {marker['step']})")
        return Position(
            step=marker["step"],
            epoch=marker["epoch"],
            batch_in_epoch=marker["batch_in_epoch"],
            last_eval=marker.get("metrics") or {},
            stopped_early=bool(marker.get("stopped_early", False)),
        )

    def _init_dense_state(self, saved: set[str]) -> None:
        """Create the dense optimiser's state before an in-place load.

        torch optimisers create their state lazily, at a parameter's first step: a fresh
        optimiser has none, and ``dcp.load`` fills only the keys the target has, so Adam's
        moments and step count were silently not restored (the cause of #25). TorchRec's
        ``init_state`` creates it with a zero-gradient step; the state of a parameter that had
        none when the checkpoint was written (it never got a gradient) is removed again, so the
        restored state has exactly the saved parameters. The dummy step changes the parameters
        (weight decay); the load that follows overwrites them."""
        opt = self.dense_opt
        opt.init_state()
        for p in self.dense_params:
            p.grad = None
        for key, p in opt.params.items():
            if not any(k.startswith(f"optim.state.{key}.") for k in saved):
                opt.state.pop(p, None)

    # ----------------------------------------------------------- loops
    def _forward(self, batch):
        return self.model(batch)  # bf16 autocast, if any, is the model's `compute_dtype`

    def _loss(self, out, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = out.logits.float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        loss = bce + aux.float()  # aux terms carry their weights (model config)
        if self._pooled:
            loss = loss + self.cfg.train.embedding_l2 * embedding_l2_term(self._pooled)
            self._pooled.clear()
        return loss, bce

    def evaluate(self, path: str) -> dict:
        from ranking.metrics import EvalAccumulator

        self.model.eval()
        acc = EvalAccumulator(self.cfg.schema.task_names, device=self.device)
        reader = self._reader(path, self.cfg.data.eval_batch_size, False, 0, drop_last=False)
        it = iter(self._loader(reader))
        dummy = None
        with torch.no_grad():
            while True:
                batch = next(it, None)
                if self._ranks_with_data(batch is not None) == 0:
                    break
                real = batch is not None
                if real and dummy is None:
                    dummy = batch
                if not real:  # out of rows while another rank still has some: run in lockstep
                    batch = dummy if dummy is not None else self._empty_like_schema()
                out = self._forward(batch.to(self.device))
                if real:
                    acc.update(torch.sigmoid(out.logits.float()), batch.labels)
        self.model.train()
        return acc.compute()

    def _ranks_with_data(self, have: bool) -> int:
        flag = torch.tensor([1 if have else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return int(flag.item())

    def _empty_like_schema(self):
        from ranking.features import batch_from_rows

        return batch_from_rows(self.cfg.schema, [{}])  # labels are zeros; outputs discarded

    def _set_progress(self, frac: float) -> None:
        """Schedule hooks: e.g. the UniMixer Sinkhorn temperature (annealed 1.0 -> 0.05)."""
        fn = getattr(self.model.module, "set_progress", None)
        if callable(fn):
            fn(frac)

    def _steps_in_epoch(self, epoch: int) -> int:
        """Steps of one epoch: every rank steps in lockstep until the first one runs out, so
        this is the minimum over ranks of the full batches its loader workers deliver."""
        reader = self._reader(
            self.cfg.data.train,
            self.cfg.data.batch_size,
            self.cfg.data.shuffle,
            epoch,
            drop_last=True,
        )
        nw = max(1, self.cfg.data.num_workers)
        bs = self.cfg.data.batch_size
        per_rank = []
        for r in range(self.world):
            shards = [reader.shard_units(r * nw + w, self.world * nw) for w in range(nw)]
            per_rank.append(sum(sum(u.rows for u in units) // bs for units in shards))
        return max(1, min(per_rank))

    def _rows(self, path: str) -> int:
        if path not in self._row_counts:
            from ranking.data.reader import list_units, resolve_files

            self._row_counts[path] = sum(u.rows for u in list_units(resolve_files(path), 1 << 30))
        return self._row_counts[path]

    def run(self) -> int:
        cfg = self.cfg
        t = cfg.train
        bs = cfg.data.batch_size
        train_rows = self._rows(cfg.data.train)
        epoch_steps = [self._steps_in_epoch(e) for e in range(t.epochs)]
        total = t.max_steps or sum(epoch_steps)
        steps_per_epoch = epoch_steps[0]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.dense_opt, lr_lambda(cfg, total))
        pos = self.try_resume()
        step, epoch, skip, last_eval = pos.step, pos.epoch, pos.batch_in_epoch, pos.last_eval
        self.model.train()
        self.log.info(
            f"training {cfg.name}: {train_rows:,} rows, {self.world} rank(s), batch {bs}/rank, "
            f"{total} steps ({steps_per_epoch}/epoch)"
        )
        batch_in_epoch = skip
        t_start, s_start = time.perf_counter(), step
        t_log, s_log = t_start, step
        loss_sum, loss_n = 0.0, 0
        self._steps_per_epoch = steps_per_epoch
        stop = pos.stopped_early  # resumed from the final checkpoint of an early-stopped run
        while step < total and not stop:
            reader = self._reader(cfg.data.train, bs, cfg.data.shuffle, epoch, drop_last=True)
            if skip:
                reader.skip_batches(skip)
            it = iter(self._loader(reader))
            batch_in_epoch = skip
            skip = 0
            while step < total:
                batch = next(it, None)
                if self._any_rank_done(batch is not None):
                    break
                self._set_progress(step / max(1, total))
                batch = batch.to(self.device)
                out = self._forward(batch)
                loss, bce = self._loss(out, batch)
                self.optimizer.zero_grad()
                loss.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.dense_params, t.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                step += 1
                batch_in_epoch += 1
                loss_sum += bce.item()
                loss_n += 1
                if step % t.log_every == 0 or step == total:
                    now = time.perf_counter()
                    rate = (step - s_log) * bs * self.world / max(now - t_log, 1e-9)
                    avg_rate = (step - s_start) / max(now - t_start, 1e-9)
                    eta = (total - step) / max(avg_rate, 1e-9)
                    rec = {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss_sum / max(loss_n, 1),
                        "samples_per_s": rate,
                        "lr": self.scheduler.get_last_lr()[0],
                    }
                    self.log.record(rec)
                    self.log.progress(
                        f"step {step}/{total}  epoch {epoch}  loss {rec['loss']:.4f}  "
                        f"{rate:,.0f} samples/s  ETA {_fmt_eta(eta)}"
                    )
                    self.exporter.update(rec)
                    t_log, s_log, loss_sum, loss_n = now, step, 0.0, 0
                paused = time.perf_counter()
                if t.eval_every and step % t.eval_every == 0 and cfg.data.valid:
                    last_eval = self._eval_and_log(step, epoch)
                    stop = self._select(last_eval, step)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                    self.save(step, epoch, batch_in_epoch, last_eval)
                t_log += time.perf_counter() - paused  # rates count training time only
                if stop:
                    break
            if step >= total or stop:
                break
            epoch += 1  # this epoch's data is exhausted
            batch_in_epoch = 0
            if cfg.data.valid and not t.eval_every:
                paused = time.perf_counter()
                last_eval = self._eval_and_log(step, epoch)
                stop = self._select(last_eval, step)
                t_log += time.perf_counter() - paused
        if not stop:
            self._set_progress(1.0)  # schedules end at their final value (exported too)
        if cfg.data.valid and (not last_eval or last_eval.get("step") != step):
            last_eval = self._eval_and_log(step, epoch)
            self._select(last_eval, step)
        final = self.save(step, epoch, batch_in_epoch, last_eval, stopped_early=stop)
        dist.barrier()
        if self.rank == 0:
            from ranking.export import export_checkpoint

            source, exported = final, last_eval
            best = ckpt.latest(self.run_dir / "best") if t.select_best else None
            if best is not None:
                source, exported = best, ckpt.read_marker(best).get("metrics") or last_eval
            art = export_checkpoint(source, self.run_dir / "artifact")
            self.log.info(f"artifact written to {art} (from {source.name})")
            summary = {
                "step": step,
                "eval": exported,  # the exported model's validation metrics
                "final_eval": last_eval,
                "artifact": str(art),
                "exported_step": int(ckpt.read_marker(source)["step"]),
                "steps_per_epoch": steps_per_epoch,
                "stopped_early": stop,
            }
            if t.select_best:
                summary["selection"] = {"metric": t.select_metric, **self.selection}
            # written whole, then renamed: a harness that waits for it never reads half a file
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")
        dist.barrier()
        return 0

    def _select(self, m: dict, step: int) -> bool:
        """Model selection after an evaluation (``train.select_best``): an improvement of
        ``select_metric`` saves the model into ``<run>/best/``; returns True when
        ``early_stopping_patience`` evaluations in a row brought no improvement."""
        t = self.cfg.train
        if not t.select_best:
            return False
        value = selection_value(m, t.select_metric)
        sel = self.selection
        better = value is not None and (
            sel["best"] is None
            or (value > sel["best"] if t.select_metric == "auc" else value < sel["best"])
        )
        epoch = round(step / max(1, self._steps_per_epoch), 3)  # epochs trained
        if better:
            sel.update(best=value, step=step, epoch=epoch, since=0)
            ckpt.save(
                {"model": self.model.state_dict()},
                self.run_dir / "best",
                step,
                keep=1,
                info={
                    "epoch": epoch,
                    "metrics": m,
                    "config": self.cfg.raw,
                    "schema": schema_dict(self.cfg.schema),
                },
            )
        else:
            sel["since"] += 1
        stop = bool(t.early_stopping_patience) and sel["since"] >= t.early_stopping_patience
        flag = torch.tensor([int(stop)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        stop = bool(flag.item())
        if stop:
            self.log.info(
                f"early stop at step {step}: no better valid {t.select_metric} for "
                f"{sel['since']} evaluations (best {sel['best']:.5f} at step {sel['step']})"
            )
        return stop

    def _eval_and_log(self, step: int, epoch: int) -> dict:
        t0 = time.perf_counter()
        m = self.evaluate(self.cfg.data.valid)
        m = {**m, "step": step}
        self.log.record(
            {"step": step, "epoch": epoch, "eval": m, "eval_s": time.perf_counter() - t0}
        )
        auc = m.get("auc")
        if auc is not None:
            self.log.info(
                f"eval step {step}: auc {auc:.5f} logloss {m['logloss']:.5f} ne {m['ne']:.5f}"
            )
        self.exporter.update({"eval_auc": auc} if auc is not None else {})
        return m


def selection_value(m: dict, metric: str) -> float | None:
    """``metric`` of an evaluation: the single task's, or the first task's of a multi-task one."""
    if metric not in m:
        m = next((v for v in m.values() if isinstance(v, dict) and metric in v), {})
    v = m.get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _fmt_eta(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _RankZeroLog:
    """Progress lines (stderr) and ``metrics.jsonl`` records, from rank 0 only."""

    def __init__(self, rank: int, path: Path):
        self.rank = rank
        self.path = path

    def record(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")

    def progress(self, line: str) -> None:
        if self.rank == 0:
            print(f"[mixrank] {line}", file=sys.stderr, flush=True)

    info = progress


class _PromExporter:
    """Training metrics on a Prometheus endpoint (rank 0, when ``train.prometheus_port`` > 0).
    One endpoint and one set of gauges per port for the life of the process: the runs of a
    several-run worker share them."""

    _gauges: ClassVar[dict[int, dict]] = {}

    def __init__(self, rank: int, port: int):
        self.gauges = None
        if rank != 0 or port <= 0:
            return
        if port in _PromExporter._gauges:
            self.gauges = _PromExporter._gauges[port]
            return
        from prometheus_client import Gauge, start_http_server

        start_http_server(port)
        self.gauges = {
            "step": Gauge("mixrank_train_step", "Optimiser steps done"),
            "loss": Gauge("mixrank_train_loss", "Mean training loss since the last log line"),
            "samples_per_s": Gauge("mixrank_train_samples_per_second", "Training throughput"),
            "lr": Gauge("mixrank_train_learning_rate", "Dense learning rate"),
            "eval_auc": Gauge("mixrank_train_eval_auc", "Validation AUC at the last evaluation"),
        }
        _PromExporter._gauges[port] = self.gauges

    def update(self, rec: dict) -> None:
        if self.gauges is None:
            return
        for k, g in self.gauges.items():
            if rec.get(k) is not None:
                g.set(rec[k])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--run-dir",
        required=True,
        action="append",
        help="a prepared run directory; given more than once, the runs train one after the "
        "other in this process group (the quality harness: one start of torchrun, Python and "
        "TorchRec for many runs instead of one per run)",
    )
    args = p.parse_args(argv)
    try:
        for run_dir in args.run_dir:
            trainer = Trainer(Path(run_dir))
            rc = trainer.run()
            if rc:
                return rc
            del trainer  # free this run's model, optimiser state and DMP before the next
            gc.collect()
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
