"""Quantized embedding tables for serving: row-wise int8 / int4 through TorchRec's quantized
embedding modules (FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` CPU kernels).

``quantize_tables(model, "int8")`` swaps, in place, every TorchRec ``EmbeddingBagCollection``
and ``EmbeddingCollection`` of a model (the mixers' ``tokenizer.embeddings.ebc`` / ``.ec``, the
DLRM baselines' ``sparse_arch.embedding_bag_collection``) for its quantized twin in
``torchrec.quant.embedding_modules``: each row is stored in FBGEMM's fused row-wise format, the
row's ``n``-bit codes plus an fp16 scale and bias (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``),
so a row of ``d`` fp32 values (``4d`` bytes) becomes ``d * n / 8 + 4`` bytes (rows packed with
no alignment padding: ``row_alignment=1``, what FBGEMM's CPU kernels use). Lookups dequantize
in the kernel and return fp32, so the rest of the model is unchanged.

An artifact with quantized tables (manifest ``table_dtype``) stores each table under its usual
state-dict key (``...embedding_bags.<table>.weight`` / ``...embeddings.<table>.weight``) as a
plain ``uint8`` tensor ``[rows, d * n / 8 + 4]`` of those fused rows: ``torch.load(
weights_only=True)`` reads it without executing code. ``load_quantized_tables`` rebuilds the
quantized modules from the model's table configs and serves the rows from a private mapping
of the artifact's file (FBGEMM's buffer is the mapped file, each table at its record's
offset), so an int8 table, like an fp32 one, is read only where lookups touch it.

Example::

    model = quantize_tables(model, "int8")          # export: a trained fp32 model
    weights = table_state_dict(model)               # what weights.pt holds
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.quant import embedding_modules as quant
from torchrec.tensor_types import UIntXTensor

TABLE_DTYPES = ("fp32", "int8", "int4")
_DATA_TYPE = {"int8": DataType.INT8, "int4": DataType.INT4}
_TORCH_DTYPE = {"int8": torch.qint8, "int4": torch.quint4x2}
_BITS = {"int8": 8, "int4": 4}
ROW_ALIGNMENT = 1  # FBGEMM's CPU default: no padding after the fused scale/bias and codes


class TableDtypeError(ValueError):
    """A table dtype that cannot be used here; the message names the key."""


def check_table_dtype(table_dtype: str, key: str = "table_dtype") -> str:
    if table_dtype not in TABLE_DTYPES:
        raise TableDtypeError(f"{key}: expected one of {list(TABLE_DTYPES)}, got {table_dtype!r}")
    return table_dtype


def float_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every float TorchRec EBC / EC inside ``model``."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in (EmbeddingBagCollection, EmbeddingCollection)
    ]


def quantized_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, quant.EmbeddingBagCollection | quant.EmbeddingCollection)
    ]


def row_bytes(dim: int, table_dtype: str) -> int:
    """Bytes of one stored row: fp32 ``4 d``; int8 / int4 ``d * bits / 8`` codes + fp16 scale
    and bias (4 bytes)."""
    if table_dtype == "fp32":
        return 4 * dim
    return (dim * _BITS[table_dtype] + 7) // 8 + 4


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _quant_configs(module: nn.Module, table_dtype: str) -> list:
    cfgs = (
        module.embedding_bag_configs()
        if isinstance(module, EmbeddingBagCollection)
        else module.embedding_configs()
    )
    cfgs = copy.deepcopy(cfgs)
    for c in cfgs:
        c.data_type = _DATA_TYPE[table_dtype]
    return cfgs


def _empty_quantized(module: nn.Module, table_dtype: str, device: str = "cpu") -> nn.Module:
    """The quantized twin of a float EBC / EC (which may live on the meta device), its rows
    allocated (uint8) and not yet filled (``device="meta"``: not allocated)."""
    cfgs = _quant_configs(module, table_dtype)
    dev = torch.device(device)
    if isinstance(module, EmbeddingBagCollection):
        return quant.EmbeddingBagCollection(
            cfgs, module.is_weighted(), device=dev, row_alignment=ROW_ALIGNMENT
        )
    return quant.EmbeddingCollection(cfgs, device=dev, row_alignment=ROW_ALIGNMENT)


def quantized_key_order(model: nn.Module, table_dtype: str) -> list[str]:
    """The keys of ``model.state_dict()`` (float tables) in the order the same model with
    ``table_dtype`` tables lists them (TorchRec's quantized modules group their tables, so a
    collection's tables may come in another order); nothing is allocated."""
    keys = list(model.state_dict())
    if table_dtype == "fp32":
        return keys
    order: dict[str, str] = {}  # a float key -> the quantized key in its place
    for name, m in float_collections(model):
        prefix = f"{name}." if name else ""
        own = [prefix + k for k in m.state_dict()]
        twin = [prefix + k for k in _empty_quantized(m, table_dtype, "meta").state_dict()]
        if sorted(own) != sorted(twin):
            raise TableDtypeError(f"{name}: its quantized twin has other keys: {twin}")
        order.update(zip(own, twin))
    return [order.get(k, k) for k in keys]


def _plain(t: Tensor) -> Tensor:
    """A quantized table as plain uint8 (int4 tables come wrapped in TorchRec's UInt4Tensor)."""
    return t.elem if isinstance(t, UIntXTensor) else t


def quantize_tables(model: nn.Module, table_dtype: str) -> nn.Module:
    """Swap every float EBC / EC of ``model`` (in place) for TorchRec's quantized module with
    ``table_dtype`` rows (FBGEMM's row-wise quantization of the float rows); returns ``model``.
    ``fp32`` leaves it as it is."""
    check_table_dtype(table_dtype)
    if table_dtype == "fp32":
        return model
    for name, m in float_collections(model):
        m = copy.copy(m)  # from_float reads qconfig and the row alignment as attributes
        m.qconfig = quant.QuantConfig(
            activation=torch.quantization.PlaceholderObserver.with_args(dtype=torch.float),
            weight=torch.quantization.PlaceholderObserver.with_args(
                dtype=_TORCH_DTYPE[table_dtype]
            ),
        )
        setattr(m, quant.MODULE_ATTR_ROW_ALIGNMENT_INT, ROW_ALIGNMENT)
        cls = (
            quant.EmbeddingBagCollection
            if isinstance(m, EmbeddingBagCollection)
            else quant.EmbeddingCollection
        )
        with torch.no_grad():
            _set(model, name, cls.from_float(m))
    return model


def table_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with the quantized tables as plain uint8 ``[rows, row_bytes]``,
    each in its own storage (FBGEMM keeps a module's tables in one buffer; saved as views, the
    file would hold that buffer as one record, not the table-per-record layout that the
    streaming export writes)."""
    quantized = {
        f"{name}.{k}" if name else k
        for name, m in quantized_collections(model)
        for k in m.state_dict()
    }
    return {
        k: _plain(v).detach().clone() if k in quantized else v.detach()
        for k, v in model.state_dict().items()
    }


def table_keys(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """State-dict key -> (table name, rows, dim) of every table of the model's EBC / EC
    (float or quantized)."""
    out = {}
    for name, m in [*float_collections(model), *quantized_collections(model)]:
        if isinstance(m, EmbeddingBagCollection | quant.EmbeddingBagCollection):
            cfgs, attr = m.embedding_bag_configs(), "embedding_bags"
        else:
            cfgs, attr = m.embedding_configs(), "embeddings"
        for c in cfgs:
            key = f"{name}.{attr}.{c.name}.weight" if name else f"{attr}.{c.name}.weight"
            out[key] = (c.name, c.num_embeddings, c.embedding_dim)
    return out


def load_quantized_tables(
    model: nn.Module,
    weights: dict[str, Tensor],
    table_dtype: str,
    source: str = "weights",
    file: str | Path | None = None,
) -> dict[str, Tensor]:
    """Swap ``model``'s float EBC / EC (built on the meta device) for quantized ones holding
    the fused rows in ``weights``; returns the weights left for the rest of the model. A table
    missing, or whose tensor is not uint8 ``[rows, row_bytes]``, raises ``TableDtypeError``
    naming the key.

    ``file``: the ``torch.save`` file ``weights`` were loaded from. The tables are then served
    from a private read-only mapping of it (``map_tables``): FBGEMM's buffer is the mapped file
    and each table's offset its record's place in it, so nothing is copied and a process
    touches only the rows its lookups read. Without it, the rows are copied into FBGEMM's
    buffer."""
    check_table_dtype(table_dtype)
    if table_dtype == "fp32":
        return weights
    rest = dict(weights)
    keys = table_keys(model)
    mapped = None
    for name, m in float_collections(model):
        q = _empty_quantized(m, table_dtype, "cpu" if file is None else "meta")
        prefix = f"{name}." if name else ""
        saved = {}
        for key in q.state_dict():
            full = prefix + key
            if full not in rest:
                raise TableDtypeError(f"{source}: {full}: missing (a {table_dtype} table)")
            t = saved[key] = rest.pop(full)
            _, rows, dim = keys[full]
            want = (rows, row_bytes(dim, table_dtype))
            if t.dtype != torch.uint8 or tuple(t.shape) != want or not t.is_contiguous():
                raise TableDtypeError(
                    f"{source}: {full}: expected {table_dtype} rows (contiguous uint8 "
                    f"{list(want)}), got {t.dtype} {list(t.shape)} (table_dtype says "
                    f"{table_dtype})"
                )
        if file is None:
            with torch.no_grad():
                for key, buf in q.state_dict().items():
                    _plain(buf).copy_(saved[key])
        else:
            mapped = mapped or mapped_file(file)  # once for every collection
            map_tables(q, prefix, mapped, table_dtype)
        _set(model, name, q)
    return rest


def mapped_file(file: str | Path) -> tuple[dict[str, Tensor], Tensor]:
    """``(layout, base)`` of the ``torch.save`` file ``file`` for ``map_tables``: its state
    dict on the meta device (each record's offset, no data read) and a private read-only
    mapping of the whole file as uint8."""
    import os

    file = str(file)
    layout = torch.load(file, map_location="meta", weights_only=True)
    base = torch.from_file(file, shared=False, size=os.path.getsize(file), dtype=torch.uint8)
    return layout, base


def map_tables(
    q: nn.Module, prefix: str, mapped: tuple[dict[str, Tensor], Tensor], table_dtype: str
) -> None:
    """Point the quantized collection ``q`` (built on the meta device) at its tables' records
    in the file that ``mapped`` (``mapped_file``) maps (its keys are ``prefix`` + ``q``'s
    state-dict keys):
    each FBGEMM module is moved to the host with FBGEMM's own meta-to-device calls
    (``reset_weights_placements_and_offsets``, ``recompute_module_buffers``), its host buffer
    becomes a private mapping of the whole file (``torch.from_file``: pages are read on first
    touch and shared with the page cache; writes would stay private) and its per-table
    offsets the records' offsets in it (``torch.load(map_location="meta")`` gives them without
    reading data); the collection's ``weight`` buffers become views of the mapped rows."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from torchrec.tensor_types import UInt4Tensor

    layout, base = mapped
    bags = isinstance(q, quant.EmbeddingBagCollection)
    attr = "embedding_bags" if bags else "embeddings"
    cpu = torch.device("cpu")
    for (_, tables), emb in zip(q._key_to_tables.items(), q._emb_modules, strict=True):
        emb.reset_weights_placements_and_offsets(cpu, EmbeddingLocation.HOST.value)
        emb.recompute_module_buffers()
        offsets = []
        for c in tables:
            rec = layout[f"{prefix}{attr}.{c.name}.weight"]
            offsets.append(rec.untyped_storage()._checkpoint_offset + rec.storage_offset())
        emb.weights_physical_offsets = offsets
        emb.weights_host, emb.host_size = base, base.numel()
        emb.weights_dev = torch.empty(0, dtype=torch.uint8)
        emb.initialize_logical_weights_placements_and_offsets()
        rows = emb.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
        for c, (w, _, _) in zip(tables, rows, strict=True):
            getattr(q, attr)[c.name].weight = UInt4Tensor(w) if table_dtype == "int4" else w
