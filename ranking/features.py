"""Feature schema: the one description of a data set's columns, shared by training and serving.

A ``FeatureSchema`` is loaded from YAML (``configs/schemas/*.yaml``)::

    name: frappe
    hash_seed: 0
    tasks:
      - {name: click, label: label}
    groups: [user, item, context]          # token order for the model (optional)
    features:
      - {name: user, kind: categorical, num_buckets: 2048, dim: 16, group: user}
      - {name: genres, kind: id_list, num_buckets: 64, dim: 16, group: item, pooling: mean}
      - {name: age, kind: dense, transform: log1p, fill: 0.0, clip: [0, 100], group: user}

Feature kinds:

- ``categorical``: one string or integer per row, mapped to ``[0, num_buckets)`` by a stable
  seeded 64-bit hash (or by a vocabulary file built with ``mixrank data vocab``).
- ``id_list``: a ``list<...>`` column of variable length, each element mapped like a categorical.
- ``dense``: a number (or null, replaced by ``fill``) with an optional ``transform``.
- ``sequence``: a behaviour history, a ``list<...>`` column of ids, most recent first, truncated
  to ``max_length``; hashed like an id_list. It may share an embedding ``table`` with a
  categorical feature (``table: item``: the history's items and the candidate's item are rows
  of one table), whose embedding is then the ``target`` of target attention. A side sequence
  (``side_of: item_hist``, e.g. an action type per position) is aligned with its main sequence
  position by position, has its own table of the same ``dim``, and its embeddings are added to
  the main sequence's. Sequences make their own tokens (``model.sequence``), so they take no
  ``group``; their ids travel in ``Batch.sequences``.

Example::

      - {name: item, kind: categorical, num_buckets: 4096, dim: 16, group: item}
      - {name: item_hist, kind: sequence, table: item, max_length: 50}
      - {name: action_hist, kind: sequence, side_of: item_hist, num_buckets: 8, dim: 16}

Managed-collision tables (open id spaces): a categorical or id_list feature may take
``collision: {kind: managed, policy: lfu, ...}`` (``CollisionSpec``). Its values are then hashed
into a large id space (``id_space``, default 2**40: practically no two values share an id), and
TorchRec's managed-collision module (MCH, ``torchrec.modules.mc_modules``) maps each id to one
of the table's ``num_buckets`` rows, admitting new ids and evicting old ones by the ``policy``
during training; an id it does not hold reads the table's reserved last row. ``collision:
{kind: hash}`` (the default) is plain hashing into ``num_buckets``::

      - {name: item, kind: categorical, num_buckets: 4096, dim: 16, group: item,
         collision: {kind: managed, policy: lfu, eviction_interval: 16}}

Every sparse feature names its embedding ``table`` (default: its own name; several features may
share one table if they agree on ``num_buckets`` and ``dim``), its embedding ``dim`` and its token
``group``, which the model's tokenizer uses to cut the embeddings into tokens.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CATEGORICAL = "categorical"
ID_LIST = "id_list"
DENSE = "dense"
SEQUENCE = "sequence"
KINDS = (CATEGORICAL, ID_LIST, DENSE, SEQUENCE)
TRANSFORMS = ("none", "log1p", "signed_log1p")
POOLINGS = ("sum", "mean")


COLLISION_KINDS = ("hash", "managed")
# MCH eviction policies of torchrec.modules.mc_modules (TorchRec 1.8). A TTL policy exists only
# for the HashZch module (torchrec.modules.hash_mc_evictions), whose FBGEMM op
# zero_collision_hash runs on the CPU read-only (no insertion: "Expected readonly to be true"),
# so it cannot train here; not offered (docs/TRAINING.md).
COLLISION_POLICIES = ("lfu", "distance_lfu", "lru")
DEFAULT_ID_SPACE = 2**40


class SchemaError(ValueError):
    """A schema YAML (or dict) is invalid. The message names the file and the key."""


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: a name and the 0/1 label column it is trained on."""

    name: str
    label: str


