"""Warm start: a new run starts from a parent model's weights instead of a fresh init.

``train.warm_start`` (``mixrank train --warm-start PATH``) names the parent: an exported
artifact directory (``manifest.json``), or a training checkpoint (a ``step-N`` directory, a
``checkpoints/`` directory or a run directory: the newest complete checkpoint in it).

What the child takes from the parent:

- every dense parameter and buffer, as is (the architecture must be the same, shape for shape);
- the embedding tables. Hashed features (no vocabulary) keep their buckets, so their tables are
  copied whole. Tables with a vocabulary (``data.vocab_from_train``) are copied row by row: the
  row of a value in both vocabularies moves to the value's index in the child's; a value new
  since the parent keeps the child's fresh init row; the missing (0) and OOV (1) rows are copied;
- from a checkpoint whose model and optimisers match the child's (same tables row for row, same
  optimiser types and table placement kinds), the optimiser state too: Adam's moments and
  per-parameter step counts, the embedding tables' Adagrad accumulators. The child's own
  optimiser settings (lr, weight decay, ...) stay in force. Otherwise the weights alone.

What starts fresh, for an artifact and a checkpoint alike: the step counter, the learning-rate
schedule (warm-up included), the data position, the RNG, model selection. A warm start is a new
run on new data, not the continuation of the parent's (resume a run directory for that).

Managed-collision tables (``collision: {kind: managed}``) keep the parent's id mapping: every id
the parent's MCH module holds keeps its embedding row, its counts / last-access steps, and the
module's step counter carries on. Row-wise shard ``r`` of ``W`` holds the ids of the ``r``-th of
``W`` equal blocks of the id space (TorchRec's row-wise input distribution) in its rows
``[r0, r0 + n - 1)`` (its last row is the reserved one for ids it does not hold), so the mapping
is laid out again for the child's shards (``relayout_managed``): an id keeps its parent row
where that row lies in its child shard, otherwise moves (with its embedding row) to a free row
of the shard; a shard given more ids than rows keeps its most used ones. With the parent's
layout (a checkpoint saved by as many ranks) the layout is the identity and the optimiser state
follows too.

An incompatible parent (another feature set, a table's dim, a hashed table's num_buckets or hash
seed, another architecture or parameter shape, other tasks) is a ``UserError`` naming the
feature or key, raised before training starts (``mixrank train`` checks before spawning).

Sharded tables: every rank holds the parent's full tensors (read from the artifact, or from the
checkpoint with DCP into plain tensors) and copies into the local shards of the child's
``DistributedModelParallel`` state dict, at each shard's offsets; then the state dict is loaded
as a resume loads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ranking.errors import UserError
from ranking.features import FeatureSchema


@dataclass
class Parent:
    """The model a run warm-starts from."""

    path: Path  # as the user gave it
    kind: str  # "artifact" | "checkpoint"
    config: dict  # the parent's resolved experiment config
    schema: FeatureSchema  # vocabulary paths resolvable (relative to the artifact)
    step: int
    model_version: str | None = None  # an artifact's; see ``checkpoint_model_version``
    checkpoint: Path | None = None  # the complete checkpoint directory (kind "checkpoint")
    weights: Path | None = None  # the artifact's weights file

    def describe(self) -> dict:
        """The parent as the child's manifest records it."""
        return {
            "path": str(self.checkpoint or self.path),
            "kind": self.kind,
            "step": self.step,
            "model_version": self.model_version,
        }


