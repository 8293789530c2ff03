"""JSON in and out of the service: orjson where it gives exactly what the standard library
gives, the standard library otherwise.

``loads`` decodes with orjson (faster than ``json.loads``; docs/BENCHMARKS.md) and
falls back to ``json.loads`` whenever the two could differ, so every accepted request decodes to
the same Python objects and every refused one gets the stdlib's error (which names the line and
column):

- orjson refuses what the stdlib accepts (``NaN``, ``Infinity``, lone surrogates, nesting deeper
  than 1024, a byte-order mark): the stdlib decodes it and validation answers as before (422
  naming the field, or 400 for nesting);
- orjson turns integer literals outside [-2^63, 2^64) into floats, the stdlib keeps them exact:
  any run of 19 or more digits in the body sends it to the stdlib (one C-level byte translation
  finds them).

``dumps`` encodes answers with orjson (bytes; numbers as ``repr`` writes them, so the values
are the stdlib's; tests/test_serving_request.py compares both).
"""

from __future__ import annotations

import json
from typing import Any

try:  # a declared dependency; the stdlib keeps the service working without it
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_NUMBER = b"0" * 19  # 19 digits: the shortest literal that can leave the int64 range


def loads(body: bytes | str) -> Any:
    """Decode a JSON document (``ValueError``, ``UnicodeDecodeError`` or ``RecursionError``
    from the stdlib decoder on invalid input, exactly as ``json.loads``)."""
    if orjson is not None:
        raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
        if _LONG_NUMBER not in raw.translate(_DIGITS):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass  # the stdlib decides: it accepts some of these and names the error
    return json.loads(body)


def dumps(obj: Any) -> bytes:
    """Encode an answer (dicts, lists, str, int, float, None) as UTF-8 JSON bytes."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()
