"""The training loop of one run on one rank: build the DistributedModelParallel model and its
optimisers, step through the epochs in lockstep with the other ranks, evaluate and select,
checkpoint and resume, export the artifact.

Where each part lives: the process group and rank agreement in ``distributed``, table placement
in ``sharding``, the dense optimiser and schedule in ``optim``, the objective in ``loss``,
evaluation and selection in ``evaluation``, checkpoint files in ``checkpoint``, progress and
metrics in ``telemetry``; ``worker`` is the torchrun entry point.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DataParallelWrapper

from ranking.data.errors import DataError
from ranking.data.reader import EncodedCache
from ranking.errors import UserError
from ranking.export import schema_dict
from ranking.train import checkpoint as ckpt
from ranking.train import mc_state
from ranking.train import warm_start as ws
from ranking.train.badrows import BadRows, counts_text, merge_counts
from ranking.train.config import ExperimentConfig, load_experiment
from ranking.train.distributed import all_ranks, init_distributed
from ranking.train.evaluation import evaluate, improves, selection_value
from ranking.train.loss import RankingTrain
from ranking.train.optim import dense_optimizer_factory, init_dense_state, lr_lambda
from ranking.train.sharding import (
    embedding_modules,
    embedding_param_names,
    embedding_parents,
    fused_params,
    sharding_plan,
)
from ranking.train.telemetry import PromExporter, RankZeroLog, fmt_eta


@dataclass
class Position:
    """Where the training loop stands: what a checkpoint restores besides the tensors."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_eval: dict = field(default_factory=dict)
    stopped_early: bool = False


class _SingleRank(DataParallelWrapper):
    """DMP's data-parallel wrapper for a world of one: no DDP around the dense part, whose
    gradient all-reduce then has nothing to average (DDP's hooks and its all-reduce cost ~1 ms
    of a 10 ms Frappe DLRM step). The state dict keys are the same either way (DMP unwraps
    DDP), so checkpoints move between world sizes unchanged."""

    def wrap(self, dmp, env, device) -> None:
        dmp._dmp_wrapped_module.to(device)


def _unwrap_data_parallel_lookups(model: torch.nn.Module) -> int:
    """With one rank, take the DDP off TorchRec's data-parallel table lookups (the sharded
    collections wrap them whatever the world size; another ~1 ms a step). Parameter and state
    dict names do not change (tests/test_train_throughput.py). Returns how many were unwrapped."""
    from torch.nn.parallel import DistributedDataParallel

    n = 0
    for m in model.modules():
        lookups = getattr(m, "_lookups", None)
        if not isinstance(lookups, (list, torch.nn.ModuleList)):
            continue
        for i, lookup in enumerate(lookups):
            if isinstance(lookup, DistributedDataParallel):
                lookups[i] = lookup.module
                n += 1
    return n