def open_parent(path: str | Path, key: str = "train.warm_start") -> Parent:
    """Read the parent's manifest or checkpoint marker (no weights yet). ``key`` is how the user
    named it (``--warm-start`` or ``train.warm_start``), for the error messages."""
    from ranking.export import MANIFEST, ArtifactError, read_manifest
    from ranking.model.config import migrate_experiment
    from ranking.train import checkpoint as ckpt

    p = Path(path)
    where = f"{key} {p}"
    if (p / MANIFEST).is_file():
        try:
            m = read_manifest(p)
            schema = FeatureSchema.from_dict(m["schema"], source=str(p / MANIFEST))
        except (ArtifactError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None
        table_dtype = m.get("table_dtype", "fp32")
        if table_dtype != "fp32":
            raise UserError(
                f"{where}: its tables are {table_dtype} (table_dtype in {p / MANIFEST}), a "
                f"serving format: warm-start from the fp32 artifact or the training checkpoint "
                f"it was exported from"
            )
        return Parent(
            path=p,
            kind="artifact",
            config=migrate_experiment(m["config"]),
            schema=schema,
            step=int(m.get("step", 0)),
            model_version=m["model_version"],
            weights=p / m["weights"],
        )
    found = None
    if (p / ckpt.MARKER).is_file():
        found = p
    else:
        found = ckpt.latest(p) or ckpt.latest(p / "checkpoints")
    if found is None:
        raise UserError(
            f"{where}: neither an artifact ({MANIFEST}) nor a complete training checkpoint "
            f"(a step-N directory with {ckpt.MARKER}, or a run or checkpoints directory "
            f"holding one)"
        )
    marker = ckpt.read_marker(found)
    config = marker.get("config")
    if config is None:
        raise UserError(f"{where}: {found / ckpt.MARKER} records no config (an old checkpoint)")
    try:
        sd = marker.get("schema")
        if sd is None:
            from ranking.features import load_schema

            schema = load_schema(config["schema"])
        else:
            schema = FeatureSchema.from_dict(sd, source=str(found / ckpt.MARKER))
    except (ValueError, OSError) as e:
        raise UserError(f"{where}: {found}: schema: {e}") from None
    return Parent(
        path=p,
        kind="checkpoint",
        config=migrate_experiment(config),
        schema=schema,
        step=int(marker.get("step", 0)),
        checkpoint=found,
    )


# ------------------------------------------------------------------ compatibility


def _features(parent: FeatureSchema, child: FeatureSchema, fail) -> None:
    if parent.task_names != child.task_names:
        fail(f"tasks: {parent.task_names} in the parent, {child.task_names} here")
    pf = {f.name: f for f in parent.features}
    cf = {f.name: f for f in child.features}
    for name in cf:
        if name not in pf:
            fail(f"feature {name!r}: not in the parent (its features: {sorted(pf)})")
    for name in pf:
        if name not in cf:
            fail(f"feature {name!r}: in the parent, not here")
    if list(pf) != list(cf):  # the order embeddings and dense values are concatenated in
        fail(f"features: in the order {list(pf)} in the parent, {list(cf)} here")
    for name, c in cf.items():
        p = pf[name]
        for attr in ("kind", "group", "table", "pooling", "side_of", "target"):
            if getattr(p, attr) != getattr(c, attr) and (c.is_sparse or attr in ("kind", "group")):
                fail(
                    f"feature {name!r}: {attr} {getattr(p, attr)!r} in the parent, "
                    f"{getattr(c, attr)!r} here"
                )
        if not c.is_sparse:
            continue
        if p.dim != c.dim:
            fail(f"feature {name!r}: dim {p.dim} in the parent, {c.dim} here")
        mode = {True: "hashed", False: "a vocabulary"}
        if (p.vocab is None) != (c.vocab is None):
            fail(
                f"feature {name!r}: {mode[p.vocab is None]} in the parent, "
                f"{mode[c.vocab is None]} here (data.vocab_from_train must match the parent's)"
            )
        if (p.collision is None) != (c.collision is None):
            mode = {True: "plainly hashed", False: "a managed-collision table"}
            fail(
                f"feature {name!r}: {mode[p.collision is None]} in the parent, "
                f"{mode[c.collision is None]} here (collision.kind must match the parent's)"
            )
        if c.collision is not None:
            for attr in ("rows", "policy", "id_space"):
                a, b = getattr(p.collision, attr), getattr(c.collision, attr)
                if a != b:
                    label = "num_buckets" if attr == "rows" else f"collision.{attr}"
                    fail(f"feature {name!r}: {label} {a!r} in the parent, {b!r} here")
        if c.vocab is None and p.num_buckets != c.num_buckets:
            fail(
                f"feature {name!r}: num_buckets {p.num_buckets} in the parent, {c.num_buckets} "
                f"here (a hashed value's row would change)"
            )
        if c.vocab is None and parent.hash_seed != child.hash_seed:
            fail(
                f"feature {name!r}: hashed with hash_seed {parent.hash_seed} in the parent, "
                f"{child.hash_seed} here"
            )
    if parent.groups != child.groups:
        fail(f"groups: {list(parent.groups)} in the parent, {list(child.groups)} here")


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: d}


