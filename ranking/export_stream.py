"""Writing an artifact's ``weights.pt`` without holding the embedding tables in memory (both
exports: from a training checkpoint and from another artifact).

A 10^8 x 16 table is 6.4 GB in fp32; exporting it by building the model, ``dcp.load``-ing the
checkpoint into it and ``torch.save``-ing the state dict held the table, DCP's read buffer of
each saved shard, and more (9.46 GiB peak in a fresh process, 13.4 GiB at the end of a
training run). Here the file is laid out first and filled in place:

1. ``torch.save`` under ``torch.serialization.skip_data()`` writes the state dict's structure
   with every record's space reserved (the tables are ``torch.empty`` placeholders that are
   never touched, so never resident);
2. the file is memory-mapped back with ``MAP_SHARED`` (``torch.load(mmap=True)``), so writing
   a loaded tensor writes the file's page cache;
3. the dense weights are copied in, and each table goes into its mapped record: from a
   checkpoint, read straight into it (``checkpoint.mapped_reader``: from a mapping of the
   ``.distcp`` file, no shard-sized buffer), or through a sparse fp32 staging file beside it
   when the record is in another dtype (bf16 weights, int8 / int4 rows); from an artifact
   (its tables mapped), copied or converted; conversions go in row chunks;
4. each zip record's CRC-32 and the ``.data/serialization_id`` (which ``skip_data`` leaves
   unset) are computed and written in, so the file is byte for byte what ``torch.save``
   writes of the same state dict (``tests/test_export_stream.py``), and ``model_version`` is
   the same whichever way an artifact was made.

The anonymous memory this needs is the dense model plus one chunk (285 MiB peak for the 10^8
table, in 17 s); the table pages written are file pages that the kernel writes back and may
drop, and each table's pages leave the process once it is written (``_drop_pages``), as the
checkpoint's leave it a block at a time, so the process maps at most about one table.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

CHUNK_ROWS = 1 << 18  # rows converted per step (bf16 / quantized tables): 16 MB of fp32 at d=16
_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_DESCRIPTOR = b"PK\x07\x08"
_SERIALIZATION_ID = ".data/serialization_id"


def write_in_place(
    path: Path, layout: dict[str, Tensor], fill: Callable[[str, Tensor], None]
) -> None:
    """Write ``layout`` (a state dict whose tensors give the shapes and dtypes; their values
    are not read, so they may be untouched ``torch.empty`` placeholders) to ``path`` as
    ``torch.save`` would, with the values that ``fill(key, mapped)`` writes into each key's
    mapped record (called once per key)."""
    with torch.serialization.skip_data():
        torch.save(layout, path)
    reserve(path, os.path.getsize(path))
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    try:
        for key, dst in mapped.items():
            fill(key, dst)
            _drop_pages(dst)  # written: out of this process, into the page cache
    finally:
        del mapped  # unmaps: the writes are in the file's page cache
    fix_crcs(path)


def _drop_pages(t: Tensor, least: int = 1 << 20) -> None:
    """Drop the pages of ``t`` (a region of ``write_in_place``'s ``MAP_SHARED`` file
    mapping, ``least`` bytes or more) from this process (``madvise(MADV_DONTNEED)``): the
    written pages stay in the page cache, dirty until written back, and a later read maps them
    again, so the process holds at most one table's pages at a time. Only for a shared file
    mapping: on private or anonymous memory this would discard what was written."""
    import ctypes

    n = t.numel() * t.element_size()
    if n < least:
        return
    page = mmap.PAGESIZE
    lo = t.data_ptr() // page * page
    hi = -(-(t.data_ptr() + n) // page) * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED)  # advice: a failure leaves the pages mapped


def reserve(path: Path, nbytes: int) -> None:
    """Allocate the disk blocks of ``path``'s first ``nbytes`` (``posix_fallocate``) before it
    is written through a mapping: ``skip_data`` and ``truncate`` leave holes, and a write
    through a shared mapping into a hole that the disk has no room for kills the process with
    SIGBUS instead of raising. A full disk is an ``OSError`` naming the file here."""
    if nbytes <= 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise OSError(
            e.errno, f"{path}: cannot reserve {nbytes:,} bytes on disk: {e.strerror}"
        ) from None
    finally:
        os.close(fd)


def fix_crcs(path: Path, block: int = 1 << 24) -> None:
    """Give every record of the ``torch.save`` zip file ``path`` its CRC-32, as
    ``torch.save`` writes it: in the data descriptor after the record (the writer streams, so
    its local headers say 0) or in the local header where there is none, and in the central
    directory; then the ``.data/serialization_id`` record, whose second half is the
    ``c10::hash_combine`` of the CRCs in the records' data descriptors, in file order (PyTorch's
    ``PyTorchStreamWriter::writeSerializationId``; ``skip_data`` leaves those records out of
    it). Python's ``zipfile`` refuses records whose CRC does not match."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    with open(path, "r+b") as f:

        def data_at(info) -> int:
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] != _LOCAL:
                raise ValueError(f"{path}: {info.filename}: no local header")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename}: not a stored record")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            return info.header_offset + 30 + name_len + extra_len

        def crc_of(info) -> int:
            f.seek(data_at(info))
            crc, left = 0, info.file_size
            while left:
                buf = f.read(min(block, left))
                if not buf:
                    raise ValueError(f"{path}: {info.filename}: truncated")
                crc = zlib.crc32(buf, crc)
                left -= len(buf)
            return crc

        def put_crc(info, crc: int) -> bool:
            """True where the record has a data descriptor (the ones the writer combines)."""
            f.seek(info.header_offset + 6)
            (flags,) = struct.unpack("<H", f.read(2))
            described = bool(flags & 0x8)
            if described:  # a data descriptor follows the data: [signature] crc sizes
                end = data_at(info) + info.file_size
                f.seek(end)
                at = end + 4 if f.read(4) == _DESCRIPTOR else end
            else:
                at = info.header_offset + 14
            f.seek(at)
            f.write(struct.pack("<I", crc))
            return described

        crcs, combined = [], 0
        for info in infos:
            if info.filename.endswith("/" + _SERIALIZATION_ID):
                sid_at = data_at(info)
                f.seek(sid_at)
                sid = f.read(info.file_size)
                sid = sid[:20] + b"%020d" % combined  # names' hash as written, then the CRCs'
                f.seek(sid_at)
                f.write(sid)
                put_crc(info, crc := zlib.crc32(sid))
            else:
                if put_crc(info, crc := crc_of(info)):  # (an empty record has no descriptor)
                    combined = _hash_combine(combined, crc)
            crcs.append(crc)
        pos = start_dir
        for info, crc in zip(infos, crcs):
            f.seek(pos)
            head = f.read(46)
            if head[:4] != _CENTRAL:
                raise ValueError(f"{path}: central directory entry of {info.filename} not at {pos}")
            f.seek(pos + 16)
            f.write(struct.pack("<I", crc))
            n, e, c = struct.unpack("<HHH", head[28:34])
            pos += 46 + n + e + c


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64-bit ``size_t``."""
    m = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & m) + (seed >> 2)) & m)) & m


def staging(path: Path, rows: int, dim: int) -> Tensor:
    """A ``[rows, dim]`` fp32 tensor backed by a sparse file at ``path`` (shared mapping):
    the pages are file pages, written back and dropped by the kernel as needed."""
    nbytes = rows * dim * 4
    with open(path, "wb") as f:
        f.truncate(nbytes)
    reserve(path, nbytes)
    if nbytes == 0:
        return torch.empty(rows, dim)
    return torch.from_file(str(path), shared=True, size=rows * dim, dtype=torch.float32).view(
        rows, dim
    )


def convert_rows(src: Tensor, dst: Tensor, table_dtype: str, chunk: int = CHUNK_ROWS) -> None:
    """``dst`` (a mapped record) <- ``src`` (fp32 rows) in ``table_dtype``, ``chunk`` rows at a
    time: ``fp32`` tables in ``dst``'s float dtype (bf16 weights), ``int8`` / ``int4`` as the
    fused rows TorchRec's quantized tables hold (``[fp16 scale, fp16 bias, codes]``: FBGEMM's
    ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`` puts the scale and bias last, the table
    first), as ``ranking.quant_tables.quantize_tables`` writes them."""
    from ranking.quant_tables import _BITS

    for i in range(0, src.shape[0], chunk):
        rows = src[i : i + chunk]
        if table_dtype == "fp32":
            dst[i : i + chunk].copy_(rows)
        else:
            q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
                rows.contiguous(), _BITS[table_dtype]
            )
            dst[i : i + chunk, :4].copy_(q[:, -4:])
            dst[i : i + chunk, 4:].copy_(q[:, :-4])


def read_model_state(checkpoint: Path, state: dict[str, Tensor]) -> None:
    """Fill ``state`` (keys of the model's state dict) in place from ``checkpoint``'s
    ``model.<key>`` entries, through ``checkpoint.mapped_reader``; a key the checkpoint lacks
    raises ``ValueError`` naming the checkpoint and the key."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ranking.train.checkpoint import mapped_reader

    try:
        dcp.load(
            {"model": state},
            checkpoint_id=str(checkpoint),
            storage_reader=mapped_reader(checkpoint),
            no_dist=True,
        )
    except CheckpointException as e:  # DCP wraps the failure (a BaseException): unwrap it
        causes = [err[0] if isinstance(err, tuple) else err for err in e.failures.values()]
        raise ValueError(f"{checkpoint}: cannot read the model's weights: {causes[0]}") from None


def write_weights(
    path: Path,
    model: torch.nn.Module,
    dtype: torch.dtype,
    table_dtype: str,
    read_into: Callable[[str, Tensor], None] | None = None,
) -> None:
    """Write ``weights.pt`` at ``path`` for ``model`` (its dense weights loaded): dense
    floats in ``dtype``; each embedding table in ``dtype`` (``table_dtype`` fp32) or as int8 /
    int4 fused rows. A table comes from ``read_into(key, dst)`` (fills an fp32 ``[rows, dim]``
    tensor; the model's tables may then be on the meta device) or, without it, from the
    model's own table (fp32 rows, or rows already in ``table_dtype``, copied as they are)."""
    from ranking.quant_tables import _plain, quantized_key_order, row_bytes, table_keys

    tables = table_keys(model)
    state = model.state_dict()

    def as_stored(v: Tensor) -> Tensor:
        return v.to(dtype) if v.is_floating_point() else v

    layout = {}
    for k in quantized_key_order(model, table_dtype):  # the order torch.save would see
        if k in tables:
            _, rows, dim = tables[k]
            layout[k] = (
                torch.empty(rows, dim, dtype=dtype)
                if table_dtype == "fp32"
                else torch.empty(rows, row_bytes(dim, table_dtype), dtype=torch.uint8)
            )
        else:
            layout[k] = as_stored(state[k])

    def fill(key: str, dst: Tensor) -> None:
        if key not in tables:
            dst.copy_(layout[key])
        elif read_into is None:
            src = _plain(state[key])
            if src.dtype == torch.uint8:  # already quantized (the same table_dtype)
                dst.copy_(src)
            else:
                convert_rows(src, dst, table_dtype)
        elif table_dtype == "fp32" and dtype == torch.float32:
            read_into(key, dst)  # straight into the file
        else:
            _, rows, dim = tables[key]
            stage_file = path.with_name(f".stage-{os.getpid()}.bin")
            try:
                stage = staging(stage_file, rows, dim)
                read_into(key, stage)
                convert_rows(stage, dst, table_dtype)
                del stage
            finally:
                stage_file.unlink(missing_ok=True)

    write_in_place(path, layout, fill)
