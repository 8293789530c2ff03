"""Shared output format of the benchmarks: one JSON object per line, then an aligned table."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def emit(record: dict[str, Any], stream=None) -> None:
    """Print one result as a JSON line (flushed, so long runs show progress)."""
    stream = stream or sys.stdout
    stream.write(json.dumps(record, sort_keys=False, default=_fmt_default) + "\n")
    stream.flush()


def table(records: list[dict[str, Any]], columns: list[str] | None = None, stream=None) -> str:
    """Render records as an aligned text table (also returned, for docs)."""
    if not records:
        return ""
    columns = columns or list(dict.fromkeys(k for r in records for k in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, file=stream or sys.stdout)
    return text


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def _fmt_default(o: Any) -> Any:
    try:
        return float(o)
    except Exception:
        return str(o)
