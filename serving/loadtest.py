"""``mixrank loadtest``: a closed-loop load generator for a local ranking service.

C worker threads each send one request at a time (HTTP keep-alive with ``http.client``, or the
gRPC stub) until ``duration`` seconds or ``max_requests`` requests have passed; a progress line
is printed every second. Loopback only: the target must be 127.0.0.1, ::1 or localhost.
The request is built once (``synthetic_request``) so the client spends its CPU on sending.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ranking.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def synthetic_request(schema, n: int, seed: int = 0, history: int | None = None) -> dict:
    """A request with ``n`` candidates for ``schema``: the first token group's features and
    the behaviour sequences (``history`` ids each, default random up to ``max_length``; side
    sequences aligned) go in the context (the user), the others vary per candidate."""
    from ranking.features import CATEGORICAL, DENSE

    rng = random.Random(seed)
    lengths: dict[str, int] = {}

    def value(f):
        if f.kind == DENSE:
            return round(rng.uniform(0, 100), 3)
        if f.kind == CATEGORICAL:
            return f"{f.name}-{rng.randrange(f.num_buckets * 2)}"
        if f.is_sequence:
            if f.side_of:
                k = lengths[f.side_of]
            else:
                k = history if history is not None else rng.randrange(1, f.max_length + 1)
                lengths[f.name] = k
            return [rng.randrange(f.num_buckets * 2) for _ in range(k)]
        return [rng.randrange(f.num_buckets * 2) for _ in range(rng.randrange(1, 6))]

    ctx_group = schema.groups[0]
    context = {f.column: value(f) for f in schema.features if f.group == ctx_group or f.is_sequence}
    per_cand = [f for f in schema.features if f.group != ctx_group and not f.is_sequence]
    cands = [{f.column: value(f) for f in per_cand} for _ in range(n)]
    return {"request_id": f"load-{seed}", "context": context, "candidates": cands}


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies.append(seconds)
            else:
                self.errors[error] = self.errors.get(error, 0) + 1


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def run_load(
    url: str,
    request: dict,
    *,
    concurrency: int,
    duration: float,
    grpc_port: int | None = None,
    max_requests: int = 1_000_000,
    warmup: int = 2,
    progress=sys.stderr,
) -> dict:
    """Drive the service; returns ``{requests, errors, p50_ms, p95_ms, p99_ms, rps,
    candidates_per_s, seconds}``. With ``grpc_port`` requests go over gRPC to that port."""
    import json

    from serving.client import GRPCClient, HTTPClient, to_proto_request

    u = urlparse(url)
    host = u.hostname or ""
    if host not in LOOPBACK:
        raise UserError(
            f"--url: loadtest only targets loopback ({', '.join(LOOPBACK)}), got {host!r}"
        )
    if not 1 <= concurrency <= 256:
        raise UserError(f"--concurrency: expected 1..256, got {concurrency}")
    if not 0 < duration <= 3600:
        raise UserError(f"--duration: expected 0 < S <= 3600, got {duration}")
    path = u.path if u.path not in ("", "/") else "/v1/rank"
    n = len(request["candidates"])
    body = json.dumps(request).encode()
    proto = to_proto_request(request)
    stats = Stats()
    sent = [0]
    sent_lock = threading.Lock()
    stop_at = [float("inf")]

    def make_call():
        if grpc_port is not None:
            import grpc

            g = GRPCClient(host, grpc_port)

            def call():
                try:
                    g._stub.Rank(proto, timeout=30, metadata=g.metadata)
                    return None
                except grpc.RpcError as e:
                    return f"grpc:{e.code().name}"

            return call, g.close
        c = HTTPClient(host, u.port or 80)

        def call():
            try:
                status, _ = c.request("POST", path, body, {"Content-Type": "application/json"})
            except OSError as e:
                return f"conn:{type(e).__name__}"
            return None if status == 200 else f"http:{status}"

        return call, c.close

    ready = threading.Barrier(concurrency + 1)

    def worker():
        call, close = make_call()
        try:
            for _ in range(warmup):
                call()
            ready.wait()
            while True:
                with sent_lock:
                    if sent[0] >= max_requests or time.perf_counter() >= stop_at[0]:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                err = call()
                stats.add(time.perf_counter() - t0, err)
        finally:
            close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait(timeout=120)  # every worker connected and warmed up
    t_start = time.perf_counter()
    stop_at[0] = t_start + duration
    last = 0
    while any(t.is_alive() for t in threads):
        time.sleep(0.2)
        elapsed = time.perf_counter() - t_start
        if progress is not None and int(elapsed) > last:
            last = int(elapsed)
            with stats.lock:
                done, errs = len(stats.latencies), sum(stats.errors.values())
                p50 = percentile(sorted(stats.latencies[-500:]), 0.5)
            p50s = f"{p50 * 1000:.1f} ms" if p50 is not None else "-"
            progress.write(
                f"\r  {elapsed:5.1f}s  {done} ok  {errs} errors  "
                f"{done / max(elapsed, 1e-9):.1f} req/s  recent p50 {p50s}   "
            )
            progress.flush()
        if elapsed > duration + 60:
            break  # a stuck server: report what we have
    seconds = time.perf_counter() - t_start
    if progress is not None:
        progress.write("\n")
    lat = sorted(stats.latencies)
    ms = lambda q: None if not lat else round(percentile(lat, q) * 1000, 3)  # noqa: E731
    return {
        "requests": len(lat) + sum(stats.errors.values()),
        "ok": len(lat),
        "errors": dict(stats.errors),
        "concurrency": concurrency,
        "candidates": n,
        "p50_ms": ms(0.5),
        "p95_ms": ms(0.95),
        "p99_ms": ms(0.99),
        "rps": round(len(lat) / seconds, 2),
        "candidates_per_s": round(len(lat) * n / seconds, 1),
        "seconds": round(seconds, 2),
        "transport": "grpc" if grpc_port is not None else "http",
    }