def _asdict(obj) -> Any:
    """A config dataclass as a dict of its compared fields (``source`` left out)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.compare}
    return obj


def _model_config_diff(parent_model: dict, child_model) -> list[str]:
    """``model.<key>: <parent> in the parent, <child> here`` for every architecture key that
    differs (defaults filled in on both sides)."""
    from ranking.model.config import ModelConfig

    a = _flat(_asdict(ModelConfig.from_dict(parent_model or {})), "model")
    b = _flat(_asdict(child_model), "model")
    return [
        f"{k}: {a.get(k)!r} in the parent, {b.get(k)!r} here"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def parent_shapes(parent: Parent) -> dict[str, tuple]:
    """Shapes of the parent's model state: from the artifact's weights (memory-mapped) or the
    checkpoint's DCP metadata."""
    if parent.kind == "artifact":
        return {k: tuple(v.shape) for k, v in _artifact_weights(parent).items()}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(parent.checkpoint)).read_metadata().state_dict_metadata
    return {
        k.removeprefix("model."): tuple(m.size)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }


def table_keys(model: torch.nn.Module) -> dict[str, str]:
    """``{state-dict key: table name}`` of the embedding tables of an unsharded model."""
    from ranking.train.sharding import embedding_modules, table_configs

    keys = set(model.state_dict())
    out = {}
    from ranking.train.sharding import is_managed

    for path, module in embedding_modules(model).items():
        sub = "embedding_bags" if hasattr(module, "embedding_bag_configs") else "embeddings"
        if is_managed(module):
            path, sub = f"{path}._embedding_module", "embedding_bags"
        for t in table_configs(module):
            key = f"{path}.{sub}.{t.name}.weight" if path else f"{sub}.{t.name}.weight"
            if key not in keys:
                raise RuntimeError(f"table {t.name!r}: no state-dict key {key!r}")
            out[key] = t.name
    return out


def check_compatible(parent: Parent, cfg, key: str = "train.warm_start") -> list[str]:
    """``UserError`` (``"<key> <path>: feature 'item': dim 16 in the parent, 32 here"``) unless
    the child experiment ``cfg`` can start from ``parent``. Returns the model-config keys that
    differ without changing any parameter's shape (dropout, init scales, ...): allowed, and
    worth a log line."""
    from ranking.model.ranker import build_model

    where = f"{key} {parent.path}"

    def fail(msg: str):
        raise UserError(f"{where}: {msg}")

    _features(parent.schema, cfg.schema, fail)
    parent_model = parent.config.get("model") or {}
    if parent_model.get("arch", "rankmixer") != cfg.model.arch:
        fail(f"model.arch: {parent_model.get('arch')!r} in the parent, {cfg.model.arch!r} here")
    try:
        diff = _model_config_diff(parent_model, cfg.model)
    except ValueError as e:
        fail(f"model: the parent's model config does not load here: {e}")
    with torch.device("meta"):
        child = build_model(cfg.model, cfg.schema)
    tables = table_keys(child)
    mine = {k: tuple(v.shape) for k, v in child.state_dict().items()}
    theirs = parent_shapes(parent)
    for k in sorted(set(mine) | set(theirs)):
        a, b = theirs.get(k), mine.get(k)
        if k in tables and a is not None and b is not None:
            continue  # tables: checked feature by feature (vocabulary tables change size)
        if a != b:
            what = f"{list(a) if a else 'absent'} in the parent, {list(b) if b else 'absent'} here"
            hint = f"; {'; '.join(diff[:3])}" if diff else ""
            fail(f"model: parameter {k!r}: {what}{hint}")
    return diff


