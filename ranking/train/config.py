"""Experiment configuration: one YAML with ``name``, ``schema``, ``model``, ``data`` and ``train``.

::

    name: frappe_rankmixer
    schema: frappe                      # preset name or path to a schema YAML
    model: {arch: rankmixer, ...}       # architecture: ranking/model/config.py, docs/MODELS.md
    data:
      train: ../shared/data/frappe/train.parquet
      valid: ../shared/data/frappe/valid.parquet
      batch_size: 1024                  # per rank
    train:
      epochs: 3
      dense_optimizer: adamw
      lr: 0.001
      compute_dtype: fp32               # bf16: autocast the forward in training
    inference:                          # how the exported artifact runs (ranking/inference.py)
      micro_batch: 256

``key=value`` overrides on the command line use dotted paths (``train.lr=0.01``,
``model.num_layers=4``); values are parsed as YAML scalars. Every key is validated before any
process is spawned, and errors name the file and the key.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ranking.model.config import ConfigError, section_from_dict  # one error type, one parser

__all__ = ["ConfigError", "DataConfig", "ExperimentConfig", "TrainConfig", "load_experiment"]


SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
DENSE_OPTIMIZERS = ("adamw", "adagrad", "rmsprop", "adam")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")  # fused CPU kernels
SCHEDULES = ("constant", "linear", "cosine")
SELECT_METRICS = ("auc", "logloss")


@dataclass
class DataConfig:
    """Where the data is and how it is batched (``batch_size`` is per rank)."""

    train: str = ""
    valid: str = ""
    # When `train` is a directory of dt=YYYY-MM-DD partitions (Hive style): the first and last
    # day read (inclusive; either may be left out). `valid` is read whole: point it at the
    # held-out day(s), e.g. <dir>/dt=2024-05-08.
    since: str = ""
    until: str = ""
    batch_size: int = 1024
    eval_batch_size: int = 8192
    shuffle: bool = True
    num_workers: int = 0
    # Build per-field vocabularies from `train` when the run starts (into <run>/vocab/, as
    # `mixrank data vocab` does) and use them instead of the schema's hash buckets: no two
    # training values share an embedding row; values unseen in train share the OOV row.
    vocab_from_train: bool = False
    vocab_min_count: int = 1
    # Rows whose values only the data shows to be bad (a label that is null or not 0/1, an
    # infinite dense value, a string that is not UTF-8, an id list over max_list_items):
    # `fail` stops the job at the first one, naming file, row group, row and column; `skip`
    # drops them, counts them per cause (logged, and in summary.json), and fails once a rank's
    # bad rows in an epoch pass max_bad_fraction of the rows it reads in that epoch.
    on_bad_rows: str = "fail"
    max_bad_fraction: float = 0.001
    # The longest id list a row may hold (the serving limit `max_list_items` has the same
    # default); lists are truncated to the schema's max_list_length either way.
    max_list_items: int = 1024
    # Per rank: keep the train and valid rows read and converted (ids, lengths, dense values,
    # labels) in memory up to this many MiB, so that later epochs and evaluations skip the
    # Parquet read and the hashing (the batches are the same either way). 0: off. Only with
    # num_workers 0 (loader workers are processes of their own).
    cache_mb: int = 1024


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing and logging."""

    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # 0: run `epochs` epochs
    dense_optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # RMSProp
    warmup_steps: int = 0
    schedule: str = "constant"  # decay after warm-up
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0: off; clips the dense parameters' global norm
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.01
    # Decay of the embedding tables only. Data-parallel tables: a parameter group of the dense
    # optimiser (decoupled with adamw, coupled L2 with adam/adagrad/rmsprop), the other dense
    # parameters keep `weight_decay`. Fused tables: FBGEMM's DECOUPLE mode, CUDA kernels only
    # (the CPU kernels ignore it, so the trainer refuses it on CPU).
    embedding_weight_decay: float = 0.0
    # L2 penalty on the looked-up (pooled) embeddings, added to the loss:
    # embedding_l2 * mean over the batch of the squared norm of every feature's embedding.
    # Works with every sharding type and optimiser (fused tables included): the rows of the
    # batch shrink in proportion to how often they occur.
    embedding_l2: float = 0.0
    embedding_eps: float = 1e-8
    eval_every: int = 0  # steps; 0: only at the end of each epoch
    # Model selection on the validation set: export (and report) the evaluation with the best
    # `select_metric` instead of the last one; stop after `early_stopping_patience` evaluations
    # without improvement (0: never stop early).
    select_best: bool = False
    select_metric: str = "auc"  # auc (higher is better) or logloss (lower is better)
    early_stopping_patience: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 20
    prometheus_port: int = 0  # 0: off; rank 0 exports training metrics here
    # table -> sharding type; the key "*" sets the type of every table not named
    sharding: dict[str, str] = field(default_factory=dict)
    threads: int = 0  # torch threads per rank; 0: cores / local world size
    # Mixed precision of the forward in training and evaluation: bf16 autocasts it (the
    # weights and the optimiser stay fp32). Inference picks its own dtype (export --dtype).
    compute_dtype: str = "fp32"
    # task name -> weight of its mean BCE in the loss (missing tasks: 1); the loss is
    # sum_t w_t BCE_t / n_tasks, so all-1 weights give the mean BCE
    task_weights: dict[str, float] = field(default_factory=dict)
    # Start from a parent model instead of a fresh init: an exported artifact directory, or a
    # training checkpoint (its optimiser state too when the model matches); ``mixrank train
    # --warm-start PATH`` sets it. See ranking/train/warm_start.py.
    warm_start: str = ""


