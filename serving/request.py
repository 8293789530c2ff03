"""Parse and validate ranking requests (JSON or protobuf) against a model's feature schema.

Everything a request can get wrong is caught here, before any feature processing, and raised
as a ``RequestError`` naming the field: malformed JSON (400), a body or candidate list over the
configured limits (413), wrong types, unknown features, NaN or infinite numbers, empty candidate
lists, over-long strings or lists, nested values (422). Accepted values are exactly those
``ranking.features.batch_from_rows`` turns into model input: a string or integer (or integral
float) for a categorical, a list of those for an id_list, a finite number for a dense feature,
and null for any missing value.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from ranking.data import fastrows
from ranking.data.convert import plainly_hashed
from ranking.features import CATEGORICAL, DENSE, FeatureSchema
from serving import jsonio
from serving.errors import RequestError

_TOP_KEYS = ("request_id", "context", "candidates", "top_k")
_INT64 = 2**63


@dataclass(frozen=True)
class Limits:
    """Request limits (set from the Serve config's ``user_config``)."""

    max_candidates: int = 1024
    max_string_length: int = 1024
    max_list_items: int = 1024
    max_request_id_length: int = 256


@dataclass
class RankRequest:
    """A validated request: ``context`` is shared by every candidate; a candidate's own value
    for a feature wins over the context's (as if each candidate were ``{**context, **cand}``)."""

    request_id: str
    context: dict[str, Any]
    candidates: list[dict[str, Any]]
    top_k: int | None
    # the candidates' values per feature they send (None where a candidate lacks it), kept from
    # the column-at-a-time validation so featurisation does not gather them again; None when
    # the per-value checks ran instead
    columns: dict[str, list] | None = None
    # bucket ids of the plainly hashed categorical features the candidates or the context send,
    # from the same validation pass (``ranking.data.fastrows.scan``): per feature column, an
    # ``[n + 1]`` int64 array of each candidate's bucket (``ABSENT`` (-1) where a candidate lacks
    # the key) and then the context's (``ABSENT`` if the context lacks it)
    hashed: dict[str, np.ndarray] | None = None

    @property
    def size(self) -> int:
        return len(self.candidates)


def parse_json(body: bytes, schema: FeatureSchema, limits: Limits) -> RankRequest:
    """A JSON request body -> ``RankRequest`` (``RequestError`` on anything invalid)."""
    try:
        obj = jsonio.loads(body)
    except RecursionError:
        raise RequestError(400, "invalid_json", "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        # JSONDecodeError's message names the line and column; nothing else leaks out.
        raise RequestError(400, "invalid_json", f"request body is not valid JSON: {e}") from None
    return validate(obj, schema, limits)


def parse_proto(body, schema: FeatureSchema, limits: Limits) -> RankRequest:
    """A serialized ``mixrank.v1.RankRequest`` (or the message itself, as gRPC decoded it)
    -> ``RankRequest``."""
    return validate(proto_dict(body), schema, limits)


try:  # serving/_fastproto.c, built by setup.py where a C compiler is at hand
    from serving import _fastproto
except ImportError:  # pragma: no cover
    _fastproto = None

FAST_PROTO = _fastproto is not None


def proto_dict(body) -> dict:
    """A serialized ``RankRequest`` or the message -> the JSON request shape (``RequestError``
    400 for bytes protobuf cannot decode).

    The C reader (``serving._fastproto``) goes straight from the wire format to the dicts,
    skipping protobuf's Python objects (a decoded message is serialized again for it; the
    timings: docs/BENCHMARKS.md, "Measurements behind code choices"). Anything it is not sure of, it
    leaves to protobuf and ``proto_to_dict``, which give the same result
    (tests/test_serving_request.py compares the two on random and corrupted messages)."""
    from google.protobuf.message import DecodeError

    from serving.proto import ranking_pb2

    is_msg = isinstance(body, ranking_pb2.RankRequest)
    if FAST_PROTO:
        obj = _fastproto.decode(body.SerializeToString() if is_msg else body)
        if obj is not None:
            return obj
    if is_msg:
        return proto_to_dict(body)
    msg = ranking_pb2.RankRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RecursionError) as e:
        raise RequestError(400, "invalid_proto", f"cannot decode RankRequest: {e}") from None
    return proto_to_dict(msg)


def proto_to_dict(msg) -> dict:
    """A ``RankRequest`` message -> the JSON request shape (unset values become null)."""
    return {
        "request_id": msg.request_id or None,
        "context": {k: _proto_value(v) for k, v in msg.context.items()},
        "candidates": [{k: _proto_value(v) for k, v in c.features.items()} for c in msg.candidates],
        "top_k": msg.top_k or None,
    }


def _proto_value(v):
    kind = v.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        return [_proto_value(x) for x in v.list_value.values]
    return getattr(v, kind)


def validate(obj: Any, schema: FeatureSchema, limits: Limits) -> RankRequest:
    """Check a decoded request against the schema and limits; see the module docstring."""
    if not isinstance(obj, dict):
        raise RequestError(
            422, "invalid_type", f"request must be a JSON object, got {_type(obj)}", None
        )
    for key in obj:
        if key not in _TOP_KEYS:
            raise RequestError(
                422,
                "unknown_field",
                f"unknown field {_short(key)!r} (expected {', '.join(_TOP_KEYS)})",
                _short(key),
            )
    request_id = obj.get("request_id")
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str):
        raise RequestError(
            422, "invalid_type", f"expected a string, got {_type(request_id)}", "request_id"
        )
    elif len(request_id) > limits.max_request_id_length:
        raise RequestError(
            422,
            "value_too_long",
            f"longer than {limits.max_request_id_length} characters",
            "request_id",
        )
    top_k = obj.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise RequestError(422, "invalid_type", f"expected an integer, got {_type(top_k)}", "top_k")
    if top_k is not None and top_k < 1:
        raise RequestError(422, "invalid_value", f"must be >= 1, got {top_k}", "top_k")

    columns = {f.column: f for f in schema.features}
    context = obj.get("context")
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise RequestError(
            422, "invalid_type", f"expected an object of features, got {_type(context)}", "context"
        )
    _check_features(context, "context", columns, limits)

    candidates = obj.get("candidates")
    if candidates is None:
        raise RequestError(422, "missing_field", "required: a list of candidates", "candidates")
    if not isinstance(candidates, list):
        raise RequestError(
            422, "invalid_type", f"expected a list, got {_type(candidates)}", "candidates"
        )
    if not candidates:
        raise RequestError(
            422, "empty_candidates", "at least one candidate is required", "candidates"
        )
    if len(candidates) > limits.max_candidates:
        raise RequestError(
            413,
            "too_many_candidates",
            f"{len(candidates)} candidates, the limit is {limits.max_candidates}",
            "candidates",
        )
    cand_columns: dict[str, list] = {}
    hashed: dict[str, np.ndarray] = {}
    if _fast_ok(schema, context, candidates, columns, limits, cand_columns, hashed):
        return RankRequest(
            request_id,
            context,
            candidates,
            top_k if top_k is None else int(top_k),
            cand_columns,
            hashed,
        )
    for i, cand in enumerate(candidates):
        if not isinstance(cand, dict):
            raise RequestError(
                422,
                "invalid_type",
                f"expected an object of features, got {_type(cand)}",
                f"candidates[{i}]",
            )
        _check_features(cand, f"candidates[{i}]", columns, limits)
    return RankRequest(request_id, context, candidates, top_k if top_k is None else int(top_k))


