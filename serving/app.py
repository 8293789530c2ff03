"""The Ray Serve application: a batching ``Ranker`` that also speaks the wire protocols, or, as
an option, a thin ``RankIngress`` in front of it.

The wire protocols live in ``serving/front.py``, the ``Ranker`` (the model, batching, model
swaps) in ``serving/ranker.py``, the thin ``RankIngress`` in ``serving/ingress.py``; this module
only puts them together (``import_path: serving.app:build``).

Topologies (``applications[].args.ingress`` in ``deploy/serve.yaml``):

- ``ranker`` (default): the ``Ranker`` is the application's ingress. One Serve hop (proxy ->
  replica), as the framework's own no-op floor: an extra ingress -> ranker hop costs more than
  the default model's forward (docs/SERVING.md).
- ``separate``: ``RankIngress`` (thin, no model) in front of the ``Ranker``, for scaling HTTP/gRPC
  termination apart from the model replicas. It also sends a request lost by a dead ``Ranker``
  replica once more, where the default leaves that to the client (Serve's proxy answers it
  with a non-JSON 500); the extra hop's cost and the trade-off: docs/SERVING.md, "Faults".

Deployment names, replica counts, batching and limits live in ``deploy/serve.yaml``; the values
here are only defaults for ``serve.run(build({}))`` in tests and notebooks.
"""

from __future__ import annotations

from serving.ingress import RankIngress
from serving.ranker import Ranker

__all__ = ["TOPOLOGIES", "RankIngress", "Ranker", "build"]


TOPOLOGIES = ("ranker", "separate")


def build(args: dict | None = None):
    """The application (``import_path: serving.app:build`` in deploy/serve.yaml); ``args``:
    ``ingress`` = ``ranker`` (default: the Ranker answers HTTP/gRPC itself) or ``separate``
    (a RankIngress deployment in front)."""
    args = dict(args or {})
    ingress = args.pop("ingress", "ranker")
    if args:
        raise ValueError(f"application args: unknown keys {sorted(args)} (expected 'ingress')")
    if ingress not in TOPOLOGIES:
        raise ValueError(f"application args.ingress: expected one of {TOPOLOGIES}, got {ingress!r}")
    if ingress == "ranker":
        return Ranker.bind()
    return RankIngress.bind(Ranker.bind())
