"""The thin ``RankIngress`` deployment (topology ``separate``): HTTP and gRPC termination in
front of the ``Ranker``, scaled apart from the model replicas."""

from __future__ import annotations

from ray import serve

from serving.front import Front


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
        return await self._ranker.rank.remote(body, fmt)
