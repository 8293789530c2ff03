"""The serving artifact: a directory with ``manifest.json`` and ``weights.pt``.

``manifest.json``::

    {"format_version": 1, "model_version": "<sha256 of weights + manifest body less the
     run's paths (data files, schema file): 16 hex>",
     "name": ..., "arch": ..., "config": {<resolved experiment config>},
     "schema": {<FeatureSchema.to_dict()>}, "metrics": {<validation metrics at export>},
     "dtype": "fp32"|"bf16"|"int8"|"fp8", "table_dtype": "fp32"|"int8"|"int4", "step": N, "created": "<UTC ISO time>", "weights": "weights.pt",
     "parent_model_version": "<the warm start's model_version>" | null (trained from scratch),
     "parent": {"path", "kind": "artifact"|"checkpoint", "step", "model_version"} | null,
     "data": {"train", "since", "until", "partitions": ["YYYY-MM-DD", ...], "files", "rows",
              "rows_read", "valid"} | null (a checkpoint written before lineage was recorded)}

The lineage (``parent_model_version``, ``parent``, ``data``) is recorded, not hashed, like
``created``: ``model_version`` stays the hash of what the model is (weights, config, schema),
and the warm-start path, like the data paths, is left out of the hashed config.

``weights.pt`` is a plain ``state_dict`` of the unsharded model, loaded with
``torch.load(weights_only=True)``: loading an artifact never executes code from it. With
``table_dtype`` int8 / int4 (``mixrank export --table-dtype``) its embedding tables are FBGEMM's
fused row-wise rows (uint8: codes plus an fp16 scale and bias per row, ``ranking.quant_tables``),
served by TorchRec's quantized embedding modules; the other weights are as ``dtype`` says. An
artifact without ``table_dtype`` (written before it existed) has fp32 tables; ``table_dtype``
enters ``model_version`` only when it is not fp32, so fp32 artifacts keep their versions. An artifact
is written into a temporary sibling directory and renamed into place, so a reader never sees a
half-written one; an existing artifact at the same path is swapped out atomically (Linux
``renameat2``), so a reader never finds the path missing either.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

FORMAT_VERSION = 1
WEIGHTS = "weights.pt"
MANIFEST = "manifest.json"
# the dense weights' storage dtype for each serving dtype: an int8 / fp8 artifact holds fp32
# weights and serves the mixer blocks' GEMMs (a baseline's linear layers) quantized at load
# (``optimize_for_inference(dtype="int8" | "fp8")``: per output channel, deterministic)
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.float32,
    "fp8": torch.float32,
}
TABLE_DTYPES = ("fp32", "int8", "int4")  # ranking.quant_tables.TABLE_DTYPES


class ArtifactError(ValueError):
    """An artifact directory is unusable; the message names the file and the key."""


@dataclass
class Artifact:
    model: torch.nn.Module
    schema: Any  # FeatureSchema
    manifest: dict
    path: Path
    dtype: str = "fp32"  # the dtype the forward runs in (see ``predict``)
    device: str = "cpu"  # where the model and the forward run (``load_artifact(device=)``)
    _fast: Any = field(default=None, repr=False, compare=False)

    @property
    def inference(self):
        """The manifest's runtime choices (``inference:``; defaults where absent)."""
        from ranking.inference import InferenceConfig

        section = (self.manifest.get("config") or {}).get("inference")
        return InferenceConfig.from_dict(section, source=str(self.path / MANIFEST))

    def lowered(self) -> torch.nn.Module:
        """``optimize_for_inference(model, dtype=self.dtype, **inference options)``, made on
        first use and kept (made again when ``dtype`` changes); the loaded model is kept as
        it is."""
        from ranking.inference import optimize_for_inference

        if self._fast is None or self._fast[0] != self.dtype:  # (made for dtype, model)
            fast = optimize_for_inference(
                self.model, dtype=self.dtype, device=self.device, **self.inference.options()
            )
            self._fast = (self.dtype, fast)
        return self._fast[1]

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        """``[B, n_tasks]`` probabilities for a ``Batch`` (on the CPU; moved to the artifact's
        device for the forward), from the lowered model; on the CPU."""
        if self.device != "cpu":
            batch = batch.to(self.device, non_blocking=True)
        return torch.sigmoid(self.lowered()(batch).logits.float()).cpu()

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]


