"""Raw Kaggle Criteo TSV (``label, I1..I13, C1..C26``) -> Parquet, streamed.

Lines whose trailing empty fields were stripped (fewer than 40 fields) are padded with empty
fields; an empty field becomes a null. Memory is bounded by one block of the input.
"""

from __future__ import annotations

import gzip
import io
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ranking.data.errors import DataError

NUM_FIELDS = 40
COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
ARROW_SCHEMA = pa.schema(
    [("label", pa.int8())]
    + [(f"I{i}", pa.int64()) for i in range(1, 14)]
    + [(f"C{i}", pa.string()) for i in range(1, 27)]
)


def pad_lines(block: bytes, first_line: int, source: str) -> bytes:
    """Pad every line of ``block`` to 40 tab-separated fields (CR stripped); a line with more
    fields is a ``DataError`` naming ``source`` and the 1-based line number."""
    out = []
    for i, line in enumerate(block.split(b"\n")):
        line = line.rstrip(b"\r")
        if not line:
            continue
        tabs = line.count(b"\t")
        if tabs < NUM_FIELDS - 1:
            line += b"\t" * (NUM_FIELDS - 1 - tabs)
        elif tabs > NUM_FIELDS - 1:
            raise DataError(
                f"{source}: line {first_line + i}: {tabs + 1} fields, expected at most {NUM_FIELDS}"
            )
        out.append(line)
    return b"\n".join(out) + b"\n" if out else b""


def parse_block(data: bytes, first_line: int, source: str) -> pa.Table:
    """Padded TSV bytes -> a table with ``ARROW_SCHEMA`` (empty -> null); labels must be 0/1."""
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=COLUMNS, block_size=1 << 26),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types=ARROW_SCHEMA, null_values=[""], strings_can_be_null=True
            ),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{source}: near line {first_line}: cannot parse: {e}") from None
    label = table.column("label")
    bad = pc.invert(pc.is_in(label, value_set=pa.array([0, 1], pa.int8())))
    if label.null_count or pc.any(bad).as_py():
        raise DataError(
            f"{source}: column 'label': a value is not 0/1 in the block from line {first_line}"
        )
    return table


def convert_criteo(
    src: str | Path,
    out: str | Path,
    block_bytes: int = 32 << 20,
    file_rows: int = 4_000_000,
    progress: bool = True,
) -> tuple[int, list[Path]]:
    """Convert ``src`` (plain or ``.gz``) to ``out/part-NNNNN.parquet``; returns (rows, files)."""
    src, out = Path(src), Path(out)
    try:
        fh = gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")  # noqa: SIM115
    except OSError as e:
        raise DataError(f"{src}: cannot open: {e.strerror or e}") from None
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    writer, in_file, rows, line_no, t0 = None, 0, 0, 1, time.perf_counter()
    carry = b""
    with fh:
        while True:
            try:
                chunk = fh.read(block_bytes)
            except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt .gz stream
                raise DataError(f"{src}: cannot read: {e}") from None
            data = carry + chunk
            if chunk:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            else:
                carry = b""
            if data:
                table = parse_block(pad_lines(data, line_no, str(src)), line_no, str(src))
                line_no += data.count(b"\n")
                if writer is None or in_file >= file_rows:
                    if writer is not None:
                        writer.close()
                    files.append(out / f"part-{len(files):05d}.parquet")
                    writer = pq.ParquetWriter(files[-1], ARROW_SCHEMA, compression="zstd")
                    in_file = 0
                writer.write_table(table)
                rows += table.num_rows
                in_file += table.num_rows
                if progress:
                    rate = rows / max(time.perf_counter() - t0, 1e-9)
                    print(
                        f"\rconvert-criteo: {rows:,} rows, {rate:,.0f} rows/s   ",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
            if not chunk:
                break
    if writer is not None:
        writer.close()
    if progress:
        print(file=sys.stderr)
    if rows == 0:
        raise DataError(f"{src}: no rows")
    return rows, files
