"""Request logging in the ``Ranker``: answered requests written to Parquet by a background
thread, in the format of ``ranking.data.servedlog`` (one row per candidate, the features as
received and the scores served), for ``mixrank data join-labels`` and ``mixrank check-consistency``.

``RequestLog.offer`` never blocks and never raises: a full queue drops the request and counts it.
Files go to ``<dir>/hour=YYYY-MM-DD-HH/model_version=<v>/part-<time>-<uuid>.parquet`` (the hour
of ``served_at``, UTC). On a local file system every file is written under a hidden temporary
name and renamed into place, so a reader never sees a partial file; object stores make a
finished PUT visible at once, so there the file is written under its final name.

Which requests are logged is a stable function of the request id (``sampled``): the same request
id is always logged or never, at any replica.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
import zlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ranking.data.servedlog import Served, as_uri, hour_of, served_table

log = logging.getLogger("ray.serve")


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is logged at ``rate``: CRC-32 of its id against ``rate * 2**32``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(request_id.encode("utf-8", "surrogatepass")) < rate * 4294967296.0


class RequestLog:
    """A background Parquet writer of served requests (see the module docstring).

    ``directory``: a local path or a URI pyarrow opens (``s3://bucket/prefix``);
    ``sample_rate``: the share of requests logged (by request id); ``queue_size``: requests
    waiting to be written, beyond which ``offer`` drops; a file is written when
    ``max_rows_per_file`` rows wait or the oldest waiting request is ``flush_seconds`` old.
    ``on_written(rows)`` / ``on_dropped(requests)``: metric callbacks, called from the writer
    thread / the caller of ``offer``.
    """

    def __init__(
        self,
        directory: str,
        *,
        sample_rate: float = 1.0,
        queue_size: int = 4096,
        flush_seconds: float = 5.0,
        max_rows_per_file: int = 262144,
        on_written=None,
        on_dropped=None,
    ):
        self.directory = directory
        self.sample_rate = sample_rate
        self.flush_seconds = flush_seconds
        self.max_rows_per_file = max_rows_per_file
        self._on_written = on_written or (lambda rows: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self.fs, self.root = pafs.FileSystem.from_uri(as_uri(directory))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._flushed = threading.Condition()
        self._flush_seq = 0  # flushes asked for
        self._done_seq = 0  # flushes done
        self._closed = False
        self.dropped = 0
        self.written_rows = 0
        self.files = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="mixrank-request-log", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------- request path
    def offer(self, item: Served) -> bool:
        """Queue one answered request (sampled by request id). Never blocks or raises: a full
        queue (or a closed log) drops it and counts it."""
        if not sampled(item.request_id, self.sample_rate):
            return False
        if self._closed:
            self._drop()
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        self.dropped += 1
        with contextlib.suppress(Exception):  # a metric must never fail a request
            self._on_dropped(1)

    # --------------------------------------------------------------- control
    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything offered so far; True once it is on disk (False on timeout)."""
        with self._flushed:
            self._flush_seq += 1
            want = self._flush_seq
        self._queue.put(_FLUSH)  # may block briefly on a full queue: a control path
        with self._flushed:
            return self._flushed.wait_for(lambda: self._done_seq >= want, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush and stop the writer; later offers are dropped."""
        if self._closed:
            return True
        ok = self.flush(timeout)
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return ok

    # --------------------------------------------------------------- writer thread
    def _run(self) -> None:
        pending: list[Served] = []
        rows = 0
        oldest = None
        while True:
            wait = None if oldest is None else max(0.0, oldest + self.flush_seconds - time.time())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._write(pending)
                return
            if item is _FLUSH:
                self._write(pending)
                pending, rows, oldest = [], 0, None
                with self._flushed:
                    self._done_seq += 1
                    self._flushed.notify_all()
                continue
            if item is not None:
                pending.append(item)
                rows += len(item.candidates)
                oldest = oldest or time.time()
            if pending and (
                rows >= self.max_rows_per_file or time.time() - oldest >= self.flush_seconds
            ):
                self._write(pending)
                pending, rows, oldest = [], 0, None

    def _write(self, items: list[Served]) -> None:
        """One file per (hour, model_version) of ``items``; a failure is logged and counted,
        never raised (the service keeps answering)."""
        groups: dict[tuple[str, str], list[Served]] = {}
        for s in items:
            groups.setdefault((hour_of(s.served_at), s.model_version), []).append(s)
        for (hour, version), group in groups.items():
            try:
                table = served_table(group)
                self._put(f"hour={hour}/model_version={version}", table)
                self.written_rows += table.num_rows
                self.files += 1
                self._on_written(table.num_rows)
            except Exception as e:
                self.errors += 1
                self.dropped += len(group)
                log.error("request log: could not write %d requests: %s", len(group), e)
                with contextlib.suppress(Exception):
                    self._on_dropped(len(group))

    def _put(self, sub: str, table: pa.Table) -> None:
        folder = f"{self.root.rstrip('/')}/{sub}"
        self.fs.create_dir(folder, recursive=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        if not self.local:
            pq.write_table(table, f"{folder}/{name}", filesystem=self.fs)
            return
        tmp = f"{folder}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, f"{folder}/{name}")  # rename(2): atomic on one file system


_FLUSH = object()
_STOP = object()
