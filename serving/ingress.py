"""The thin ``RankIngress`` deployment (topology ``separate``): HTTP and gRPC termination in
front of the ``Ranker``, scaled apart from the model replicas.

A ``Ranker`` replica that dies (or cannot be reached) while it holds a request fails that call
with ``ray.exceptions.RayActorError``; ranking is a pure function of the request, so the
request is sent once more through the handle, which no longer routes to the dead replica. If
that fails too the client gets a JSON 503 ``unavailable`` (``Retry-After`` over HTTP,
``UNAVAILABLE`` over gRPC) from ``Front``, never the proxy's plain-text 500
(docs/SERVING.md, "Faults")."""

from __future__ import annotations

import logging

from ray import serve
from ray.exceptions import RayActorError

from serving.front import Front

log = logging.getLogger("ray.serve")


@serve.deployment(name="RankIngress", max_ongoing_requests=256)
class RankIngress(Front):
    """Thin HTTP and gRPC front door (topology ``separate``); ``user_config``:
    ``max_body_bytes``."""

    def __init__(self, ranker):
        self._ranker = ranker
        self._front_init()

    def reconfigure(self, config: dict) -> None:
        from serving.settings import IngressSettings

        self._front_reconfigure(IngressSettings.from_user_config(config))

    async def _health(self) -> tuple[int, dict]:
        return await self._ranker.health.remote()

    async def _rank(self, body, fmt: str) -> tuple[int, dict]:
        if not isinstance(body, bytes):  # a decoded gRPC request travels serialized
            body = body.SerializeToString()
        try:
            return await self._ranker.rank.remote(body, fmt)
        except RayActorError as e:  # the replica died holding it: once more, elsewhere
            log.warning("Ranker replica lost a request, retrying once: %s", type(e).__name__)
            return await self._ranker.rank.remote(body, fmt)