@dataclass(frozen=True)
class CollisionSpec:
    """How a sparse feature's ids become table rows when ``kind`` is ``managed``.

    Attributes:
        rows: the table's rows (the YAML's ``num_buckets``); the last one is reserved for ids
            the mapping does not hold.
        policy: the eviction policy: ``lfu`` (counts), ``distance_lfu`` (counts decayed by the
            steps since the last access), ``lru`` (last access, decayed).
        eviction_interval: training steps between two admission/eviction rounds (new ids read
            the reserved row until the next round admits them).
        id_space: values are hashed into ``[0, id_space)`` (0: missing) before the mapping.
        decay_exponent: the decay of ``lru`` and ``distance_lfu``.
    """

    rows: int
    policy: str = "lfu"
    eviction_interval: int = 16
    id_space: int = DEFAULT_ID_SPACE
    decay_exponent: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "managed", "policy": self.policy}
        d["eviction_interval"] = self.eviction_interval
        if self.id_space != DEFAULT_ID_SPACE:
            d["id_space"] = self.id_space
        if self.decay_exponent != 1.0:
            d["decay_exponent"] = self.decay_exponent
        return d


_COLLISION_KEYS = {"kind", "policy", "eviction_interval", "id_space", "decay_exponent"}


def _parse_collision(raw: Any, key: str, rows: int, err) -> CollisionSpec | None:
    """``collision:`` of a feature -> ``CollisionSpec`` (managed) or None (plain hashing)."""
    key = f"{key}.collision"
    if not isinstance(raw, dict):
        raise err(key, f"expected a mapping {{kind: managed, policy: ...}}, got {raw!r}")
    bad = set(raw) - _COLLISION_KEYS
    if bad:
        raise err(
            f"{key}.{sorted(bad)[0]}", f"unknown key (expected one of {sorted(_COLLISION_KEYS)})"
        )
    kind = raw.get("kind", "hash")
    if kind not in COLLISION_KINDS:
        raise err(f"{key}.kind", f"expected one of {list(COLLISION_KINDS)}, got {kind!r}")
    if kind == "hash":
        if set(raw) - {"kind"}:
            raise err(f"{key}.{sorted(set(raw) - {'kind'})[0]}", "only for kind: managed")
        return None
    policy = raw.get("policy", "lfu")
    if policy not in COLLISION_POLICIES:
        hint = (
            " (TTL eviction is only in TorchRec's HashZch module, whose FBGEMM op cannot "
            "insert ids on the CPU; not offered)"
            if policy == "ttl"
            else ""
        )
        raise err(
            f"{key}.policy", f"expected one of {list(COLLISION_POLICIES)}, got {policy!r}{hint}"
        )
    interval = raw.get("eviction_interval", 16)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise err(f"{key}.eviction_interval", f"expected a positive integer, got {interval!r}")
    id_space = raw.get("id_space", DEFAULT_ID_SPACE)
    if not isinstance(id_space, int) or isinstance(id_space, bool) or not rows < id_space <= 2**62:
        raise err(
            f"{key}.id_space",
            f"expected an integer above num_buckets ({rows}) and at most 2**62, got {id_space!r}",
        )
    decay = raw.get("decay_exponent", 1.0)
    if not isinstance(decay, int | float) or isinstance(decay, bool) or decay <= 0:
        raise err(f"{key}.decay_exponent", f"expected a positive number, got {decay!r}")
    if rows < 2:
        raise err(f"{key}", "a managed table needs num_buckets >= 2 (its last row is reserved)")
    return CollisionSpec(rows, policy, interval, id_space, float(decay))


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    Sparse features (``categorical``, ``id_list``) use ``num_buckets``, ``dim``, ``table``,
    ``pooling`` and optionally ``vocab``; dense features use ``transform``, ``fill``, ``clip``.
    ``column`` is the source column in the data (default: ``name``).

    With a managed ``collision`` (``CollisionSpec``), ``num_buckets`` is the range the data
    pipeline hashes values into, ``collision.id_space``, and the table's rows are
    ``collision.rows`` (the YAML's ``num_buckets``; ``table_rows``).
    """

    name: str
    kind: str
    group: str
    column: str = ""
    num_buckets: int = 0
    dim: int = 0
    table: str = ""
    pooling: str = "sum"
    vocab: str | None = None
    transform: str = "none"
    fill: float = 0.0
    clip: tuple[float, float] | None = None
    max_length: int = 0
    target: str = ""
    side_of: str = ""
    collision: CollisionSpec | None = None

    @property
    def table_rows(self) -> int:
        """Rows of this feature's embedding table (``num_buckets`` unless managed)."""
        return self.collision.rows if self.collision is not None else self.num_buckets

    @property
    def is_sparse(self) -> bool:
        """Hashed into an embedding table (categorical, id_list, sequence)."""
        return self.kind in (CATEGORICAL, ID_LIST, SEQUENCE)

    @property
    def is_sequence(self) -> bool:
        return self.kind == SEQUENCE


@dataclass(frozen=True)
class TableSpec:
    """One embedding table, derived from the sparse features that name it."""

    name: str
    num_buckets: int
    dim: int
    pooling: str
    feature_names: tuple[str, ...]
    collision: CollisionSpec | None = None


_TOP_KEYS = {"name", "hash_seed", "tasks", "groups", "features", "max_list_length"}
_FEATURE_KEYS = {f.name for f in dataclasses.fields(FeatureSpec)}
_TASK_KEYS = {"name", "label"}


@dataclass(frozen=True)
class FeatureSchema:
    """The columns of a data set and how each becomes model input.

    Attributes:
        name: schema name (for manifests and logs).
        tasks: prediction tasks, in output order; ``labels`` in a ``Batch`` follow this order.
        features: all features, in the order of the YAML.
        groups: token groups in model order.
        hash_seed: seed of the categorical hash; part of the model's identity.
        max_list_length: id-list features are truncated to this many ids per row.
        source: the file the schema was read from (for error messages), if any.
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    features: tuple[FeatureSpec, ...]
    groups: tuple[str, ...]
    hash_seed: int = 0
    max_list_length: int = 64
    source: str = field(default="<dict>", compare=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_yaml(cls, path: str | Path) -> FeatureSchema:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SchemaError(f"{path}: cannot read schema file: {e.strerror or e}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SchemaError(f"{path}: not valid YAML: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> FeatureSchema:
        def err(key: str, msg: str) -> SchemaError:
            return SchemaError(f"{source}: {key}: {msg}")

        if not isinstance(data, dict):
            raise SchemaError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise err(sorted(unknown)[0], f"unknown key (expected one of {sorted(_TOP_KEYS)})")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise err("name", "required, a non-empty string")
        hash_seed = data.get("hash_seed", 0)
        if not isinstance(hash_seed, int) or isinstance(hash_seed, bool) or hash_seed < 0:
            raise err("hash_seed", f"expected a non-negative integer, got {hash_seed!r}")
        max_list_length = data.get("max_list_length", 64)
        if not isinstance(max_list_length, int) or max_list_length < 1:
            raise err("max_list_length", f"expected a positive integer, got {max_list_length!r}")

        raw_tasks = data.get("tasks")
        if not isinstance(raw_tasks, list) or not raw_tasks:
            raise err("tasks", "required, a non-empty list of {name, label}")
        tasks = []
        for i, t in enumerate(raw_tasks):
            key = f"tasks[{i}]"
            if not isinstance(t, dict):
                raise err(key, "expected a mapping {name, label}")
            bad = set(t) - _TASK_KEYS
            if bad:
                raise err(f"{key}.{sorted(bad)[0]}", "unknown key (expected name, label)")
            if not isinstance(t.get("name"), str) or not isinstance(t.get("label"), str):
                raise err(key, "name and label are required strings")
            tasks.append(TaskSpec(t["name"], t["label"]))
        if len({t.name for t in tasks}) != len(tasks):
            raise err("tasks", "task names must be unique")

        raw_features = data.get("features")
        if not isinstance(raw_features, list) or not raw_features:
            raise err("features", "required, a non-empty list")
        features = [
            cls._parse_feature(f, f"features[{i}]", err) for i, f in enumerate(raw_features)
        ]
        names = [f.name for f in features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise err("features", f"duplicate feature name {sorted(dup)[0]!r}")
        columns = [f.column for f in features]
        shared = {c for c in columns if columns.count(c) > 1}
        if shared:
            c = sorted(shared)[0]
            users = [f.name for f in features if f.column == c]
            raise err(
                "features",
                f"column {c!r} is the source of several features ({', '.join(users)}); "
                "each feature needs its own column (a request names features by column)",
            )
        label_cols = {t.label for t in tasks}
        for f in features:
            if f.column in label_cols:
                raise err(f"features[{f.name}].column", f"{f.column!r} is a label column")

        seen_groups = list(dict.fromkeys(f.group for f in features if not f.is_sequence))
        groups = data.get("groups", seen_groups)
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise err("groups", "expected a list of group names")
        missing = [g for g in seen_groups if g not in groups]
        if missing:
            raise err("groups", f"group {missing[0]!r} is used by a feature but not listed")
        empty = [g for g in groups if g not in seen_groups]
        if empty:
            raise err("groups", f"group {empty[0]!r} has no feature")

        features = _resolve_sequences(features, raw_features, err)
        schema = cls(
            name=name,
            tasks=tuple(tasks),
            features=tuple(features),
            groups=tuple(groups),
            hash_seed=hash_seed,
            max_list_length=max_list_length,
            source=source,
        )
        schema.tables  # noqa: B018 - validates table consistency
        return schema

    @staticmethod
    def _parse_feature(raw: Any, key: str, err) -> FeatureSpec:
        if not isinstance(raw, dict):
            raise err(key, "expected a mapping")
        fname = raw.get("name")
        if isinstance(fname, str):
            key = f"features[{fname}]"
        else:
            raise err(f"{key}.name", "required string")
        bad = set(raw) - _FEATURE_KEYS
        if bad:
            raise err(
                f"{key}.{sorted(bad)[0]}", f"unknown key (expected one of {sorted(_FEATURE_KEYS)})"
            )
        kind = raw.get("kind")
        if kind not in KINDS:
            raise err(f"{key}.kind", f"expected one of {list(KINDS)}, got {kind!r}")
        group = raw.get("group")
        if kind == SEQUENCE:
            if group is not None:
                raise err(
                    f"{key}.group",
                    "a sequence makes its own tokens (model.sequence), it takes no group",
                )
            group = ""
        elif not isinstance(group, str) or not group:
            raise err(f"{key}.group", "required, the token group of this feature")
        else:
            for k in ("max_length", "target", "side_of"):
                if k in raw:
                    raise err(f"{key}.{k}", "only for sequence features")
        kw: dict[str, Any] = {"name": fname, "kind": kind, "group": group}
        kw["column"] = raw.get("column", fname)
        if not isinstance(kw["column"], str):
            raise err(f"{key}.column", "expected a string")
        if kind == DENSE:
            for k in ("num_buckets", "dim", "table", "pooling", "vocab", "collision"):
                if k in raw:
                    raise err(f"{key}.{k}", "only for categorical and id_list features")
            transform = raw.get("transform", "none")
            if transform not in TRANSFORMS:
                raise err(
                    f"{key}.transform", f"expected one of {list(TRANSFORMS)}, got {transform!r}"
                )
            kw["transform"] = transform
            fill = raw.get("fill", 0.0)
            if not isinstance(fill, int | float) or isinstance(fill, bool):
                raise err(f"{key}.fill", f"expected a number, got {fill!r}")
            kw["fill"] = float(fill)
            clip = raw.get("clip")
            if clip is not None:
                if (
                    not isinstance(clip, list)
                    or len(clip) != 2
                    or not all(isinstance(c, int | float) for c in clip)
                    or clip[0] > clip[1]
                ):
                    raise err(f"{key}.clip", f"expected [low, high] with low <= high, got {clip!r}")
                kw["clip"] = (float(clip[0]), float(clip[1]))
        else:
            for k in ("transform", "fill", "clip"):
                if k in raw:
                    raise err(f"{key}.{k}", "only for dense features")
            shared = kind == SEQUENCE and "table" in raw and raw["table"] != fname
            for k in ("num_buckets", "dim"):
                v = raw.get(k)
                if shared and v is None:
                    continue  # taken from the table's other feature (``_resolve_sequences``)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise err(f"{key}.{k}", f"required, a positive integer, got {v!r}")
                kw[k] = v
            kw["table"] = raw.get("table", fname)
            if not isinstance(kw["table"], str) or not kw["table"]:
                raise err(f"{key}.table", "expected a non-empty string")
            if kind == SEQUENCE:
                ml = raw.get("max_length", 50)
                if not isinstance(ml, int) or isinstance(ml, bool) or ml < 1:
                    raise err(f"{key}.max_length", f"expected a positive integer, got {ml!r}")
                kw["max_length"] = ml
                for k in ("target", "side_of"):
                    v = raw.get(k, "")
                    if not isinstance(v, str):
                        raise err(f"{key}.{k}", f"expected a feature name, got {v!r}")
                    kw[k] = v
            pooling = raw.get("pooling", "mean" if kind == SEQUENCE else "sum")
            if pooling not in POOLINGS:
                raise err(f"{key}.pooling", f"expected one of {list(POOLINGS)}, got {pooling!r}")
            kw["pooling"] = pooling
            vocab = raw.get("vocab")
            if vocab is not None and not isinstance(vocab, str):
                raise err(f"{key}.vocab", "expected a path string")
            kw["vocab"] = vocab
            if "collision" in raw:
                if kind == SEQUENCE:
                    raise err(
                        f"{key}.collision",
                        "not for sequence features (managed tables are pooled, "
                        "EmbeddingBagCollection only)",
                    )
                coll = _parse_collision(raw["collision"], key, kw["num_buckets"], err)
                if coll is not None:
                    if vocab is not None:
                        raise err(
                            f"{key}.collision",
                            "a vocabulary already gives every value its own row; managed "
                            "collision is for hashed (open) id spaces",
                        )
                    kw["collision"] = coll
                    kw["num_buckets"] = coll.id_space  # what the data pipeline hashes into
        return FeatureSpec(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (round-trips through ``from_dict``); stored in artifact manifests."""
        feats = []
        defaults = FeatureSpec(name="", kind=DENSE, group="")
        for f in self.features:
            d: dict[str, Any] = {"name": f.name, "kind": f.kind, "group": f.group}
            if f.column != f.name:
                d["column"] = f.column
            if f.is_sequence:
                del d["group"]
            keys = (
                ("transform", "fill", "clip")
                if f.kind == DENSE
                else ("num_buckets", "dim", "table", "pooling", "vocab")
            )
            if f.is_sequence:
                keys = (*keys, "max_length", "target", "side_of")
            for k in keys:
                v = getattr(f, k)
                if k == "table" and v == f.name:
                    continue
                if k == "pooling" and f.is_sequence:
                    if v != "mean":
                        d[k] = v
                    continue
                if k == "max_length":
                    d[k] = v
                    continue
                if k == "num_buckets":
                    v = f.table_rows
                if k in ("num_buckets", "dim") or v != getattr(defaults, k):
                    d[k] = list(v) if isinstance(v, tuple) else v
            if f.collision is not None:
                d["collision"] = f.collision.to_dict()
            feats.append(d)
        return {
            "name": self.name,
            "hash_seed": self.hash_seed,
            "max_list_length": self.max_list_length,
            "tasks": [{"name": t.name, "label": t.label} for t in self.tasks],
            "groups": list(self.groups),
            "features": feats,
        }

    # ----------------------------------------------------------------- derived views
    @property
    def sparse_features(self) -> tuple[FeatureSpec, ...]:
        """Sparse features in schema order; this is the key order of ``Batch.sparse``."""
        return tuple(f for f in self.features if f.is_sparse)

    @property
    def dense_features(self) -> tuple[FeatureSpec, ...]:
        """Dense features in schema order; this is the column order of ``Batch.dense``."""
        return tuple(f for f in self.features if f.kind == DENSE)

    @property
    def sparse_keys(self) -> list[str]:
        """Keys of ``Batch.sparse``: the categorical and id_list features (not sequences)."""
        return [f.name for f in self.sparse_features if not f.is_sequence]

    @property
    def sequence_features(self) -> tuple[FeatureSpec, ...]:
        """The main sequences (not side sequences), in schema order: one encoder each."""
        return tuple(f for f in self.features if f.is_sequence and not f.side_of)

    def side_sequences(self, name: str) -> tuple[FeatureSpec, ...]:
        """The side sequences aligned with the main sequence ``name``."""
        return tuple(f for f in self.features if f.is_sequence and f.side_of == name)

    @property
    def sequence_keys(self) -> list[str]:
        """Keys of ``Batch.sequences``: every sequence feature, side sequences included."""
        return [f.name for f in self.features if f.is_sequence]

    @property
    def sequence_tables(self) -> tuple[str, ...]:
        """Tables read by a sequence (held unpooled, in an ``EmbeddingCollection``)."""
        return tuple(dict.fromkeys(f.table for f in self.features if f.is_sequence))

    @property
    def num_dense(self) -> int:
        return len(self.dense_features)

    @property
    def label_columns(self) -> list[str]:
        return [t.label for t in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def columns(self) -> list[str]:
        """Source columns a data file must have (features, then labels)."""
        return list(dict.fromkeys([f.column for f in self.features] + self.label_columns))

    @property
    def tables(self) -> tuple[TableSpec, ...]:
        """Embedding tables in first-use order; features sharing a table must agree."""
        by_name: dict[str, list[FeatureSpec]] = {}
        for f in self.sparse_features:
            by_name.setdefault(f.table, []).append(f)
        out = []
        for tname, feats in by_name.items():
            first = feats[0]
            # a categorical has one id per row, so its pooling is moot: the table's is that of
            # its id_list or sequence features
            pooled = [f for f in feats if f.kind != CATEGORICAL] or feats
            for f in feats[1:]:
                for k in ("num_buckets", "dim", "pooling", "vocab", "collision"):
                    ref = pooled[0] if k == "pooling" else first
                    if k == "pooling" and f.kind == CATEGORICAL:
                        continue
                    if getattr(f, k) != getattr(ref, k):
                        raise SchemaError(
                            f"{self.source}: features[{f.name}].{k}: table {tname!r} is shared "
                            f"with {ref.name!r}, which has {k}={getattr(ref, k)!r}"
                        )
            out.append(
                TableSpec(
                    tname,
                    first.table_rows,
                    first.dim,
                    pooled[0].pooling,
                    tuple(f.name for f in feats),
                    first.collision,
                )
            )
            if first.collision is not None and tname in self.sequence_tables:
                raise SchemaError(
                    f"{self.source}: features[{first.name}].collision: table {tname!r} is read "
                    "by a sequence; managed collision is for pooled tables only"
                )
        return tuple(out)

    @property
    def managed_tables(self) -> tuple[TableSpec, ...]:
        """Tables with a managed ``collision`` (TorchRec MCH), in ``tables`` order."""
        return tuple(t for t in self.tables if t.collision is not None)

    def features_in_group(self, group: str) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self.features if f.group == group)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def embedding_bag_configs(self, init_scale: float = 0.0, exclude: tuple[str, ...] = ()):
        """TorchRec ``EmbeddingBagConfig`` list, one per table (but the tables in ``exclude``).

        ``init_scale`` > 0 initialises every table uniformly in ``[-init_scale, init_scale]``
        (the config's ``weight_init_min/max``, which TorchRec's sharded kernels use too);
        0 keeps TorchRec's default, ``U(-sqrt(1/rows), sqrt(1/rows))``.
        """
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        return [
            EmbeddingBagConfig(
                pooling=PoolingType.MEAN if t.pooling == "mean" else PoolingType.SUM,
                **_table_kwargs(t, init_scale),
            )
            for t in self.tables
            if t.name not in exclude
        ]

    def embedding_configs(self, tables: tuple[str, ...], init_scale: float = 0.0):
        """TorchRec ``EmbeddingConfig`` list (unpooled, for an ``EmbeddingCollection``) of the
        named tables, initialised as ``embedding_bag_configs`` does."""
        from torchrec.modules.embedding_configs import EmbeddingConfig

        return [
            EmbeddingConfig(**_table_kwargs(t, init_scale)) for t in self.tables if t.name in tables
        ]


def _table_kwargs(t: TableSpec, init_scale: float) -> dict:
    """The TorchRec table config's arguments common to pooled and unpooled tables."""
    kw = {
        "name": t.name,
        "embedding_dim": t.dim,
        "num_embeddings": t.num_buckets,
        "feature_names": list(t.feature_names),
    }
    if init_scale > 0:
        kw.update(weight_init_min=-init_scale, weight_init_max=init_scale)
    return kw


def _resolve_sequences(features: list[FeatureSpec], raw: list, err) -> list[FeatureSpec]:
    """Sequence features completed and checked against the others: a shared ``table`` must be
    another (categorical or id_list) feature's, whose ``num_buckets`` and ``dim`` it takes;
    ``target`` must be a categorical feature of the same table (default: the first one, if
    any); ``side_of`` must name a main sequence, with the same ``dim`` and ``max_length``."""
    by_name = {f.name: f for f in features}
    out = []
    for f in features:
        if not f.is_sequence:
            out.append(f)
            continue
        key = f"features[{f.name}]"
        kw: dict[str, Any] = {}
        if f.table != f.name:
            owners = [g for g in features if g.table == f.table and not g.is_sequence]
            if not owners:
                raise err(
                    f"{key}.table",
                    f"unknown table {f.table!r}: no categorical or id_list feature has it (a "
                    "sequence shares the table of the candidate's feature, e.g. table: item)",
                )
            if not f.num_buckets:
                kw["num_buckets"] = owners[0].num_buckets
            if not f.dim:
                kw["dim"] = owners[0].dim
            if f.vocab is None and owners[0].vocab is not None:
                kw["vocab"] = owners[0].vocab
        if f.side_of:
            main = by_name.get(f.side_of)
            if main is None or not main.is_sequence or main.side_of:
                raise err(
                    f"{key}.side_of", f"{f.side_of!r} is not a main sequence feature of the schema"
                )
            if f.target:
                raise err(f"{key}.target", "a side sequence has no target (its main one has)")
            if "max_length" in _raw_of(raw, f.name) and f.max_length != main.max_length:
                raise err(f"{key}.max_length", f"must equal {main.name!r}'s {main.max_length}")
            kw["max_length"] = main.max_length
        else:
            cands = [g for g in features if g.table == f.table and g.kind == CATEGORICAL]
            if f.target:
                t = by_name.get(f.target)
                if t is None or t.kind != CATEGORICAL or t.table != f.table:
                    raise err(
                        f"{key}.target",
                        f"{f.target!r} is not a categorical feature of table {f.table!r} (the "
                        "target's embedding is the query over the sequence, so they share one "
                        "table)",
                    )
            elif cands:
                kw["target"] = cands[0].name
        out.append(dataclasses.replace(f, **kw) if kw else f)
    # side sequences' dims against their main one's (resolved: it may come from a shared table)
    resolved = {f.name: f for f in out}
    for f in out:
        if f.is_sequence and f.side_of and f.dim != resolved[f.side_of].dim:
            raise err(
                f"features[{f.name}].dim",
                f"{f.dim} differs from {f.side_of!r}'s {resolved[f.side_of].dim}: side "
                "embeddings are added position by position",
            )
    return out


def _raw_of(raw: list, name: str) -> dict:
    for r in raw:
        if isinstance(r, dict) and r.get("name") == name:
            return r
    return {}


@dataclass
class Batch:
    """One model input batch.

    Attributes:
        dense: ``[B, Nd]`` float32, columns in ``schema.dense_features`` order (Nd may be 0).
        sparse: ``KeyedJaggedTensor`` with keys ``schema.sparse_keys``, values int64 bucket ids.
        labels: ``[B, n_tasks]`` float32 in ``schema.tasks`` order (zeros when serving).
        sequences: ``KeyedJaggedTensor`` with keys ``schema.sequence_keys`` and S rows, or None
            when the schema has no sequence; S = B (row b's history is row b) unless ``seq_of``.
        seq_of: ``[B]`` int64, the sequence row of each row (serving: the candidates of one
            request share one history, looked up and projected once), or None (identity).
        bad_rows: rows dropped from this batch as bad, per cause (``data.on_bad_rows: skip``).
        bad_examples: the first message of each cause of bad rows the reader met so far.
    """

    dense: Any  # torch.Tensor
    sparse: Any  # torchrec.sparse.jagged_tensor.KeyedJaggedTensor
    labels: Any  # torch.Tensor
    bad_rows: dict[str, int] = field(default_factory=dict)
    bad_examples: dict[str, str] = field(default_factory=dict)
    sequences: Any = None  # KeyedJaggedTensor | None
    seq_of: Any = None  # torch.Tensor | None

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device, non_blocking: bool = False) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.bad_rows,
            self.bad_examples,
            move(self.sequences),
            move(self.seq_of),
        )

    def pin_memory(self) -> Batch:
        def pin(t):
            return None if t is None else t.pin_memory()

        return Batch(
            self.dense.pin_memory(),
            self.sparse.pin_memory(),
            self.labels.pin_memory(),
            self.bad_rows,
            self.bad_examples,
            pin(self.sequences),
            pin(self.seq_of),
        )

    def aligned_sequences(self):
        """``Batch.sequences`` with one row per batch row (``seq_of`` applied), or None."""
        if self.sequences is None or self.seq_of is None:
            return self.sequences
        return expand_rows(self.sequences, self.seq_of)