@dataclass
class ExperimentConfig:
    name: str
    schema: Any  # FeatureSchema
    model: Any  # ModelConfig
    data: DataConfig
    train: TrainConfig
    inference: Any  # ranking.inference.InferenceConfig: runtime choices the artifact serves with
    raw: dict  # the resolved YAML (with overrides applied), written to the run directory
    source: str = "<dict>"


_TOP = {"name", "schema", "model", "data", "train", "inference"}


def _set_dotted(d: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: override {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str], source: str = "<cli>") -> dict:
    """Apply ``key=value`` overrides (dotted keys, YAML-parsed values) to a raw config dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value (e.g. train.lr=0.01)")
        key, _, value = ov.partition("=")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed, source)
    return raw


def _choice(value: str, choices: tuple, key: str, source: str) -> None:
    if value not in choices:
        raise ConfigError(f"{source}: {key}: expected one of {list(choices)}, got {value!r}")


def sharding_type(sharding: dict[str, str], table: str) -> str | None:
    """The forced sharding type of ``table`` (``"*"`` covers tables not named), or None."""
    return sharding.get(table, sharding.get("*"))


def _all_data_parallel(sharding: dict[str, str], tables: set[str]) -> bool:
    return all(sharding_type(sharding, t) == "data_parallel" for t in tables)


def _check_path(path: str, key: str, source: str) -> None:
    if not path:
        return
    p = Path(path)
    if not (p.exists() or glob.glob(path)):
        raise ConfigError(f"{source}: {key}: no file or directory matches {path!r}")


def _dates_as_text(raw: dict) -> None:
    """YAML reads an unquoted ``2024-05-01`` as a date: keep ``data.since``/``until`` as the
    text the user wrote (also in the run's config.yaml)."""
    import datetime as dt

    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("since", "until"):
            if isinstance(data.get(k), dt.date):
                data[k] = data[k].isoformat()


def _check_dates(data: DataConfig, source: str) -> None:
    from ranking.data.reader import parse_date

    for k in ("since", "until"):
        value = getattr(data, k)
        if value and parse_date(value) is None:
            raise ConfigError(f"{source}: data.{k}: expected a date YYYY-MM-DD, got {value!r}")
    if data.since and data.until and data.since > data.until:
        raise ConfigError(f"{source}: data.since: {data.since} is after data.until: {data.until}")


def _check_partitions(data: DataConfig, source: str) -> None:
    """``data.since``/``until`` must select some ``dt=`` partition of ``data.train``."""
    from ranking.data.errors import DataError
    from ranking.data.reader import select_partitions

    if not (data.since or data.until):
        return
    key = "data.since" if data.since else "data.until"
    try:
        select_partitions(data.train, data.since, data.until)
    except DataError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None


def load_experiment(
    path_or_dict: str | Path | dict,
    overrides: list[str] | None = None,
    *,
    require_data: bool = True,
) -> ExperimentConfig:
    """Load, override and validate an experiment config. Raises ``ConfigError``."""
    from ranking.features import SchemaError
    from ranking.model.config import ModelConfig

    if isinstance(path_or_dict, dict):
        raw, source = dict(path_or_dict), "<dict>"
    else:
        source = str(path_or_dict)
        try:
            raw = yaml.safe_load(Path(path_or_dict).read_text())
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [], source)
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}: unknown key (expected {sorted(_TOP)})")
    name = raw.get("name") or (Path(source).stem if source != "<dict>" else "experiment")

    from ranking.features import load_schema

    if "schema" not in raw:
        raise ConfigError(f"{source}: schema: required (a preset name or a schema YAML path)")
    try:
        schema = load_schema(raw["schema"], relative_to=None if source == "<dict>" else source)
    except (SchemaError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{source}: schema: {e}") from e

    from ranking.inference import InferenceConfig

    model = ModelConfig.from_dict(raw.get("model") or {}, source=source)
    inference = InferenceConfig.from_dict(raw.get("inference"), source)

    _dates_as_text(raw)
    data = section_from_dict(DataConfig, raw.get("data"), "data", source)
    train = section_from_dict(TrainConfig, raw.get("train"), "train", source)
    _choice(train.dense_optimizer, DENSE_OPTIMIZERS, "train.dense_optimizer", source)
    _choice(train.embedding_optimizer, EMBEDDING_OPTIMIZERS, "train.embedding_optimizer", source)
    _choice(train.schedule, SCHEDULES, "train.schedule", source)
    _choice(train.compute_dtype, ("fp32", "bf16"), "train.compute_dtype", source)
    if not isinstance(train.sharding, dict):
        raise ConfigError(f"{source}: train.sharding: expected a mapping table -> sharding type")
    tables = {t.name for t in schema.tables}
    _choice(train.select_metric, SELECT_METRICS, "train.select_metric", source)
    for key in (
        "embedding_weight_decay",
        "embedding_l2",
        "weight_decay",
        "early_stopping_patience",
    ):
        if getattr(train, key) < 0:
            raise ConfigError(f"{source}: train.{key}: must be >= 0")
    if train.early_stopping_patience and not train.select_best:
        raise ConfigError(
            f"{source}: train.early_stopping_patience: needs train.select_best: true (early "
            f"stopping keeps the best evaluation)"
        )
    if train.select_best and not data.valid:
        raise ConfigError(f"{source}: train.select_best: needs data.valid (selection is on valid)")
    for table, st in train.sharding.items():
        if table != "*" and table not in tables:
            raise ConfigError(
                f"{source}: train.sharding.{table}: no such embedding table (tables: {sorted(tables)})"
            )
        _choice(st, SHARDING_TYPES, f"train.sharding.{table}", source)
    _choice(data.on_bad_rows, ("fail", "skip"), "data.on_bad_rows", source)
    if not 0 <= data.max_bad_fraction < 1:
        raise ConfigError(
            f"{source}: data.max_bad_fraction: expected a fraction in [0, 1), got "
            f"{data.max_bad_fraction!r}"
        )
    for k in ("batch_size", "eval_batch_size", "vocab_min_count", "max_list_items"):
        if getattr(data, k) < 1:
            raise ConfigError(f"{source}: data.{k}: must be positive")
    if data.cache_mb < 0:
        raise ConfigError(f"{source}: data.cache_mb: must be >= 0 (0 turns the cache off)")
    if not isinstance(train.task_weights, dict):
        raise ConfigError(f"{source}: train.task_weights: expected a mapping task -> weight")
    for task, w in train.task_weights.items():
        if task not in schema.task_names:
            raise ConfigError(
                f"{source}: train.task_weights.{task}: no such task (tasks: {schema.task_names})"
            )
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ConfigError(f"{source}: train.task_weights.{task}: expected a weight >= 0")
    if train.epochs < 1 and train.max_steps < 1:
        raise ConfigError(f"{source}: train.epochs: must be positive (or set train.max_steps)")
    _check_dates(data, source)
    if require_data:
        if not data.train:
            raise ConfigError(f"{source}: data.train: required, a Parquet file, directory or glob")
        _check_path(data.train, "data.train", source)
        _check_path(data.valid, "data.valid", source)
        _check_partitions(data, source)
    if train.embedding_weight_decay and not _all_data_parallel(train.sharding, tables):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"{source}: train.embedding_weight_decay: FBGEMM's fused CPU kernels ignore weight "
                f"decay; on CPU force the tables data_parallel (train.sharding: {{'*': "
                f"data_parallel}}) so that the dense optimiser decays them"
            )
    return ExperimentConfig(
        name=name,
        schema=schema,
        model=model,
        data=data,
        train=train,
        inference=inference,
        raw=raw,
        source=source,
    )
