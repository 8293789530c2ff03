"""Parse ranking requests (JSON or protobuf): the envelope here, the feature values in
``ranking.data.encode``.

Everything a request can get wrong is raised as a ``RequestError`` naming the field: malformed
JSON (400), a candidate list over the configured limit (413), and (422) an unknown top-level
field, a bad request_id or top_k, a context or candidate list of the wrong type, an empty
candidate list. The feature values (types, unknown features, NaN or infinite numbers, over-long
strings or lists) are checked, hashed and turned into model input in one pass by
``ranking.data.encode.encode``, whose ``InvalidValue`` becomes a 422 naming
``candidates[i].feature``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ranking.data.convert import FeatureColumns
from ranking.data.encode import InvalidValue, encode
from ranking.features import FeatureSchema
from serving import jsonio
from serving.errors import RequestError

_TOP_KEYS = ("request_id", "context", "candidates", "top_k")


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
    # the model input of the candidates, context broadcast (``ranking.data.encode``)
    features: FeatureColumns

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
        raise RequestError(
            400,
            "invalid_proto",
            f"request body is not a serialized mixrank.v1.RankRequest ({len(body)} bytes): {e}",
        ) from None
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

    context = obj.get("context")
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise RequestError(
            422, "invalid_type", f"expected an object of features, got {_type(context)}", "context"
        )
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
    try:
        features = encode(
            schema,
            context,
            candidates,
            max_chars=limits.max_string_length,
            max_items=limits.max_list_items,
        )
    except InvalidValue as e:
        raise RequestError(422, e.code, e.message, e.field) from None
    return RankRequest(
        request_id, context, candidates, top_k if top_k is None else int(top_k), features
    )


def _type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _short(s: str, n: int = 64) -> str:
    s = str(s)
    return s if len(s) <= n else s[:n] + "..."