def expand_rows(kjt, seq_of):
    """A ``KeyedJaggedTensor`` of S rows -> B rows, row b a copy of row ``seq_of[b]``
    (every key)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values, lengths = [], []
    for key in kjt.keys():  # noqa: SIM118 - a KeyedJaggedTensor, not a dict
        jt = kjt[key]
        off, ln = jt.offsets(), jt.lengths()
        n = ln[seq_of]
        starts = torch.repeat_interleave(off[:-1][seq_of], n)
        within = torch.arange(int(n.sum()), device=n.device) - torch.repeat_interleave(
            torch.cumsum(n, 0) - n, n
        )
        values.append(jt.values()[starts + within])
        lengths.append(n)
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=torch.cat(values) if values else kjt.values()[:0],
        lengths=torch.cat(lengths) if lengths else kjt.lengths()[:0],
        stride=int(seq_of.numel()),
    )


# ---------------------------------------------------------------------------- presets and rows
PRESETS = ("frappe", "movielens", "criteo")


def schema_dirs() -> list[Path]:
    """Where preset schemas are looked for, in order: ``$MIXRANK_SCHEMA_DIR``, then
    ``configs/schemas`` at the repository root above this package."""
    dirs = []
    if os.environ.get("MIXRANK_SCHEMA_DIR"):
        dirs.append(Path(os.environ["MIXRANK_SCHEMA_DIR"]))
    dirs.append(Path(__file__).resolve().parents[1] / "configs" / "schemas")
    return dirs


def load_schema(name_or_path: str | Path, relative_to: str | Path | None = None) -> FeatureSchema:
    """A schema from a YAML path, or a preset name (``frappe``, ``movielens``, ``criteo``, or
    any ``<name>.yaml`` in ``schema_dirs()``). A relative path is tried against the working
    directory, then next to ``relative_to`` (the experiment YAML that names it)."""
    if relative_to is not None and not Path(name_or_path).is_absolute():
        beside = Path(relative_to).parent / name_or_path
        if beside.is_file() and not Path(name_or_path).is_file():
            return FeatureSchema.from_yaml(beside)
    p = Path(name_or_path)
    # A path only if it looks like one: a folder named "frappe" in the working directory must
    # not shadow the preset.
    if p.suffix in (".yaml", ".yml") or p.is_file() or os.sep in str(name_or_path):
        return FeatureSchema.from_yaml(p)
    for d in schema_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.exists():
            return FeatureSchema.from_yaml(cand)
    searched = ", ".join(str(d) for d in schema_dirs())
    raise SchemaError(
        f"{name_or_path}: not a schema file and not a preset (presets: {', '.join(PRESETS)}; "
        f"searched {searched}; set MIXRANK_SCHEMA_DIR to the folder holding the YAML files)"
    )