# ------------------------------------------------------------------ rows and weights


def row_maps(parent: Parent, schema: FeatureSchema, tables: dict[str, str]) -> dict:
    """``{state-dict key: (child_rows, parent_rows)}`` for the tables copied row by row
    (vocabularies that differ); a table absent from the result is copied whole. ``tables``:
    ``table_keys`` of the child's model."""
    from ranking.data.convert import resolve_vocab_path
    from ranking.data.hashing import load_vocab

    by_name = {t.name: t for t in schema.tables}
    parent_tables = {t.name: t for t in parent.schema.tables}
    out = {}
    same_layout = parent.kind == "checkpoint" and _parent_world(parent) == _world()
    for key, name in tables.items():
        t = by_name[name]
        if t.collision is not None:
            if not same_layout:  # laid out again in copy_into (relayout_managed)
                prefix = key.removesuffix(f"._embedding_module.embedding_bags.{name}.weight")
                out[key] = Managed(name, prefix, t.collision.id_space)
            continue
        f = schema.feature(t.feature_names[0])
        if f.vocab is None:
            continue
        pfeat = parent.schema.feature(f.name)
        try:
            old = load_vocab(resolve_vocab_path(parent.schema, pfeat)).to_pylist()
        except OSError as e:
            raise UserError(
                f"train.warm_start {parent.path}: feature {f.name!r}: cannot read the parent's "
                f"vocabulary: {e}"
            ) from None
        new = load_vocab(resolve_vocab_path(schema, f)).to_pylist()
        if old == new and parent_tables[name].num_buckets == t.num_buckets:
            continue
        index = {v: i for i, v in enumerate(old)}
        pairs = [(j + 2, index[v] + 2) for j, v in enumerate(new) if v in index]
        child_rows = np.array([0, 1] + [c for c, _ in pairs], dtype=np.int64)
        parent_rows = np.array([0, 1] + [p for _, p in pairs], dtype=np.int64)
        out[key] = (torch.from_numpy(child_rows), torch.from_numpy(parent_rows))
    return out


@dataclass(frozen=True)
class Managed:
    """``row_maps``' entry for a managed-collision table whose mapping ``copy_into`` lays out
    again for the child's shards (``relayout_managed``)."""

    table: str
    prefix: str  # the ManagedCollisionEmbeddingBagCollection's state-dict prefix
    id_space: int


_MC_PREFIX = "._managed_collision_collection._managed_collision_modules."
_EMPTY_ID = torch.iinfo(torch.int64).max


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _parent_world(parent: Parent) -> int | None:
    from ranking.train import checkpoint as ckpt

    return ckpt.read_marker(parent.checkpoint).get("world_size")


def _segments(dst) -> list[tuple[int, int]]:
    """``[(first row, rows)]`` of each row-wise shard of a child's state entry (one: unsharded)."""
    if hasattr(dst, "metadata") and hasattr(dst, "local_shards"):
        shards = sorted(dst.metadata().shards_metadata, key=lambda m: m.shard_offsets[0])
        return [(m.shard_offsets[0], m.shard_sizes[0]) for m in shards]
    return [(0, int(dst.shape[0]))]


