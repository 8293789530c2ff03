"""The framework's floors that ``mixrank bench serve`` measures the Ranker against; Serve
applications of their own (``import_path: benchmarks.serve_floors:build_noop`` /
``build_forward_floor``), deployed next to the product's app by the benchmark only.

- ``NoOp``: parses the same JSON body and answers as many zeros (Ray Serve's floor);
- ``ForwardFloor``: the Ranker's own batching and forward, with only the no-op's request work.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serving import jsonio
from serving.ranker import Ranker, _Prepared


@serve.deployment(name="NoOp", max_ongoing_requests=64)
class NoOp:
    """Parses the same JSON body and returns as many zeros: Ray Serve's floor (benchmarks)."""

    async def __call__(self, request):
        from starlette.responses import Response

        body = jsonio.loads(await request.body())  # the same decoder as the Ranker's
        zeros = [0.0] * len(body.get("candidates", []))
        return Response(jsonio.dumps({"scores": zeros}), media_type="application/json")


def build_noop(args: dict | None = None):
    return NoOp.bind()


class _ForwardFloor(Ranker.func_or_class):
    """The framework's floor with the model's forward in it (benchmarks): the Ranker's own
    batching (formed batches, waits, the lone-request shortcut, the forward thread) and its
    forward, but per request only what ``NoOp`` does: decode the body and answer zeros. The
    rows scored are the first request's, featurized once by the real pipeline and merged once
    per batch shape. ``mixrank bench serve`` puts the Ranker next to it: the difference is
    our request work (validation, feature hashing, batch merge, the answer), and its c=8
    candidates/s over the raw batched forward is the most any request path could reach through
    Ray Serve with this model on the machine."""

    def __init__(self):
        super().__init__()
        self._columns = None
        self._merged: dict[tuple[int, ...], Any] = {}

    async def __call__(self, request):
        from starlette.responses import Response

        from serving.request import parse_json

        raw = await request.body()
        body = jsonio.loads(raw)  # the same decoder as the Ranker's and NoOp's
        n = len(body.get("candidates", []))
        art = self._art
        if self._columns is None:
            self._columns = parse_json(raw, art.schema, self._limits).features
        if len(self._columns) != n:
            raise ValueError("ForwardFloor: every request must have the first one's candidates")
        await self._scored(_Prepared(self._columns, n, art))
        return Response(jsonio.dumps({"scores": [0.0] * n}), media_type="application/json")

    def _forward(self, art, items: list[_Prepared]):
        from ranking.data.encode import merged_batch

        key = tuple(p.size for p in items)
        batch = self._merged.get(key)
        if batch is None:
            batch = self._merged[key] = merged_batch(art.schema, [p.columns for p in items])
        return art.predict(batch).numpy()


ForwardFloor = serve.deployment(name="ForwardFloor", max_ongoing_requests=64)(_ForwardFloor)


def build_forward_floor(args: dict | None = None):
    return ForwardFloor.bind()
