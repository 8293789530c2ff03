"""The service's Prometheus metrics: one place for their names, created inside replicas.

They are ``ray.serve.metrics`` objects, exported by Ray's metrics agent (``ray start
--metrics-export-port``) with ``application``, ``deployment`` and ``replica`` tags added, so that
several replicas add up correctly in Prometheus (sum over ``replica``). Ray prefixes every name
with ``ray_``: ``mixrank_requests_total`` is scraped as ``ray_mixrank_requests_total``.
Ray estimates a histogram's ``_sum`` from bucket midpoints: use ``_count`` and the buckets, and
the counters (exact) for totals.
"""

from __future__ import annotations

PREFIX = "ray_"  # what Ray's exporter puts in front of the names below

REQUESTS = "mixrank_requests_total"
REJECTED = "mixrank_rejected_requests_total"
REQUEST_LATENCY = "mixrank_request_latency_seconds"
FORWARD_LATENCY = "mixrank_forward_latency_seconds"
CANDIDATES = "mixrank_candidates_per_request"
BATCH_CANDIDATES = "mixrank_batch_candidates"
BATCH_REQUESTS = "mixrank_batch_requests"
SCORED = "mixrank_scored_candidates_total"
MODEL_INFO = "mixrank_model_info"
RELOADS = "mixrank_model_reloads_total"

_LATENCY_S = [
    0.001,
    0.002,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1,
    2,
]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


class IngressMetrics:
    """Per-route request counts and end-to-end latency, measured in the ingress replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            REQUESTS, "Requests answered, by route and status code.", tag_keys=("route", "code")
        )
        self.rejected = Counter(
            REJECTED, "Requests refused, by error code.", tag_keys=("route", "error")
        )
        self.latency = Histogram(
            REQUEST_LATENCY,
            "Time from the ingress receiving a request to its answer, seconds.",
            boundaries=_LATENCY_S,
            tag_keys=("route",),
        )

    def observe(self, route: str, status: int, seconds: float, error: str | None = None) -> None:
        self.requests.inc(1, tags={"route": route, "code": str(status)})
        self.latency.observe(seconds, tags={"route": route})
        if error is not None:
            self.rejected.inc(1, tags={"route": route, "error": error})


class RankerMetrics:
    """Model-side metrics, measured in the ``Ranker`` replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.forward = Histogram(
            FORWARD_LATENCY,
            "Model forward time of one formed batch (features to probabilities), seconds.",
            boundaries=_LATENCY_S,
        )
        self.candidates = Histogram(
            CANDIDATES, "Candidates per accepted request.", boundaries=_SIZES
        )
        self.batch_candidates = Histogram(
            BATCH_CANDIDATES, "Candidates per formed batch.", boundaries=_SIZES
        )
        self.batch_requests = Histogram(
            BATCH_REQUESTS, "Requests per formed batch.", boundaries=_SIZES[:9]
        )
        self.scored = Counter(SCORED, "Candidates scored (all formed batches).")
        self.model_info = Gauge(
            MODEL_INFO, "1 for the model version this replica serves.", tag_keys=("model_version",)
        )
        self.reloads = Counter(
            RELOADS, "Model loads, by result (success, failure).", tag_keys=("result",)
        )

    def batch(self, requests: int, candidates: int, seconds: float) -> None:
        self.forward.observe(seconds)
        self.batch_candidates.observe(candidates)
        self.batch_requests.observe(requests)
        self.scored.inc(candidates)

    def swapped(self, old: str | None, new: str) -> None:
        if old is not None and old != new:
            self.model_info.set(0, tags={"model_version": old})
        self.model_info.set(1, tags={"model_version": new})
        self.reloads.inc(1, tags={"result": "success"})
