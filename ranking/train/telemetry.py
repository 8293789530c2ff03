"""What a training job shows while it runs: progress lines with rate and ETA (stderr),
``metrics.jsonl`` records, and a Prometheus endpoint, all from rank 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import ClassVar


def fmt_eta(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RankZeroLog:
    """Progress lines (stderr) and ``metrics.jsonl`` records, from rank 0 only."""

    def __init__(self, rank: int, path: Path):
        self.rank = rank
        self.path = path

    def record(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), **rec}) + "\n")

    def progress(self, line: str) -> None:
        if self.rank == 0:
            print(f"[mixrank] {line}", file=sys.stderr, flush=True)

    info = progress


class PromExporter:
    """Training metrics on a Prometheus endpoint (rank 0, when ``train.prometheus_port`` > 0).
    One endpoint and one set of gauges per port for the life of the process: the runs of a
    several-run worker share them."""

    _gauges: ClassVar[dict[int, dict]] = {}

    def __init__(self, rank: int, port: int):
        self.gauges = None
        if rank != 0 or port <= 0:
            return
        if port in PromExporter._gauges:
            self.gauges = PromExporter._gauges[port]
            return
        from prometheus_client import Gauge, start_http_server

        start_http_server(port)
        self.gauges = {
            "step": Gauge("mixrank_train_step", "Optimiser steps done"),
            "loss": Gauge("mixrank_train_loss", "Mean training loss since the last log line"),
            "samples_per_s": Gauge("mixrank_train_samples_per_second", "Training throughput"),
            "lr": Gauge("mixrank_train_learning_rate", "Dense learning rate"),
            "eval_auc": Gauge("mixrank_train_eval_auc", "Validation AUC at the last evaluation"),
        }
        for g in self.gauges.values():  # nothing measured yet: a gap on a graph, not a 0
            g.set(float("nan"))
        PromExporter._gauges[port] = self.gauges

    def update(self, rec: dict) -> None:
        if self.gauges is None:
            return
        for k, g in self.gauges.items():
            if rec.get(k) is not None:
                g.set(rec[k])