_NONE = type(None)


def _fast_ok(
    schema: FeatureSchema,
    context: dict,
    candidates: list,
    columns: dict,
    limits: Limits,
    out: dict | None = None,
    hashed: dict | None = None,
) -> bool:
    """Column-at-a-time check of the features (C-level passes instead of a Python call per
    value). True means every value is acceptable; False means "not sure": the per-value checks
    then run and raise the error that names the field. Never True where those would raise
    (tests/test_serving_request.py compares both on valid and invalid requests).

    The plainly hashed categorical features whose values are all strings or null are checked
    and hashed in one pass (``ranking.data.fastrows.scan``, C where built); ``hashed`` receives
    their ids. ``out`` receives the candidates' values of each other feature some candidate
    sends."""
    names = tuple(columns)
    buckets = tuple(f.num_buckets if plainly_hashed(f) else 0 for f in columns.values())
    scanned = fastrows.scan(
        candidates, context, names, buckets, schema.hash_seed, limits.max_string_length
    )
    if scanned is None:
        return False
    ids, mixed = scanned
    n = len(candidates)
    sent = (ids[:, :n] != fastrows.ABSENT).any(axis=1).tolist()
    for j, name in enumerate(names):
        if not sent[j] and name not in context:
            continue
        if buckets[j] and j not in mixed:  # checked and hashed
            if hashed is not None:
                hashed[name] = ids[j]
            continue
        spec = columns[name]
        vals = [c.get(name) for c in candidates] if sent[j] else [None] * n
        if out is not None and sent[j]:
            out[name] = vals[:]
        if name in context:
            vals.append(context[name])
        types = set(map(type, vals))
        if spec.kind == DENSE:
            if not types <= {float, int, _NONE}:
                return False
            nums = [v for v in vals if v is not None]
            try:
                if nums and not np.isfinite(np.asarray(nums, dtype=np.float64)).all():
                    return False
            except OverflowError:
                return False
        elif spec.kind == CATEGORICAL:
            if not _ids_ok(vals, types, limits):
                return False
        else:
            if not types <= {list, _NONE}:
                return False
            lists = [v for v in vals if v is not None]
            if lists and max(map(len, lists)) > limits.max_list_items:
                return False
            flat = [x for v in lists for x in v]
            if not _ids_ok(flat, set(map(type, flat)), limits):
                return False
    return True


