"""What a feature value may be, written once: the rules the request encoder
(``ranking.data.encode``) and ``batch_from_rows`` (``ranking.data.convert``) both apply. The C
scanner (``ranking.data._fastrows``) applies the string rule natively; tests/test_fastrows.py and
tests/test_serving_request.py check it against these.

Each rule returns ``(code, message)`` of what is wrong with a value, or None when it is fine.
"""

from __future__ import annotations

import math
from typing import Any

INT64 = 2**63


def strings_problem(strs: list[str], max_chars: int) -> tuple[str, str] | None:
    """Strings: at most ``max_chars`` characters each, and a UTF-8 form (JSON allows lone
    surrogates such as "\\ud800"; UTF-8 does not)."""
    longest = max(map(len, strs), default=0)
    if longest > max_chars:
        return "value_too_long", f"string of {longest} characters, the limit is {max_chars}"
    try:
        "".join(strs).encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_value", "string is not valid Unicode (lone surrogate)"
    return None


def ints_problem(ints: list[int]) -> tuple[str, str] | None:
    """Integer ids (not booleans): inside the int64 range."""
    if ints and not (min(ints) >= -INT64 and max(ints) < INT64):
        return "invalid_value", "integer id outside the int64 range"
    return None


def categorical_problem(v: Any, max_chars: int) -> tuple[str, str] | None:
    """A categorical value (and each id of an id_list), not None: a string
    (``strings_problem``), an integer (``ints_problem``) or an integral finite float (read as
    that integer)."""
    if isinstance(v, str):
        return strings_problem([v], max_chars)
    if isinstance(v, int) and not isinstance(v, bool):
        return ints_problem([v])
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            return "invalid_value", f"expected a string or an integer, got {v!r}"
        return None
    return "invalid_type", f"expected a string or an integer, got {describe(v)}"


def number_problem(v: Any) -> tuple[str, str] | None:
    """A dense value, not None: a finite number (not a boolean)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "invalid_type", f"dense feature: expected a number or null, got {describe(v)}"
    try:
        ok = math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        ok = False
    return None if ok else ("invalid_value", "dense feature: must be a finite number")


def describe(v: Any) -> str:
    """A value's type in words, for error messages."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else type(v).__name__
    )
