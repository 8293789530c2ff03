"""The ``Ranker`` deployment: holds the model, parses and validates requests against its
schema, builds features (context once per request), scores formed batches with ``@serve.batch``
(sized in candidates) and swaps models on ``reconfigure``; it also answers HTTP and gRPC itself
when it is the application's ingress (``serving.front``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from serving.errors import RequestError
from serving.front import Front
from serving.settings import RankerSettings

log = logging.getLogger("ray.serve")


@dataclass
class _Prepared:
    """One request's features, ready for a batch; ``art`` is the model they were built for."""

    columns: Any  # FeatureColumns
    size: int
    art: Any  # Artifact


def _candidates(items: list[_Prepared]) -> int:
    return sum(p.size for p in items)


def _info(art) -> dict[str, str]:
    """The labels of ``mixrank_model_info`` for an artifact."""
    return {"model_version": art.model_version, "dtype": str(art.dtype)}


THREAD_AFTER_S = 0.1  # forward_in_thread: auto


@serve.deployment(name="Ranker", max_ongoing_requests=64)
class Ranker(Front):
    """Scores requests with the artifact named by ``user_config["artifact"]``.

    ``user_config`` keys: ``artifact`` (path, required), ``dtype`` (auto | fp32 | bf16 | int8 | fp8),
    ``device`` (auto: cuda when the replica was given a GPU, else cpu; cpu | cuda | cuda:N),
    ``max_batch_size`` (candidates per formed batch), ``batch_wait_timeout_s``,
    ``max_candidates``, ``max_string_length``, ``max_list_items``, ``torch_threads``,
    ``forward_in_thread`` and ``max_body_bytes`` (when it is the application's ingress).
    """

    def __init__(self):
        from serving.metrics import RankerMetrics
        from serving.runtime import tune_allocator

        tune_allocator()  # before the forward threads allocate: see serving/runtime.py
        self._front_init()

        self._art = None
        self._path = None
        self._dtype = None
        self._device = "cpu"  # resolved from user_config.device at reconfigure
        self._loaded_on = None  # the serving model's device
        self.settings = RankerSettings()  # the defaults until reconfigure
        self._limits = self.settings.limits()
        self._wait_s = self.settings.batch_wait_timeout_s
        self._max_wait_s = self.settings.max_batch_wait_s
        self._inflight = 0
        self._busy = 0  # formed batches being scored
        self._batch_s = 0.0  # moving average of a formed batch's scoring time
        self._forward_in_thread: bool | str = "auto"
        self._last_error: str | None = None
        self._metrics = RankerMetrics()
        self._reqlog = None  # serving.reqlog.RequestLog while user_config.log_dir is set
        self._log_error: str | None = None  # why the request log could not start
        # rollout: {role: (path, Artifact)} for "shadow" and "canary" (serving/rollout.py)
        self._side: dict[str, tuple[str, Any]] = {}
        self._shadow_busy = False
        self._log_key: tuple | None = None

    # ------------------------------------------------------------------ configuration
    async def reconfigure(self, config: dict) -> None:
        """Apply a new ``user_config``. A new artifact is loaded and validated off the event
        loop (requests keep being answered by the old model) and swapped in only if valid; a
        bad one is logged and counted, and the old model keeps serving. Without any model yet
        (first start) a bad artifact fails the replica."""
        import torch

        from ranking.export import resolve_device
        from serving.settings import RankerSettings

        s = RankerSettings.from_user_config(config)  # every check before anything changes
        device = resolve_device(s.device, "user_config.device")
        self.settings = s
        self._limits = s.limits()
        self._front_reconfigure(s.ingress)
        self._wait_s = s.batch_wait_timeout_s
        self._max_wait_s = s.max_batch_wait_s
        self._score.set_max_batch_size(s.max_batch_size)
        self._score.set_batch_wait_timeout_s(self._wait_s)
        self._forward_in_thread = s.forward_in_thread
        if s.torch_threads > 0:
            torch.set_num_threads(s.torch_threads)
        self._device = device
        if (s.artifact, s.dtype, self._device) != (self._path, self._dtype, self._loaded_on):
            await self._load(s.artifact, s.dtype)
        await self._load_side("shadow", s.shadow_artifact, s.dtype)
        await self._load_side("canary", s.canary_artifact, s.dtype)
        await self._configure_log(s)

    async def _load_side(self, role: str, path: str, dtype: str) -> None:
        """Load (or drop, for "") the shadow or canary model. It must be compatible with the
        serving model, as a new serving model must; a bad one is refused, logged and counted
        (``last_reload_error`` in /healthz names it), and the serving model is untouched."""
        from serving.model import load_validated

        current = self._side.get(role)
        if not path:
            self._side.pop(role, None)
            return
        if (
            current is not None
            and current[0] == path
            and current[1].device == self._device
            and self._art is not None
        ):
            return
        try:
            art = await asyncio.to_thread(load_validated, path, dtype, self._art, self._device)
        except Exception as e:
            self._side.pop(role, None)
            self._last_error = f"{role} {path}: {type(e).__name__}: {e}"
            self._metrics.reloads.inc(1, tags={"result": "failure"})
            log.error("%s model refused: %s", role, e)
            return
        self._side[role] = (path, art)
        log.info("%s model %s from %s", role, art.model_version, path)

    async def _configure_log(self, s: RankerSettings) -> None:
        """Start, restart or stop the request log for ``s``; what the old one holds is flushed
        first (every reconfigure flushes: a rollout's last rows of the old model are on disk
        before it returns)."""
        from serving.reqlog import RequestLog

        key = (s.log_dir, s.log_sample_rate, s.log_queue_size, s.log_flush_seconds)
        old = self._reqlog
        if old is not None:
            if key == self._log_key:
                await asyncio.to_thread(old.flush)
                return
            self._reqlog = None
            await asyncio.to_thread(old.close)
        self._log_key = key
        self._log_error = None
        if s.log_dir:
            try:
                self._reqlog = RequestLog(
                    s.log_dir,
                    sample_rate=s.log_sample_rate,
                    queue_size=s.log_queue_size,
                    flush_seconds=s.log_flush_seconds,
                    on_written=lambda rows: self._metrics.logged_rows.inc(rows),
                    on_dropped=lambda n: self._metrics.log_dropped.inc(n),
                )
            except Exception as e:  # an unusable directory: keep answering, say so in /healthz
                self._log_error = f"user_config.log_dir {s.log_dir}: {type(e).__name__}: {e}"
                log.error("request log off: %s", self._log_error)
                return
            log.info("logging requests to %s (sample rate %s)", s.log_dir, s.log_sample_rate)

    def __del__(self):
        """Serve calls this on a graceful shutdown: what the request log holds is written."""
        reqlog = getattr(self, "_reqlog", None)
        if reqlog is not None:
            reqlog.close(timeout=20.0)

    async def flush_log(self) -> dict:
        """Write what this replica's request log holds now (through a handle, e.g. ``mixrank
        demo``; a reconfigure flushes every replica); the log's counters."""
        r = self._reqlog
        if r is None:
            return {"enabled": False, "error": self._log_error}
        ok = await asyncio.to_thread(r.flush)
        return {
            "enabled": True,
            "flushed": ok,
            "rows": r.written_rows,
            "files": r.files,
            "dropped": r.dropped,
        }

    async def _load(self, path: str, dtype: str) -> None:
        from serving.model import load_validated

        old = self._art
        adopted = next(  # a promoted shadow or canary is already loaded and validated
            (
                a
                for p, a in self._side.values()
                if p == path and old is not None and a.device == self._device
            ),
            None,
        )
        try:
            art = adopted or await asyncio.to_thread(load_validated, path, dtype, old, self._device)
        except Exception as e:
            self._last_error = f"{type(e).__name__}: {e}"
            self._metrics.reloads.inc(1, tags={"result": "failure"})
            log.error("model reload failed, still serving %s: %s", self._version(), e)
            if old is None:
                raise
            return
        self._art, self._path, self._dtype, self._last_error = art, path, dtype, None
        self._loaded_on = art.device
        self._metrics.swapped(_info(old) if old else None, _info(art))
        log.info("serving model %s from %s (%s)", art.model_version, path, art.dtype)

    def _version(self) -> str | None:
        return self._art.model_version if self._art is not None else None

    # ------------------------------------------------------------------ requests
    def health(self) -> tuple[int, dict]:
        if self._art is None:
            return 503, RequestError(503, "not_ready", "no model loaded").body()
        return 200, {
            "status": "ok",
            "model_version": self._art.model_version,
            "dtype": self._art.dtype,
            "device": self._art.device,
            "last_reload_error": self._last_error,
            **({"request_log_error": self._log_error} if self._log_error else {}),
            **{f"{role}_model_version": a.model_version for role, (_, a) in self._side.items()},
        }

    def check_health(self) -> None:
        if self._art is None:
            raise RuntimeError("no model loaded")

    async def _health(self) -> tuple[int, dict]:
        return self.health()

    async def _rank(self, body, fmt: str) -> tuple[int, dict]:
        return await self.rank(body, fmt)

    async def rank(self, body, fmt: str = "json") -> tuple[int, dict]:
        """Answer one request (``fmt``: "json" or "proto"): ``(HTTP status, body dict)``.
        ``body``: the request's bytes (gRPC requests arrive as their wire bytes:
        ``serving.grpc_service``), or a decoded ``RankRequest`` message, which is accepted too."""
        from serving.model import rank_response
        from serving.request import parse_json, parse_proto

        art = self._art
        if art is None:
            return 503, RequestError(503, "not_ready", "no model loaded").body()
        try:
            parse = parse_json if fmt == "json" else parse_proto
            req = parse(body, art.schema, self._limits)  # envelope, then ranking.data.encode
        except RequestError as e:
            return e.status, e.body()
        cols = req.features
        self._metrics.request(req.size)
        served_at = time.time()
        role = "primary"
        canary = self._side.get("canary")
        if canary is not None and self._to_canary(req):
            try:
                cols = self._encode_for(canary[1], req)
            except RequestError as e:
                return e.status, e.body()
            art, role = canary[1], "canary"
        t0 = time.perf_counter()
        try:
            probs, used = await self._scored(_Prepared(cols, req.size, art))
        except Exception as e:
            log.exception("forward failed")
            return 503, RequestError(
                503, "model_error", f"scoring failed: {type(e).__name__}"
            ).body()
        self._metrics.answered(used.model_version, role, time.perf_counter() - t0)
        if self._reqlog is not None:
            self._log(req, used, probs, served_at)
        if "shadow" in self._side:
            self._shadow(req, probs)
        return 200, rank_response(used, req.request_id, probs, req.top_k)

    # ------------------------------------------------------------------ rollout
    def _to_canary(self, req) -> bool:
        """Whether the canary answers ``req``: a stable hash of ``canary_key`` (the request id
        or a context feature's value) against ``canary_fraction``."""
        from serving.reqlog import sampled

        key = self.settings.canary_key
        value = req.request_id if key == "request_id" else req.context.get(key)
        return value is not None and sampled(str(value), self.settings.canary_fraction)

    def _encode_for(self, art, req):
        """``req``'s candidates encoded for ``art``'s schema (its vocabularies may differ from
        the serving model's)."""
        from ranking.data.encode import InvalidValue, encode

        try:
            return encode(
                art.schema,
                req.context,
                req.candidates,
                max_chars=self._limits.max_string_length,
                max_items=self._limits.max_list_items,
            )
        except InvalidValue as e:
            raise RequestError(422, e.code, e.message, e.field) from None

    def _shadow(self, req, probs) -> None:
        """Score a copy of ``req`` with the shadow model in the background (one at a time: a
        request arriving while the shadow is busy is skipped and counted); nothing of it
        reaches the client."""
        art = self._side["shadow"][1]
        if self._shadow_busy:
            self._metrics.shadowed(art.model_version, None, None, None, "skipped")
            return
        self._shadow_busy = True

        def score():
            from ranking.data.encode import merged_batch

            t0 = time.perf_counter()
            cols = self._encode_for(art, req)
            y = art.predict(merged_batch(art.schema, [cols])).numpy()
            return y, time.perf_counter() - t0

        async def run():
            try:
                y, seconds = await asyncio.to_thread(score)
                self._metrics.shadowed(art.model_version, probs[:, 0], y[:, 0], seconds, "scored")
            except Exception as e:
                log.warning("shadow scoring failed: %s: %s", type(e).__name__, e)
                self._metrics.shadowed(art.model_version, None, None, None, "failed")
            finally:
                self._shadow_busy = False

        self._shadow_task = asyncio.get_running_loop().create_task(run())  # kept: not GC'd

    def _log(self, req, art, probs, served_at: float) -> None:
        from ranking.data.servedlog import Served

        self._reqlog.offer(
            Served(
                req.request_id,
                served_at,
                art.model_version,
                art.schema,
                req.context,
                req.candidates,
                probs,
            )
        )

    async def _scored(self, prepared: _Prepared) -> tuple:
        """``(probabilities, artifact used)`` of one prepared request, through a formed batch
        or, alone in the replica, at once."""
        self._inflight += 1
        try:
            if self._inflight == 1 and not self._busy and not self._in_thread():
                # One pass of the loop lets requests that have already arrived get here too.
                await asyncio.sleep(0)
            if self._inflight == 1 and not self._busy and not self._in_thread():
                # Alone in the replica, with nothing being scored: a batch of one, scored at
                # once on the loop without the trip through Serve's batch queue (two task
                # switches; docs/SERVING.md).
                ((probs, used),) = await self._score_batch([prepared])
            else:
                self._score.set_batch_wait_timeout_s(self._batch_wait())
                probs, used = await self._score(prepared)
        finally:
            self._inflight -= 1
        return probs, used

    def _batch_wait(self) -> float:
        """How long the batch being formed waits for company. Serve forms the next batch as
        soon as the previous one is formed, not when it finishes: while a batch is being scored
        the next can wait up to about that batch's scoring time (capped by
        ``max_batch_wait_s``) for free, since it cannot start earlier; that turns one-request
        batches under load into full ones. Otherwise ``batch_wait_timeout_s``, or no wait at
        all for a request alone in the replica."""
        if self._busy:
            return max(self._wait_s, min(self._batch_s, self._max_wait_s))
        return self._wait_s if self._inflight > 1 else 0.0

    def _in_thread(self) -> bool:
        """Whether a formed batch is scored in a worker thread (requests are parsed meanwhile)
        or on the loop. A thread pays for itself only when the forward's operators are long
        enough to leave the GIL free: with a small model the forward thread and the loop's
        request parsing fight for the GIL at every operator (the measurements:
        docs/SERVING.md).
        ``auto``: a thread once formed batches take longer than ``THREAD_AFTER_S``."""
        if self._forward_in_thread == "auto":
            return self._batch_s > THREAD_AFTER_S
        return bool(self._forward_in_thread)

    @serve.batch(
        max_batch_size=RankerSettings.max_batch_size,
        batch_wait_timeout_s=RankerSettings.batch_wait_timeout_s,
        batch_size_fn=_candidates,
    )
    async def _score(self, items: list[_Prepared]) -> list:
        """A batch formed by Serve (``@serve.batch``), scored by ``_score_batch``."""
        return await self._score_batch(items)

    async def _score_batch(self, items: list[_Prepared]) -> list:
        """Score a batch: one forward per model (normally one), on the user-code event loop
        or, with ``forward_in_thread``, in a worker thread."""
        t0 = time.perf_counter()
        self._busy += 1
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(items):
            groups.setdefault(id(p.art), []).append(i)
        out: list = [None] * len(items)
        try:
            for idx in groups.values():
                art = items[idx[0]].art
                batch = [items[i] for i in idx]
                if self._in_thread():
                    probs = await asyncio.to_thread(self._forward, art, batch)
                else:  # on the loop: requests arriving meanwhile wait in Serve's queue
                    probs = self._forward(art, batch)
                start = 0
                for i in idx:
                    out[i] = (probs[start : start + items[i].size], art)
                    start += items[i].size
        finally:
            self._busy -= 1
        seconds = time.perf_counter() - t0
        self._batch_s = seconds if not self._batch_s else 0.7 * self._batch_s + 0.3 * seconds
        self._metrics.batch(len(items), _candidates(items), seconds)
        return out

    def _forward(self, art, items: list[_Prepared]):
        """The formed batch's probabilities: its requests' features merged, one forward."""
        from ranking.data.encode import merged_batch

        batch = merged_batch(art.schema, [p.columns for p in items])
        return art.predict(batch).numpy()