@torch.no_grad()
def relayout_managed(
    weights: dict[str, torch.Tensor], m: Managed, segments: list[tuple[int, int]]
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The parent's MCH mapping of ``table`` (state keys under ``prefix``) laid out for the
    child's row-wise ``segments``: ``({buffer key: full tensor}, (child_rows, parent_rows))``,
    the rows' embeddings to copy. Shard ``r`` of ``W`` takes the ids of block ``r`` of the id
    space (``ceil(id_space / W)`` ids each, as TorchRec's row-wise input distribution routes
    them) into its rows but the last (reserved for ids it does not hold: the parent's reserved
    row, its last, is copied there). An id keeps its parent row when that row is a free, usable
    row of its shard, else takes the shard's lowest free row; beyond ``n - 1`` ids, a shard keeps
    those with the largest counts (else the most recent accesses)."""
    base, table = f"{m.prefix}{_MC_PREFIX}{m.table}.", m.table
    ids = weights[f"{base}_mch_sorted_raw_ids"]
    rows = weights[f"{base}_mch_remapped_ids_mapping"]
    meta = {
        k[len(base) :]: v
        for k, v in weights.items()
        if k.startswith(f"{base}_mch_")
        and k[len(base) :] not in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping")
    }
    total = sum(n for _, n in segments)
    if total != ids.numel():
        raise UserError(
            f"train.warm_start: table {table!r}: {ids.numel()} rows in the parent's mapping, "
            f"{total} here"
        )
    block = -(-m.id_space // len(segments))
    held = ids != _EMPTY_ID
    rank = "_mch_counts" if "_mch_counts" in meta else "_mch_last_access_iter"
    score = meta[rank] if rank in meta else torch.zeros_like(ids)
    new_ids = torch.full_like(ids, _EMPTY_ID)
    new_rows = torch.empty_like(rows)
    new_meta = {k: torch.zeros_like(v) for k, v in meta.items()}
    child_rows, parent_rows = [], []
    last = total - 1  # the parent's reserved row (unsharded: the fallback of every unknown id)
    for r, (r0, n) in enumerate(segments):
        mine = held & (ids >= r * block) & (ids < (r + 1) * block)
        idx = mine.nonzero().flatten()
        if idx.numel() > n - 1:  # more ids than usable rows: the most used stay
            idx = idx[torch.argsort(score[idx], descending=True, stable=True)[: n - 1]]
        pr = rows[idx]
        usable = (pr >= r0) & (pr < r0 + n - 1)
        keep = usable.clone()  # a row held twice (never, from one mapping): the first keeps it
        seen: set[int] = set()
        for j, row in enumerate(pr.tolist()):
            if keep[j] and row in seen:
                keep[j] = False
            seen.add(row)
        taken = set(pr[keep].tolist())
        free = [x for x in range(r0, r0 + n - 1) if x not in taken]
        cr = pr.clone()
        moved = (~keep).nonzero().flatten().tolist()
        for j, x in zip(moved, free):
            cr[j] = x
        unused = sorted(set(range(r0, r0 + n)) - set(cr.tolist()))
        order = torch.argsort(ids[idx])
        k = idx.numel()
        new_ids[r0 : r0 + k] = ids[idx][order]
        new_rows[r0 : r0 + k] = cr[order]
        new_rows[r0 + k : r0 + n] = torch.tensor(unused, dtype=rows.dtype)
        for name, v in meta.items():
            new_meta[name][r0 : r0 + k] = v[idx][order]
        child_rows += [*cr.tolist(), r0 + n - 1]
        parent_rows += [*pr.tolist(), last]
    out = {f"{base}_mch_sorted_raw_ids": new_ids, f"{base}_mch_remapped_ids_mapping": new_rows}
    out.update({f"{base}{k}": v for k, v in new_meta.items()})
    return out, (torch.tensor(child_rows), torch.tensor(parent_rows))


def _artifact_weights(parent: Parent) -> dict[str, torch.Tensor]:
    try:
        return torch.load(parent.weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt, truncated, not a weights-only file
        raise UserError(f"train.warm_start {parent.path}: cannot load weights: {e}") from None


def parent_weights(parent: Parent) -> dict[str, torch.Tensor]:
    """The parent's full (unsharded) model state on CPU."""
    if parent.kind == "artifact":
        return _artifact_weights(parent)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(parent.checkpoint)).read_metadata().state_dict_metadata
    model = {
        k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    state = {"model": model}
    # no_dist: each rank reads the whole tensors for itself (sharded tables saved by several
    # ranks come back whole), without collectives
    dcp.load(state, checkpoint_id=str(parent.checkpoint), no_dist=True)
    return state["model"]


@torch.no_grad()
def copy_into(state: dict, weights: dict[str, torch.Tensor], maps: dict) -> None:
    """Copy the parent's ``weights`` into the child's model ``state`` in place: plain tensors
    (dense parameters, data-parallel tables) whole or by ``maps`` rows, sharded tables into
    each local shard at its row and column offsets."""
    missing = sorted(set(state) - set(weights))
    if missing:
        raise UserError(f"train.warm_start: the parent has no {missing[0]!r}")
    maps = dict(maps)
    weights = dict(weights)
    for key, m in list(maps.items()):
        if isinstance(m, Managed):  # the id mapping laid out for this run's row-wise shards
            ref = state[f"{m.prefix}{_MC_PREFIX}{m.table}._mch_sorted_raw_ids"]
            buffers, maps[key] = relayout_managed(weights, m, _segments(ref))
            weights.update(buffers)
    for key, dst in state.items():
        if key.endswith("._output_segments_tensor"):
            continue  # the child's own row-wise layout (TorchRec checks it on load)
        src = weights[key]
        rows = maps.get(key)
        if hasattr(dst, "local_shards"):  # ShardedTensor: row-, column-, table-wise shards
            for shard in dst.local_shards():
                if len(shard.metadata.shard_offsets) == 1:  # a row-wise MCH buffer
                    (r0,), (n,) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(src[r0 : r0 + n])
                    continue
                r0, c0 = shard.metadata.shard_offsets
                n, w = shard.metadata.shard_sizes
                _copy_rows(shard.tensor, src[:, c0 : c0 + w], rows, r0, n)
        elif isinstance(dst, torch.Tensor) and not hasattr(dst, "device_mesh"):  # no DTensor
            if rows is None:
                dst.copy_(src)
            else:
                _copy_rows(dst, src, rows, 0, dst.shape[0])
        else:
            raise UserError(
                f"train.warm_start: {key}: cannot copy into a {type(dst).__name__} state entry"
            )


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, rows, r0: int, n: int) -> None:
    """``dst`` holds the child's rows ``[r0, r0 + n)``."""
    if rows is None:
        dst.copy_(src[r0 : r0 + n])
        return
    child, parent = rows
    mine = (child >= r0) & (child < r0 + n)
    dst[child[mine] - r0] = src[parent[mine]].to(dst.dtype)