class Trainer:
    """One run on this rank: ``Trainer(run_dir).run()`` trains the experiment whose resolved
    config is ``<run_dir>/config.yaml`` (written by ``mixrank train``), resuming from the run
    directory's newest complete checkpoint, and returns 0 when the artifact is written.

    ``cfg`` builds it from an ``ExperimentConfig`` instead (in a test or a notebook: one rank
    of gloo is enough); ``run_dir`` then only receives what the run writes.

    Example::

        t = Trainer(Path("runs/x"), cfg=load_experiment("configs/demo.yaml", ["data.train=..."]))
        t.run()
    """

    def __init__(self, run_dir: Path, cfg: ExperimentConfig | None = None):
        self.run_dir = Path(run_dir)
        self.rank, self.world, self.local_rank, self.device = init_distributed()
        self.cfg = cfg if cfg is not None else load_experiment(self.run_dir / "config.yaml")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        threads = self.cfg.train.threads or max(
            1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        )
        torch.set_num_threads(threads)
        torch.manual_seed(self.cfg.train.seed)
        self.log = RankZeroLog(self.rank, self.run_dir / "metrics.jsonl")
        self.exporter = PromExporter(self.rank, self.cfg.train.prometheus_port)
        self._row_counts: dict[tuple, int] = {}
        # The data set is listed once, when the run starts: a file deleted later is an error
        # (not a smaller epoch), and a resumed run checks it reads the files it was saved with.
        self.files = {
            key: self._list(key) for key in ("train", "valid") if getattr(self.cfg.data, key)
        }
        # the rows read and converted, kept for later epochs and evaluations (data.cache_mb)
        self.encoded = {
            key: EncodedCache(self.cfg.data.cache_mb << 20)
            for key in self.files
            if self.cfg.data.cache_mb and self.cfg.data.num_workers == 0
        }
        self.bad = BadRows(self.cfg.data.max_bad_fraction, "data.train")
        self.bad_valid: dict[str, int] = {}
        # model selection on valid (train.select_best): the best evaluation so far, its step and
        # epoch, and evaluations since it; saved in every checkpoint's marker for resuming
        self.selection: dict = {"best": None, "step": None, "epoch": None, "since": 0}
        # where the model came from (train.warm_start; a resumed run keeps its checkpoint's) and
        # the training rows this rank has stepped on (all epochs, resumed parts included): both
        # go into every checkpoint's marker, then the artifact's manifest
        self.lineage = ws.describe_lineage(None)
        self.rows_read = 0
        self.resumed_from: Path | None = None
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
        # tables on the meta device: DMP's sharded modules allocate and initialise their own
        # shards (from each table's init_fn; on CPU they never copied the built values), so a
        # table built whole on every rank was only memory: 6 GiB a rank for 10^8 x 16 rows,
        # resident through training (docs/BENCHMARKS.md, "Tables of 10^7 and 10^8 rows")
        model = build_model(cfg.model, cfg.schema, device="meta")
        fp = fused_params(cfg)
        sharders = [
            EmbeddingBagCollectionSharder(fused_params=fp),
            EmbeddingCollectionSharder(fused_params=fp),
        ]
        plan = sharding_plan(model, cfg, self.world, self.device, sharders)
        self.plan = plan
        emb_paths = list(embedding_modules(model))
        self._table_keys = ws.table_keys(model)  # the unsharded names: DMP replaces the modules
        self.model = DistributedModelParallel(
            model,
            device=self.device,
            plan=plan,
            sharders=sharders,
            data_parallel_wrapper=_SingleRank() if self.world == 1 else None,
        )
        if self.world == 1:
            _unwrap_data_parallel_lookups(self.model)
        dense_params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.dense_params = list(dense_params.values())
        emb_names = embedding_param_names(dense_params.items(), emb_paths)
        self.dense_opt = KeyedOptimizerWrapper(
            dense_params, dense_optimizer_factory(cfg, emb_names), pass_params_dict=True
        )
        self.optimizer = CombinedOptimizer([self.model.fused_optimizer, self.dense_opt])
        # the objective around the model (the model stays the forward's math)
        self.train_model = RankingTrain(
            self.model,
            embedding_l2=cfg.train.embedding_l2,
            embedding_owners=embedding_parents(self.model.module, emb_paths),
            compute_dtype=cfg.train.compute_dtype,
            task_weights=[float(cfg.train.task_weights.get(t, 1.0)) for t in cfg.schema.task_names]
            if cfg.train.task_weights
            else None,
        )
        if self.rank == 0:
            print(f"[mixrank] sharding plan:\n{plan}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------- data
    def _list(self, key: str) -> list[str]:
        from ranking.data.reader import resolve_files

        d = self.cfg.data
        try:
            if key == "train":
                return resolve_files(d.train, d.since, d.until)
            return resolve_files(getattr(d, key))
        except DataError as e:
            raise DataError(f"data.{key}: {e}") from None

    def _reader(self, key: str, batch_size: int, shuffle: bool, epoch: int, drop_last: bool):
        from ranking.data.reader import ParquetBatches

        files = self.files[key]
        # Units small enough that ranks get near-equal rows (every rank runs the same number of
        # steps: the epoch ends when the first rank runs out).
        shards = self.world * max(1, self.cfg.data.num_workers)
        unit_rows = int(min(65536, max(1024, self._rows(files) // (shards * 32))))
        reader = ParquetBatches(
            self.cfg.schema,
            files,
            batch_size,
            rank=self.rank,
            world_size=self.world,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            drop_last=drop_last,
            unit_rows=unit_rows,
            on_bad_rows=self.cfg.data.on_bad_rows,
            max_list_items=self.cfg.data.max_list_items,
            cache=self.encoded.get(key),
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
        if self.world == 1:
            return not have  # no collective a step for a world of one
        return all_ranks(not have, "max", self.device) == 1

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
        local = {
            "rng": ckpt.rng_state(),
            "scheduler": self.scheduler.state_dict(),
            "bad_rows": self.bad.state_dict(),
            "mc": mc_state.capture(self.model),  # managed-collision history (mc_state)
        }
        path = ckpt.save(
            self.state(),
            self.run_dir / "checkpoints",
            step,
            keep=self.cfg.train.keep_checkpoints,
            info={
                **info,
                "data_files": self._file_rows(),
                "metrics": metrics or {},
                "config": self.cfg.raw,
                "schema": schema_dict(self.cfg.schema),
                "lineage": self._lineage(),
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
        self.resumed_from = path
        if path is None:
            return Position()
        marker = ckpt.read_marker(path)
        self._check_same_data(path, marker.get("data_files"))
        if marker.get("world_size", self.world) != self.world:
            raise UserError(
                f"{path}: this checkpoint was written by {marker['world_size']} ranks and cannot "
                f"resume with {self.world} (the data position and per-rank state depend on it); "
                f"rerun with --nproc/--nnodes giving {marker['world_size']} ranks, or export it "
                f"and start a new run"
            )
        self.selection = marker.get("selection") or self.selection
        lineage = dict(marker.get("lineage") or {})  # the warm start, not applied again
        data = lineage.pop("data", None) or {}
        self.lineage = {**self.lineage, **lineage}
        self.rows_read = int(data.get("rows_read", 0)) if self.rank == 0 else 0  # summed at save
        init_dense_state(self.dense_opt, self.dense_params, ckpt.saved_keys(path))
        state = self.state()
        ckpt.load(state, path)  # strict: a key on either side only is an error naming it
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        local = ckpt.load_local(path)
        ckpt.set_rng_state(local["rng"])
        self.scheduler.load_state_dict(local["scheduler"])
        self.bad.load_state_dict(local.get("bad_rows", {}))
        if not mc_state.restore(self.model, local.get("mc"), path):
            self.log.info(
                f"warning: {path}: saved without the managed-collision history (an older "
                f"checkpoint); resuming approximately: the next evictions see a shorter history"
            )
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

    def warm_start(self, path: str) -> None:
        """Start this fresh run from the parent model at ``path`` (``train.warm_start``, see
        ``ranking.train.warm_start``): its weights into the sharded model, and its optimiser
        state where it is a checkpoint whose tables and optimisers match this run's. Step,
        schedule, data position and RNG stay fresh. Never called on a resumed run: its own
        checkpoint wins, and its marker keeps the lineage."""
        parent = ws.open_parent(path)
        differs = ws.check_compatible(parent, self.cfg)
        if differs:
            self.log.info(f"warm start: model config differs (same shapes): {'; '.join(differs)}")
        maps = ws.row_maps(parent, self.cfg.schema, self._table_keys)
        restored = False
        if parent.kind == "checkpoint":
            if not maps:  # every table row for row: the optimiser state can follow
                restored = self._load_with_optimizer(parent.checkpoint)
            box = [ws.checkpoint_model_version(parent.checkpoint) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            parent.model_version = box[0]
        if not restored:
            state = self.model.state_dict()
            ws.copy_into(state, ws.parent_weights(parent), maps)
            self.model.load_state_dict(state)
        self.lineage = ws.describe_lineage(parent)
        self.log.info(ws.summary(parent, maps, self._table_keys, restored))

    def _load_with_optimizer(self, path: Path) -> bool:
        """A parent checkpoint's model and optimiser state, loaded as a resume loads them (DCP
        reshards); this run's optimiser settings and fresh schedule stay in force. False, with
        nothing loaded, where the optimiser state does not match (another optimiser type, a
        table placed data-parallel in one run and fused in the other)."""
        from torch.distributed.checkpoint.api import CheckpointException

        settings = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        init_dense_state(self.dense_opt, self.dense_params, ckpt.saved_keys(path))
        state = self.state()
        try:
            ckpt.load(state, path)
        except (ckpt.CheckpointError, CheckpointException) as e:
            self.dense_opt.state.clear()  # what init_dense_state created: a fresh optimiser
            self.log.info(f"warm start: optimiser state not restored, it does not match ({e})")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        for group, lr in zip(self.dense_opt.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        return True

    def _lineage(self) -> dict:
        """What the manifest records of this run's origin: the parent (if warm-started) and
        the data it saw. Collective (sums the rows every rank trained on)."""
        from ranking.data.reader import partition_dates

        n = torch.tensor([self.rows_read], dtype=torch.int64, device=self.device)
        dist.all_reduce(n)
        d = self.cfg.data
        files = self.files.get("train", [])
        data = {
            "train": d.train,
            "since": d.since or None,
            "until": d.until or None,
            "partitions": partition_dates(files, d.train),
            "files": len(files),
            "rows": self._rows(files),
            "rows_read": int(n.item()),
            "valid": d.valid or None,
        }
        return {**self.lineage, "data": data}

    def _file_rows(self) -> dict[str, list]:
        """``{key: [[file, rows], ...]}`` of the data sets this run reads (saved in every
        checkpoint's marker)."""
        if not hasattr(self, "_file_rows_cache"):
            from ranking.data.reader import list_units

            out = {}
            for key, files in self.files.items():
                rows = dict.fromkeys(files, 0)
                for u in list_units(files, 1 << 30):
                    rows[u.path] += u.rows
                out[key] = [[f, n] for f, n in rows.items()]
            self._file_rows_cache = out
        return self._file_rows_cache

    def _check_same_data(self, path: Path, saved: dict | None) -> None:
        """A checkpoint's data position holds only for the files it was saved with: a file
        added, removed or rewritten since is an error naming it (restore it, or start a new
        run)."""
        if not saved:  # checkpoints written before the file list was saved
            return
        now = self._file_rows()
        for key, files in saved.items():
            old = {f: n for f, n in files}
            new = {f: n for f, n in now.get(key, [])}
            for f in sorted(set(old) | set(new)):
                if old.get(f) == new.get(f):
                    continue
                what = (
                    "is gone"
                    if f not in new
                    else "was added"
                    if f not in old
                    else f"has {new[f]} rows, {old[f]} when saved"
                )
                raise DataError(
                    f"data.{key}: {f} {what} since checkpoint {path}; the saved data position "
                    f"holds for the files it was saved with: restore them, or train a new run"
                )

    # ----------------------------------------------------------- loops
    def evaluate(self, key: str) -> dict:
        reader = self._reader(key, self.cfg.data.eval_batch_size, False, 0, drop_last=False)
        bad = BadRows(self.cfg.data.max_bad_fraction, f"data.{key}")
        bad.start_epoch(0, reader.rank_rows())
        m = evaluate(
            self.model,
            self._loader(reader),
            self.cfg.schema,
            self.device,
            self.cfg.train.compute_dtype,
            on_batch=lambda b: bad.add(b, self.rank),
        )
        self.bad_valid = bad.total
        return m

    def _set_progress(self, frac: float) -> None:
        """Schedule hooks: e.g. the UniMixer Sinkhorn temperature (annealed 1.0 -> 0.05)."""
        fn = getattr(self.model.module, "set_progress", None)
        if callable(fn):
            fn(frac)

    def _steps_in_epoch(self, epoch: int) -> int:
        """Steps of one epoch: every rank steps in lockstep until the first one runs out, so
        this is the minimum over ranks of the full batches its loader workers deliver."""
        reader = self._reader(
            "train",
            self.cfg.data.batch_size,
            self.cfg.data.shuffle,
            epoch,
            drop_last=True,
        )
        per_rank = [reader.rank_batches(r, self.cfg.data.num_workers) for r in range(self.world)]
        return max(1, min(per_rank))

    def _rows(self, files: list[str]) -> int:
        key = tuple(files)
        if key not in self._row_counts:
            from ranking.data.reader import list_units

            self._row_counts[key] = sum(u.rows for u in list_units(files, 1 << 30))
        return self._row_counts[key]

    def run(self, release: bool = False) -> int:
        """Train to the end, write the final checkpoint and export the artifact (rank 0).
        ``release``: drop the model, the optimisers and the encoded-batch cache once the final
        checkpoint is written, so the export (and the process's last moments) run beside no
        training state: a 10^8-row table's shard and its optimiser state on rank 0 (the
        worker passes it; an in-process caller keeps ``self.model`` to look at)."""
        cfg = self.cfg
        t = cfg.train
        bs = cfg.data.batch_size
        train_rows = self._rows(self.files["train"])
        epoch_steps = [self._steps_in_epoch(e) for e in range(t.epochs)]
        total = t.max_steps or sum(epoch_steps)
        steps_per_epoch = epoch_steps[0]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.dense_opt, lr_lambda(cfg, total))
        pos = self.try_resume()
        if self.resumed_from is None and t.warm_start:
            self.warm_start(t.warm_start)
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
            reader = self._reader("train", bs, cfg.data.shuffle, epoch, drop_last=True)
            self.bad.start_epoch(epoch, reader.rank_rows(), resumed=bool(skip))
            if skip:
                reader.skip_batches(skip)
            it = iter(self._loader(reader))
            batch_in_epoch = skip
            skip = 0
            while step < total:
                batch = next(it, None)
                if self._any_rank_done(batch is not None):
                    break
                self.bad.add(batch, self.rank)
                self.rows_read += batch.size
                self._set_progress(step / max(1, total))
                batch = batch.to(self.device)
                loss, (bce, _out) = self.train_model(batch)
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
                    skipped = ""
                    if self.bad.total:  # rank 0's count; summary.json adds every rank's
                        rec["bad_rows_rank0"] = dict(self.bad.total)
                        skipped = f"  bad rows skipped: {counts_text(self.bad.total)}"
                    self.log.record(rec)
                    self.log.progress(
                        f"step {step}/{total}  epoch {epoch}  loss {rec['loss']:.4f}  "
                        f"{rate:,.0f} samples/s  ETA {fmt_eta(eta)}{skipped}"
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
        bad_rows = self._gather_bad_rows()
        if release:
            # the last step's loss and output keep its autograd graph, and FBGEMM's lookup
            # node holds the table weights (in its saved data, which backward does not free)
            loss = bce = _out = batch = it = None
            self._release()
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
            if cfg.data.on_bad_rows == "skip":
                summary["bad_rows"] = bad_rows
            if t.select_best:
                summary["selection"] = {"metric": t.select_metric, **self.selection}
            # written whole, then renamed: a harness that waits for it never reads half a file
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")
        dist.barrier()
        return 0

    def _release(self) -> None:
        import contextlib
        import ctypes
        import gc

        for name in ("model", "train_model", "optimizer", "dense_opt", "dense_params",
                     "scheduler", "encoded"):  # fmt: skip
            setattr(self, name, None)
        gc.collect()
        # hand the freed heap back (glibc keeps the reader's and the steps' arenas); not glibc:
        # nothing to do
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _gather_bad_rows(self) -> dict:
        """Bad rows skipped by every rank (per cause): in training (``train``, the whole run,
        resumed parts included), in the last evaluation (``valid``), and the first message of
        each cause (``examples``)."""
        mine = (self.bad.total, self.bad_valid, self.bad.examples)
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        examples: dict[str, str] = {}
        for _, _, ex in every:
            for c, msg in ex.items():
                examples.setdefault(c, msg)
        return {
            "train": merge_counts([t for t, _, _ in every]),
            "valid": merge_counts([v for _, v, _ in every]),
            "examples": examples,
        }

    def _select(self, m: dict, step: int) -> bool:
        """Model selection after an evaluation (``train.select_best``): an improvement of
        ``select_metric`` saves the model into ``<run>/best/``; returns True when
        ``early_stopping_patience`` evaluations in a row brought no improvement."""
        t = self.cfg.train
        if not t.select_best:
            return False
        value = selection_value(m, t.select_metric)
        sel = self.selection
        better = improves(value, sel["best"], t.select_metric)
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
                    "lineage": self._lineage(),
                },
            )
        else:
            sel["since"] += 1
        stop = bool(t.early_stopping_patience) and sel["since"] >= t.early_stopping_patience
        stop = bool(all_ranks(stop, "max", self.device))  # every rank stops at the same step
        if stop:
            self.log.info(
                f"early stop at step {step}: no better valid {t.select_metric} for "
                f"{sel['since']} evaluations (best {sel['best']:.5f} at step {sel['step']})"
            )
        return stop

    def _eval_and_log(self, step: int, epoch: int) -> dict:
        t0 = time.perf_counter()
        m = self.evaluate("valid")
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
