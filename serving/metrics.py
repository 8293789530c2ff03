"""The service's Prometheus metrics: one place for their names, created inside replicas.

They are ``ray.serve.metrics`` objects, exported by Ray's metrics agent (``ray start
--metrics-export-port``) with ``application``, ``deployment`` and ``replica`` tags added, so that
several replicas add up correctly in Prometheus (sum over ``replica``). Ray prefixes every name
with ``ray_``: ``mixrank_requests_total`` is scraped as ``ray_mixrank_requests_total``.

What reads right on a real Prometheus (tests/test_prometheus.py checks every dashboard query
against the traffic it sent):

- Averages come from exact counters, a summed quantity next to a count
  (``mixrank_scored_candidates_total / mixrank_batches_total``), never from a histogram's
  ``_sum``: Ray's exporter makes that up from bucket midpoints (128 candidates in every request
  read as 96, the middle of the (64, 128] bucket). The histograms stay, for quantiles.
- Counters are created at 0 when a replica starts (the label sets known in advance), so that
  Prometheus's first sample is 0 and ``rate()`` counts the first requests too.
- Ray evicts a gauge that was not set for two export intervals, so the serving model's gauge
  (``mixrank_model_info{model_version, dtype}``) is set again every ``GAUGE_REFRESH_S`` by a
  thread of the replica, for its whole life.
"""

from __future__ import annotations

import threading

PREFIX = "ray_"  # what Ray's exporter puts in front of the names below

REQUESTS = "mixrank_requests_total"
REJECTED = "mixrank_rejected_requests_total"
REQUEST_LATENCY = "mixrank_request_latency_seconds"
FORWARD_LATENCY = "mixrank_forward_latency_seconds"
CANDIDATES = "mixrank_candidates_per_request"
BATCH_CANDIDATES = "mixrank_batch_candidates"
BATCH_REQUESTS = "mixrank_batch_requests"
SCORED = "mixrank_scored_candidates_total"
BATCHES = "mixrank_batches_total"
BATCHED_REQUESTS = "mixrank_batched_requests_total"
RANKED_REQUESTS = "mixrank_ranked_requests_total"
RANKED_CANDIDATES = "mixrank_ranked_candidates_total"
MODEL_INFO = "mixrank_model_info"
RELOADS = "mixrank_model_reloads_total"
LOGGED_ROWS = "mixrank_request_log_rows_total"
LOG_DROPPED = "mixrank_request_log_dropped_total"
VERSION_REQUESTS = "mixrank_version_requests_total"
VERSION_LATENCY = "mixrank_version_latency_seconds"
SHADOW_REQUESTS = "mixrank_shadow_requests_total"
SHADOW_SUMS = "mixrank_shadow_score_sums_total"
SHADOW_LATENCY = "mixrank_shadow_latency_seconds"
SHADOW_STATS = ("n", "x", "y", "xx", "yy", "xy")  # x: served score, y: shadow score

GAUGE_REFRESH_S = 0.5  # Ray's eviction: 2 export intervals of at least 1 s each


