"""Request errors: one exception type that carries the HTTP status and the JSON error body.

The wire format (docs/SERVING.md) is ``{"error": {"code", "message", "field"}}`` with status
400 (unreadable request), 413 (too large), 422 (readable but invalid) or 503 (not ready, or a
replica lost mid-request: retry; HTTP answers carry ``Retry-After``). Messages never include a
stack trace; ``field`` is a path such as ``candidates[3].item``.
"""

from __future__ import annotations

import grpc

# HTTP status -> the gRPC status a gRPC client sees for the same error.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


# Seconds in the ``Retry-After`` header of every HTTP 503: long enough for Serve to route around
# a dead replica; a client may retry sooner (ranking a request twice is harmless).
RETRY_AFTER_S = 1


class RequestError(Exception):
    """A request the service refuses: ``status`` (HTTP), ``code`` (stable, machine-readable),
    ``message`` (for humans) and ``field`` (the offending field's path, or None)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    @classmethod
    def from_body(cls, status: int, body: dict) -> RequestError:
        err = body["error"]
        return cls(status, err["code"], err["message"], err.get("field"))


def unavailable() -> RequestError:
    """The 503 for a request that failed outside our code (a replica that died or could not be
    reached while answering it): safe to send again."""
    return RequestError(
        503,
        "unavailable",
        "the ranking service lost this request (a replica failed or is restarting); retry it",
    )