def checkpoint_model_version(path: Path) -> str:
    """The ``model_version`` of the fp32 artifact that ``mixrank export --checkpoint path``
    writes: what a checkpoint parent is recorded as (exported into a temporary directory)."""
    import shutil
    import tempfile

    from ranking.export import export_checkpoint, read_manifest

    tmp = Path(tempfile.mkdtemp(prefix="mixrank-parent-"))
    try:
        return read_manifest(export_checkpoint(path, tmp / "artifact"))["model_version"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_lineage(parent: Parent | None) -> dict:
    """The lineage a run records (in every checkpoint marker, then the artifact's manifest)."""
    return {
        "parent_model_version": parent.model_version if parent else None,
        "parent": parent.describe() if parent else None,
    }


def summary(parent: Parent, maps: dict, tables: dict[str, str], restored_optimizer: bool) -> str:
    """One log line: what came from the parent."""
    kept = []
    for key, m in maps.items():
        if isinstance(m, Managed):
            kept.append(f"{m.table} id mapping (managed collision, laid out for this run's shards)")
        else:
            kept.append(f"{tables[key]} {len(m[0]) - 2} values")
    rows = f"; vocabulary rows copied: {', '.join(kept)}" if kept else ""
    optim = " and optimiser state" if restored_optimizer else ""
    return (
        f"warm start from {parent.kind} {parent.checkpoint or parent.path} "
        f"({json.dumps(parent.model_version)}, step {parent.step}): weights{optim}{rows}"
    )