def _ids_ok(vals: list, types: set, limits: Limits) -> bool:
    if types <= {str, _NONE}:
        strs = [v for v in vals if v is not None]
        if strs and max(map(len, strs)) > limits.max_string_length:
            return False
        try:
            "".join(strs).encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if types <= {int, _NONE}:
        ints = [v for v in vals if v is not None]
        return not ints or (min(ints) >= -_INT64 and max(ints) < _INT64)
    return False


def _check_features(feats: dict, where: str, columns: dict, limits: Limits) -> None:
    for name, value in feats.items():
        spec = columns.get(name)
        if spec is None:
            raise RequestError(
                422,
                "unknown_feature",
                f"unknown feature {_short(name)!r} (the model's features: {', '.join(columns)})",
                f"{where}.{_short(name)}",
            )
        if value is None:
            continue
        field = f"{where}.{name}"
        if spec.kind == DENSE:
            _check_number(value, field)
        elif spec.kind == CATEGORICAL:
            _check_id(value, field, limits)
        else:
            if not isinstance(value, list):
                raise RequestError(
                    422,
                    "invalid_type",
                    f"id_list feature: expected a list, got {_type(value)}",
                    field,
                )
            if len(value) > limits.max_list_items:
                raise RequestError(
                    422,
                    "value_too_long",
                    f"{len(value)} ids, the limit is {limits.max_list_items}",
                    field,
                )
            for j, v in enumerate(value):
                if v is not None:
                    _check_id(v, f"{field}[{j}]", limits)


def _check_number(v, field: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RequestError(
            422, "invalid_type", f"dense feature: expected a number or null, got {_type(v)}", field
        )
    try:
        ok = math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise RequestError(422, "invalid_value", "dense feature: must be a finite number", field)


def _check_id(v, field: str, limits: Limits) -> None:
    if isinstance(v, str):
        if len(v) > limits.max_string_length:
            raise RequestError(
                422,
                "value_too_long",
                f"string of {len(v)} characters, the limit is {limits.max_string_length}",
                field,
            )
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); UTF-8 does not
            raise RequestError(
                422, "invalid_value", "string is not valid Unicode (lone surrogate)", field
            ) from None
        return
    if isinstance(v, int) and not isinstance(v, bool):
        if not -_INT64 <= v < _INT64:
            raise RequestError(422, "invalid_value", "integer id outside the int64 range", field)
        return
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise RequestError(
                422, "invalid_value", f"expected a string or an integer, got {v!r}", field
            )
        return
    raise RequestError(
        422, "invalid_type", f"expected a string or an integer, got {_type(v)}", field
    )


def _type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _short(s: str, n: int = 64) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
