"""The deployments' ``user_config``: every key, its default and its check, in one place.

``deploy/serve.yaml`` sets these keys for operators (the Helm chart renders that file, overriding
a few from its values); ``Ranker.reconfigure`` and ``RankIngress.reconfigure`` read them through
``RankerSettings.from_user_config`` / ``IngressSettings.from_user_config``; ``serving.config``
derives the known keys from the fields. ``tests/test_serving_settings.py`` checks that the file's
values are these defaults and that the chart's value schema types agree with the fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

DTYPES = ("auto", "fp32", "bf16", "int8", "fp8")


def _check(cls, config: Any) -> dict:
    """Known keys only (a typo must not silently fall back to a default), each of its field's
    type; returns the dict of values to construct ``cls`` with."""
    if not isinstance(config, dict):
        raise ValueError(f"user_config: expected a mapping, got {type(config).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:  # a typo must not silently fall back to a default
        raise ValueError(f"user_config: unknown keys {unknown} (expected {sorted(fields)})")
    out = {}
    for key, value in config.items():
        kind = cls._KINDS[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"user_config.{key}: expected an integer, got {value!r}")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"user_config.{key}: expected a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"user_config.{key}: expected a finite number, got {value!r}")
            value = float(value)
        if kind is str and not isinstance(value, str):
            raise ValueError(f"user_config.{key}: expected a string, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class IngressSettings:
    """``user_config`` of a deployment that answers HTTP/gRPC (``RankIngress``; the Ranker
    when it is the application's ingress)."""

    max_body_bytes: int = 8 << 20  # larger bodies get 413

    _KINDS: ClassVar[dict] = {"max_body_bytes": int}

    @classmethod
    def from_user_config(cls, config: dict) -> IngressSettings:
        s = cls(**_check(cls, config))
        if s.max_body_bytes < 1:
            raise ValueError(
                f"user_config.max_body_bytes: must be positive, got {s.max_body_bytes}"
            )
        return s


@dataclass(frozen=True)
class RankerSettings:
    """``user_config`` of the ``Ranker`` deployment.

    Example::

        s = RankerSettings.from_user_config({"artifact": "/models/current", "max_batch_size": 2048})
        s.max_batch_size, s.batch_wait_timeout_s  # 2048, 0.004
    """

    artifact: str = ""  # the artifact directory (required)
    dtype: str = "auto"  # auto: the artifact's dtype; fp32 | bf16 | int8 | fp8 to force
    device: str = "auto"  # auto: cuda when the replica has a GPU (num_gpus), else cpu
    max_batch_size: int = 4096  # candidates per formed batch (batch_size_fn)
    batch_wait_timeout_s: float = 0.004  # only while other requests are in flight
    max_batch_wait_s: float = 0.1  # while a batch is scored, the next waits up to its time
    max_candidates: int = 1024  # larger candidate lists get 413
    max_string_length: int = 1024
    max_list_items: int = 1024
    torch_threads: int = 1  # intra-op threads per replica (0: torch's default)
    forward_in_thread: bool | str = "auto"  # auto | true | false (docs/SERVING.md)
    max_body_bytes: int = IngressSettings.max_body_bytes  # when it is the ingress
    # request logging (serving/reqlog.py): "" = off; a directory or a URI pyarrow opens
    log_dir: str = ""
    log_sample_rate: float = 1.0  # share of requests logged, chosen by request id
    log_queue_size: int = 4096  # requests waiting for the writer; beyond, dropped and counted
    log_flush_seconds: float = 5.0  # a file at least this often while requests are logged
    # rollout (serving/rollout.py; `mixrank rollout` sets these through Serve's REST API)
    shadow_artifact: str = ""  # also score a copy of traffic with this model, answer nothing
    canary_artifact: str = ""  # answer canary_fraction of requests with this model
    canary_fraction: float = 0.0
    canary_key: str = "request_id"  # what the stable hash reads: request_id or a context feature
    previous_artifact: str = ""  # the model before the last promotion (`mixrank rollback`)

    _KINDS: ClassVar[dict] = {
        "artifact": str,
        "dtype": str,
        "device": str,
        "max_batch_size": int,
        "batch_wait_timeout_s": float,
        "max_batch_wait_s": float,
        "max_candidates": int,
        "max_string_length": int,
        "max_list_items": int,
        "torch_threads": int,
        "forward_in_thread": object,
        "max_body_bytes": int,
        "log_dir": str,
        "log_sample_rate": float,
        "log_queue_size": int,
        "log_flush_seconds": float,
        "shadow_artifact": str,
        "canary_artifact": str,
        "canary_fraction": float,
        "canary_key": str,
        "previous_artifact": str,
    }

    @classmethod
    def from_user_config(cls, config: dict) -> RankerSettings:
        s = cls(**_check(cls, config))
        if not s.artifact:
            raise ValueError("user_config: 'artifact' (the artifact directory) is required")
        if s.dtype not in DTYPES:
            raise ValueError(f"user_config.dtype: expected one of {DTYPES}, got {s.dtype!r}")
        if not (s.device in ("auto", "cpu", "cuda") or s.device.startswith("cuda:")):
            raise ValueError(
                f"user_config.device: expected auto, cpu, cuda or cuda:N, got {s.device!r}"
            )
        if not (isinstance(s.forward_in_thread, bool) or s.forward_in_thread == "auto"):
            raise ValueError(
                f"user_config: forward_in_thread must be true, false or auto, got "
                f"{s.forward_in_thread!r}"
            )
        for key in ("max_batch_size", "max_candidates", "max_string_length", "max_list_items",
                    "max_body_bytes", "log_queue_size"):  # fmt: skip
            if getattr(s, key) < 1:
                raise ValueError(f"user_config.{key}: must be positive, got {getattr(s, key)}")
        if s.torch_threads < 0:
            raise ValueError(f"user_config.torch_threads: must be >= 0, got {s.torch_threads}")
        for key in ("batch_wait_timeout_s", "max_batch_wait_s"):
            if getattr(s, key) < 0:
                raise ValueError(f"user_config.{key}: must be >= 0, got {getattr(s, key)}")
        if not 0.0 <= s.log_sample_rate <= 1.0:
            raise ValueError(
                f"user_config.log_sample_rate: expected a share in [0, 1], got {s.log_sample_rate}"
            )
        if not 0.0 <= s.canary_fraction <= 1.0:
            raise ValueError(
                f"user_config.canary_fraction: expected a share in [0, 1], got {s.canary_fraction}"
            )
        if s.canary_fraction > 0 and not s.canary_artifact:
            raise ValueError("user_config.canary_fraction: set, but no canary_artifact")
        if not s.canary_key:
            raise ValueError("user_config.canary_key: must name request_id or a feature")
        if s.log_flush_seconds <= 0:
            raise ValueError(
                f"user_config.log_flush_seconds: must be > 0, got {s.log_flush_seconds}"
            )
        if s.max_candidates > s.max_batch_size:
            raise ValueError(
                f"user_config: max_candidates ({s.max_candidates}) must be <= max_batch_size "
                f"({s.max_batch_size}): a request is never split across batches"
            )
        return s

    def limits(self):
        """The request limits these settings give (``serving.request.Limits``)."""
        from serving.request import Limits

        return Limits(
            max_candidates=self.max_candidates,
            max_string_length=self.max_string_length,
            max_list_items=self.max_list_items,
        )

    @property
    def ingress(self) -> IngressSettings:
        return IngressSettings(max_body_bytes=self.max_body_bytes)


def known_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