def _build(config: dict, schema_d: dict, source: str, device: str | None = None):
    """The manifest's model and schema; ``device="meta"`` builds the embedding tables without
    allocating or initialising them (the loader assigns the artifact's tensors to them)."""
    from ranking.features import FeatureSchema
    from ranking.model.config import ModelConfig, migrate_experiment
    from ranking.model.ranker import build_model

    config = migrate_experiment(config)
    schema = FeatureSchema.from_dict(schema_d, source=f"{source}: schema")
    model_cfg = ModelConfig.from_dict(config.get("model") or {}, source=source)
    return build_model(model_cfg, schema, device=device), schema


def schema_dict(schema) -> dict:
    """``schema.to_dict()`` with vocabulary paths made absolute (resolved against the schema
    file), so the dict can be rebuilt anywhere: it is what checkpoints record."""
    from ranking.data.convert import resolve_vocab_path

    d = schema.to_dict()
    for fd, f in zip(d["features"], schema.features):
        if f.is_sparse and f.vocab:
            fd["vocab"] = str(resolve_vocab_path(schema, f).resolve())
    return d


def _bundle_vocabs(schema_d: dict, out_dir: Path, h) -> dict:
    """Copy every vocabulary file into ``out_dir/vocab/`` and point the schema at the copies
    (relative to the manifest); the copies' bytes go into the content hash. Features that
    share a file (the features of one table) share its copy."""
    d = json.loads(json.dumps(schema_d))
    copied: dict[str, str] = {}
    for fd in d["features"]:
        src = fd.get("vocab")
        if not src:
            continue
        if src in copied:
            fd["vocab"] = copied[src]
            continue
        dst = out_dir / "vocab" / f"{fd['name']}.txt"
        dst.parent.mkdir(exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            raise ArtifactError(f"features[{fd['name']}].vocab: cannot copy {src}: {e}") from e
        h.update(dst.read_bytes())
        fd["vocab"] = copied[src] = f"vocab/{fd['name']}.txt"
    return d


def _check_dtypes(dtype: str, table_dtype: str) -> None:
    if dtype not in DTYPES:
        raise ArtifactError(f"--dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if table_dtype not in TABLE_DTYPES:
        raise ArtifactError(
            f"--table-dtype: expected one of {list(TABLE_DTYPES)}, got {table_dtype!r}"
        )


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, dtype: str = "fp32", table_dtype: str = "fp32"
) -> Path:
    """Turn a complete training checkpoint into a serving artifact at ``out``: dense weights in
    ``dtype``, embedding tables in ``table_dtype`` (row-wise int8 / int4: ``ranking.quant_tables``).
    The tables go from the checkpoint into the artifact's file without being held in memory
    (``ranking.export_stream``).
    """
    from ranking.train import checkpoint as ckpt

    checkpoint = Path(checkpoint)
    _check_dtypes(dtype, table_dtype)
    if not (checkpoint / ckpt.MARKER).is_file():
        raise ArtifactError(f"{checkpoint}: not a complete checkpoint (no {ckpt.MARKER} marker)")
    marker = ckpt.read_marker(checkpoint)
    config = marker.get("config")
    if config is None:
        cfg_file = checkpoint / "config.yaml"
        if not cfg_file.is_file():
            raise ArtifactError(f"{checkpoint}: no config in {ckpt.MARKER} and no config.yaml")
        config = yaml.safe_load(cfg_file.read_text())
    from ranking.model.config import migrate_experiment

    config = migrate_experiment(config)  # a checkpoint from before the runtime split
    sd = marker.get("schema")
    if sd is None:  # a checkpoint from before the schema was recorded: re-resolve
        from ranking.features import load_schema

        sd = schema_dict(load_schema(config["schema"]))
    model, schema = _build(config, sd, str(checkpoint), device="meta")
    from ranking.export_stream import read_model_state
    from ranking.quant_tables import table_keys

    tables = table_keys(model)
    try:  # the dense weights (small), in place; the tables are read as they are written
        read_model_state(
            checkpoint, {k: v for k, v in model.state_dict().items() if k not in tables}
        )
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    return _stream_export(
        model,
        schema,
        out,
        read_into=lambda key, dst: read_model_state(checkpoint, {key: dst}),
        config=config,
        dtype=dtype,
        table_dtype=table_dtype,
        metrics=marker.get("metrics") or {},
        step=int(marker.get("step", 0)),
        lineage=marker.get("lineage"),
        source=str(checkpoint),
    )


def _stream_export(
    model, schema, out, *, read_into=None, config: dict, dtype: str, table_dtype: str,
    source: str, **kw,
) -> Path:  # fmt: skip
    """Both exports' writer. ``model``'s dense weights are loaded; its tables are read as the
    file is written (``ranking.export_stream.write_weights``: into the artifact's mapped
    ``weights.pt``, no table-sized buffer): by ``read_into(key, dst)`` (a checkpoint: the
    model was built with its tables on the meta device) or, without it, from the model's own
    (mapped) tables. The lowering check runs on the written artifact as ``load_artifact``
    serves it, before it is published."""
    from ranking.export_stream import write_weights

    def weights(path: Path) -> None:
        try:
            write_weights(path, model, DTYPES[dtype], table_dtype, read_into=read_into)
        except (ValueError, OSError) as e:  # a checkpoint without a key; a full disk
            raise ArtifactError(f"{out}: cannot write the weights: {e}") from None

    def verify(tmp: Path) -> None:
        art = load_artifact(tmp)
        check_lowering(art.model, art.schema, dtype, config, source)

    return write_artifact(
        out,
        weights,
        config=config,
        schema=schema,
        dtype=dtype,
        table_dtype=table_dtype,
        verify=verify,
        **kw,
    )


def export_artifact(
    src: str | Path, out: str | Path, dtype: str | None = None, table_dtype: str = "fp32"
) -> Path:
    """Re-export the artifact ``src`` to ``out`` with dense weights in ``dtype`` (default: the
    source's) and tables in ``table_dtype``: quantizes an fp32-table artifact's tables. A
    quantized artifact's tables are kept as they are (same ``table_dtype``) or refused (another
    one: their fp32 values are gone; re-export from the fp32 artifact or the checkpoint). The
    source's metrics, step and lineage are kept; ``exported_from`` records the source."""
    src = Path(src)
    art = load_artifact(src, dtype="fp32")
    dtype = dtype or art.manifest["dtype"]
    _check_dtypes(dtype, table_dtype)
    src_tables = art.manifest.get("table_dtype", "fp32")
    if src_tables != "fp32" and src_tables != table_dtype:
        raise ArtifactError(
            f"{src / MANIFEST}: table_dtype: the source's tables are {src_tables} and cannot "
            f"become {table_dtype} (their fp32 values are gone): re-export from the fp32 "
            f"artifact or from the training checkpoint"
        )
    m = art.manifest
    lineage = {k: m.get(k) for k in ("parent_model_version", "parent", "data")}
    extra = {"exported_from": {"artifact": str(src.resolve()), "model_version": m["model_version"]}}
    return _stream_export(
        art.model,
        art.schema,
        out,
        config=m["config"],
        dtype=dtype,
        table_dtype=table_dtype,
        metrics=m.get("metrics") or {},
        step=int(m.get("step", 0)),
        lineage=lineage,
        source=str(src),
        extra=extra,
    )


# How far the lowered model's logits may be from the eager model's (torch.allclose terms): fp32
# differs only by float rounding; bf16 by the tolerance the bf16 tests use; int8 (8-bit
# activations per row, 7- or 8-bit weights per channel) by twice that; fp8 (e4m3: 3 mantissa
# bits, rows and columns scaled) by three times.
LOWERING_TOLERANCE = {
    "fp32": (1e-4, 1e-4),
    "bf16": (0.1, 0.05),
    "int8": (0.2, 0.1),
    "fp8": (0.3, 0.15),
}


def check_lowering(model, schema, dtype: str, config: dict, source: str, rows: int = 64) -> float:
    """Export's train/serve check: ``optimize_for_inference`` (with the config's ``inference:``
    options, in ``dtype``) must give the eager model's logits on ``rows`` random rows of the
    schema, within ``LOWERING_TOLERANCE``; ``ArtifactError`` otherwise. Returns the largest
    absolute difference."""
    from ranking.inference import InferenceConfig, optimize_for_inference
    from ranking.model.synthetic import random_batch

    opts = InferenceConfig.from_dict(config.get("inference"), source).options()
    batch = random_batch(schema, rows, seed=0)
    with torch.no_grad():
        eager = model(batch).logits.float()
        fast = optimize_for_inference(model, dtype=dtype, device="cpu", **opts)(batch).logits
    atol, rtol = LOWERING_TOLERANCE[dtype]
    diff = (fast - eager).abs()
    if not bool((diff <= atol + rtol * eager.abs()).all()):
        raise ArtifactError(
            f"{source}: the model lowered for inference ({dtype}, {opts}) disagrees with the "
            f"trained model: max |logit difference| {float(diff.max()):.3g} on {rows} random "
            f"rows (allowed {atol} + {rtol} x |logit|)"
        )
    return float(diff.max())


def write_artifact(
    out,
    weights: dict,
    *,
    config: dict,
    schema,
    dtype: str,
    metrics: dict,
    step: int,
    lineage: dict | None = None,
    table_dtype: str = "fp32",
    extra: dict | None = None,
    verify=None,
) -> Path:
    """Write the artifact ``out`` (atomically). ``weights``: the state dict, or a function
    that writes ``weights.pt`` at the path it is given; ``verify(tmp)``: called on the written
    artifact before it is published (raise to refuse it). ``extra``: more manifest keys,
    recorded and not hashed (like the lineage)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if callable(weights):
            weights(tmp / WEIGHTS)
        else:
            torch.save(weights, tmp / WEIGHTS)
        h = hashlib.sha256()
        body = {
            "format_version": FORMAT_VERSION,
            "name": config.get("name", "model"),
            "arch": (config.get("model") or {}).get("arch"),
            "config": config,
            "schema": _bundle_vocabs(schema_dict(schema), tmp, h),
            "metrics": metrics,
            "dtype": dtype,
            "step": step,
            "weights": WEIGHTS,
        }
        with open(tmp / WEIGHTS, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if table_dtype != "fp32":  # fp32 tables: the version an artifact had before the key
            body["table_dtype"] = table_dtype
        hashed = {**body, "config": _without_paths(config)}
        h.update(json.dumps(hashed, sort_keys=True, default=str).encode())
        lineage = lineage or {}
        manifest = {
            **body,
            "model_version": h.hexdigest()[:16],
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "parent_model_version": lineage.get("parent_model_version"),
            "parent": lineage.get("parent"),
            "data": lineage.get("data"),
            "table_dtype": table_dtype,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if verify is not None:
            verify(tmp)
        _publish(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


def _without_paths(config: dict) -> dict:
    """The config as ``model_version`` hashes it: without the places a run read from (the data
    paths, the warm start's path, and the schema's file, whose resolved content the manifest's
    ``schema`` holds and the hash covers). The same model trained in another run directory or
    from a copy of the data gets the same version."""
    out = {k: v for k, v in config.items() if k != "schema"}
    data = config.get("data")
    if isinstance(data, dict):
        out["data"] = {k: v for k, v in data.items() if k not in ("train", "valid")}
    train = config.get("train")
    if isinstance(train, dict) and "warm_start" in train:
        out["train"] = {k: v for k, v in train.items() if k != "warm_start"}
    return out


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, the file system or the C library cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished artifact ``tmp`` to ``out``. An existing ``out`` is replaced
    atomically where the OS can swap two paths (a reader opening ``out`` sees the old or the
    new artifact, never no artifact); elsewhere it is moved aside first, so ``out`` is missing
    only between two renames (microseconds), never while a tree is being deleted."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        _remove(tmp)  # now the previous artifact
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, aside / "artifact")
    os.replace(tmp, out)
    _remove(aside)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path}: not an artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mf}: expected a JSON object")
    for key in ("format_version", "model_version", "config", "schema", "dtype", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{mf}: missing key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{mf}: format_version: {manifest['format_version']!r} is not supported "
            f"(this mixrank reads {FORMAT_VERSION})"
        )
    if manifest["dtype"] not in DTYPES:
        raise ArtifactError(f"{mf}: dtype: expected one of {list(DTYPES)}")
    manifest.setdefault("table_dtype", "fp32")  # written before quantized tables existed
    if manifest["table_dtype"] not in TABLE_DTYPES:
        raise ArtifactError(
            f"{mf}: table_dtype: expected one of {list(TABLE_DTYPES)}, got "
            f"{manifest['table_dtype']!r}"
        )
    return manifest


def resolve_device(device: str | None, key: str = "device") -> str:
    """``"auto"`` / None -> ``"cuda"`` where torch sees a GPU (a Ray replica sees one only when
    given ``num_gpus``), else ``"cpu"``; ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are checked
    (``ValueError`` naming ``key``: a GPU asked for and none visible)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{key}: expected auto, cpu, cuda or cuda:N, got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise ValueError(
                f"{key}: {device!r}, but torch sees {n} CUDA device(s) here (a Ray Serve "
                f"replica sees a GPU only with ray_actor_options.num_gpus)"
            )
    return str(dev)


def load_artifact(path: str | Path, *, dtype: str | None = None, device: str = "cpu") -> Artifact:
    """Load an artifact (manifest validated, weights without executing code), eval mode.

    ``device``: where the model runs (``resolve_device``: auto | cpu | cuda | cuda:N); on a GPU
    the weights are copied there (no mapping) and ``Artifact.predict`` moves each batch over.

    The weights file is memory-mapped (``torch.load(mmap=True, weights_only=True)``) and the
    model is built with its embedding tables on the meta device, then given the file's tensors
    (``load_state_dict(assign=True)``): the tables are never allocated, initialised or copied,
    and a process touches only the table pages its lookups read (the mapping is private:
    writing to a loaded tensor copies that page and never changes the file). Dense layers are
    built normally (small; their buffers outside the state dict keep their init) and also take
    the mapped tensors.

    Weights are held in fp32: a bf16 artifact's tensors are upcast on load into ordinary memory
    (tables included: the model's lookups and projections run in fp32), halving the file but
    not the resident size; with dtype "bf16" the forward runs in bf16 (``Artifact.predict``).
    Quantized tables (``table_dtype`` int8 / int4) become TorchRec's quantized embedding
    modules whose FBGEMM buffer is a private mapping of the weights file (each table read
    where its record lies: ``ranking.quant_tables.map_tables``), so they are mapped too.
    """
    from ranking.model.config import migrate_experiment
    from ranking.quant_tables import TableDtypeError, load_quantized_tables

    path = Path(path)
    manifest = read_manifest(path)
    # an artifact exported before the architecture / runtime split still loads: its runtime
    # keys move from config.model to config.inference / config.train (the version is kept)
    manifest["config"] = migrate_experiment(manifest["config"])
    wf = path / manifest["weights"]
    try:
        weights = torch.load(wf, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt, truncated, or not a weights-only file
        raise ArtifactError(f"{wf}: cannot load weights: {e}") from e
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise ArtifactError(f"{wf}: expected a state_dict (a dict of tensors)")
    weights = {
        k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in weights.items()
    }
    try:
        model, schema = _build(
            manifest["config"], manifest["schema"], str(path / MANIFEST), device="meta"
        )
    except ValueError as e:
        raise ArtifactError(f"{path / MANIFEST}: {e}") from e
    table_dtype = manifest["table_dtype"]
    try:
        rest = load_quantized_tables(model, weights, table_dtype, source=str(wf), file=wf)
        res = model.load_state_dict(rest, assign=True, strict=False)
    except TableDtypeError as e:
        raise ArtifactError(f"{e} ({path / MANIFEST}: table_dtype {table_dtype})") from e
    except RuntimeError as e:
        raise ArtifactError(
            f"{wf}: weights do not match the manifest's model (table_dtype {table_dtype}): {e}"
        ) from e
    filled = set(weights) - set(rest)  # the quantized tables' keys, loaded above
    missing = [k for k in res.missing_keys if k not in filled]
    if missing or res.unexpected_keys:
        raise ArtifactError(
            f"{wf}: weights do not match the manifest's model (table_dtype {table_dtype}): "
            f"missing keys {missing}, unexpected keys {res.unexpected_keys}"
        )
    _check_materialised(model, wf)
    device = resolve_device(device)
    if device != "cpu":
        if table_dtype != "fp32":
            raise ArtifactError(
                f"{path / MANIFEST}: table_dtype {table_dtype}: quantized tables are served on "
                f"the CPU (FBGEMM's CPU kernels); device {device} needs fp32 tables"
            )
        model.to(device)
    model.eval()
    return Artifact(
        model=model,
        schema=schema,
        manifest=manifest,
        path=path,
        dtype=dtype or manifest["dtype"],
        device=device,
    )


def _check_materialised(model: torch.nn.Module, source) -> None:
    """Every parameter and buffer holds data after the assigning load (none left on the meta
    device: a table the weights did not cover); ``ArtifactError`` naming the first otherwise."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ArtifactError(f"{source}: {name}: not in the weights (left unallocated)")