def start_at_zero(counter, tags: dict[str, str] | None = None) -> None:
    """Create a counter's series at 0. ``Counter.inc`` refuses 0, so this records through the
    metric's own ``_record`` (what ``inc`` calls after its check); on a Ray without it the
    series appears at its first increment, as before."""
    record = getattr(counter, "_record", None)
    if record is not None:
        record(0, tags=tags)


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

    def start_at_zero(self, routes: tuple[str, ...]) -> None:
        """The answered-request series of the ranking routes, at 0: success and the statuses
        of bad requests and overload (``serving.errors``), so that an error share reads 0 and
        its first errors count."""
        for route in routes:
            for code in ("200", "400", "413", "422", "503"):
                start_at_zero(self.requests, {"route": route, "code": code})

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
        self.batches = Counter(BATCHES, "Formed batches scored.")
        self.batched_requests = Counter(BATCHED_REQUESTS, "Requests in the formed batches.")
        self.ranked_requests = Counter(RANKED_REQUESTS, "Requests accepted for scoring.")
        self.ranked_candidates = Counter(
            RANKED_CANDIDATES, "Candidates of the requests accepted for scoring."
        )
        self.model_info = Gauge(
            MODEL_INFO,
            "1 for the model version (and dtype) this replica serves.",
            tag_keys=("model_version", "dtype"),
        )
        self.reloads = Counter(
            RELOADS, "Model loads, by result (success, failure).", tag_keys=("result",)
        )
        self.logged_rows = Counter(
            LOGGED_ROWS, "Candidate rows written to the request log (serving/reqlog.py)."
        )
        self.log_dropped = Counter(
            LOG_DROPPED,
            "Sampled requests the request log dropped (queue full, write failed, closed).",
        )
        # rollout: per model version and role (primary, canary), and the shadow's comparison
        self.version_requests = Counter(
            VERSION_REQUESTS,
            "Requests answered, by model version and role (primary, canary).",
            tag_keys=("model_version", "role"),
        )
        self.version_latency = Histogram(
            VERSION_LATENCY,
            "Time from a request's features to its scores in the Ranker, by model version and "
            "role, seconds.",
            boundaries=_LATENCY_S,
            tag_keys=("model_version", "role"),
        )
        self.shadow_requests = Counter(
            SHADOW_REQUESTS,
            "Requests copied to the shadow model, by result (scored, skipped: the shadow was "
            "busy, failed).",
            tag_keys=("model_version", "result"),
        )
        self.shadow_sums = Counter(
            SHADOW_SUMS,
            "Sums over shadow-scored candidates of the served score x and the shadow's y "
            "(stat: n, x, y, xx, yy, xy): mean shift and correlation over any window.",
            tag_keys=("model_version", "stat"),
        )
        self.shadow_latency = Histogram(
            SHADOW_LATENCY,
            "The shadow model's scoring time of one request, seconds.",
            boundaries=_LATENCY_S,
            tag_keys=("model_version",),
        )
        for c in (
            self.logged_rows,
            self.log_dropped,
            self.scored,
            self.batches,
            self.batched_requests,
            self.ranked_requests,
            self.ranked_candidates,
        ):
            start_at_zero(c)
        for result in ("success", "failure"):
            start_at_zero(self.reloads, {"result": result})
        self._serving: dict[str, str] | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._refresh, name="mixrank-model-info", daemon=True).start()

    def request(self, candidates: int) -> None:
        """One request accepted for scoring."""
        self.candidates.observe(candidates)
        self.ranked_requests.inc(1)
        self.ranked_candidates.inc(candidates)

    def batch(self, requests: int, candidates: int, seconds: float) -> None:
        self.forward.observe(seconds)
        self.batch_candidates.observe(candidates)
        self.batch_requests.observe(requests)
        self.scored.inc(candidates)
        self.batches.inc(1)
        self.batched_requests.inc(requests)

    def answered(self, version: str, role: str, seconds: float) -> None:
        tags = {"model_version": version, "role": role}
        self.version_requests.inc(1, tags=tags)
        self.version_latency.observe(seconds, tags=tags)

    def shadowed(self, version: str, x, y, seconds: float | None, result: str) -> None:
        """One request copied to the shadow ``version``: served scores ``x``, shadow ``y``."""
        self.shadow_requests.inc(1, tags={"model_version": version, "result": result})
        if result != "scored":
            return
        self.shadow_latency.observe(seconds, tags={"model_version": version})
        x = x.astype("float64")
        y = y.astype("float64")
        sums = {
            "n": float(len(x)),
            "x": float(x.sum()),
            "y": float(y.sum()),
            "xx": float((x * x).sum()),
            "yy": float((y * y).sum()),
            "xy": float((x * y).sum()),
        }
        for stat, v in sums.items():
            if v > 0:  # a Ray counter refuses 0
                self.shadow_sums.inc(v, tags={"model_version": version, "stat": stat})

    def swapped(self, old: dict[str, str] | None, new: dict[str, str]) -> None:
        """The replica now serves ``new`` (``{"model_version", "dtype"}``) instead of ``old``."""
        if old is not None and old != new:
            self.model_info.set(0, tags=old)
        self._serving = dict(new)
        self.model_info.set(1, tags=new)
        self.reloads.inc(1, tags={"result": "success"})

    def _refresh(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_S):
            serving = self._serving
            if serving is not None:
                self.model_info.set(1, tags=serving)

    def close(self) -> None:
        self._stop.set()
