"""``mixrank bench serve``: the ranking service against the model's own forward, in one run.

For the default model (configs/demo.yaml shapes, Frappe schema) and a medium one (T=16, D=256,
L=2; configs/models/rankmixer_medium.yaml, Criteo schema), random weights, 256 candidates per
request:

- in-process: model forward p50 of the request's ``Batch`` per ``--dtypes`` (default fp32 and bf16; the fastest is served)
  timed back to back, and the same forward "paced" (the CPU idle for 10 ms before each call, as
  a request at concurrency 1 finds it); the full in-process answer p50 (parse + features +
  forward) of the same JSON body;
- raw batched forward throughput (candidates/s of 8 requests' rows in one forward);
- per ingress mode (``--ingress``): ``proxy``, Serve's HTTP/gRPC proxy actor in front of the
  replica (the default deployment), and ``direct``, Serve's throughput-optimized mode in which
  clients talk to the replica's own HTTP/gRPC servers (``serving.config.start(direct_ingress=
  True)``):
  - the framework floor: p50 of a no-op Serve deployment that parses the same body and returns
    as many zeros (HTTP, concurrency 1), and its candidates/s at concurrency 8 (the ceiling any
    model could reach through that path on this machine);
  - end to end ``/v1/rank`` p50/p99 at concurrency 1 over HTTP and over gRPC, and candidates/s
    at concurrency 8 (HTTP), with deploy/serve.yaml (one Ranker replica, one torch thread);
  - the forward floor (``benchmarks.serve_floors.ForwardFloor``): the Ranker's own batching and forward,
    but per request only the no-op's work (decode the body, answer zeros), at concurrency 1
    (p50) and 8 (candidates/s). ``floor_*_ratio`` are its ratios against the same references
    as ours: the most any request path could reach through Ray Serve with this model here.
    ``*_vs_floor``: ours over it, also as the median of ``--slices`` alternating short A/B
    slices (``*_vs_floor_paired``): what our own request work (validation, feature hashing,
    the batch merge, the answer) costs.

Targets: e2e p50 <= 1.15 x (forward p50 + no-op p50) (``latency_ratio``; also printed with the
paced forward, ``latency_ratio_paced``, and against the in-process answer,
``latency_ratio_vs_answer``); candidates/s at concurrency 8 >= 0.7 x raw batched forward
throughput. The references above are the means of measurements before and after all of a
model's served phases; the host's speed drifts by up to 2x over a minute, so each mode also
measures ``--slices`` short c=1 and c=8 load slices, each against a forward and raw throughput
measured in-process right before and after it, and prints the medians of those per-slice ratios
(``latency_ratio_paired``, ``throughput_ratio_paired``; the slices in ``*_slices``). The load generator runs in this process and shares the CPUs with Ray: on a 2-core
machine that is part of what is measured.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = 256


def add_arguments(parser) -> None:
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load phase")
    parser.add_argument("--models", default="default,medium", help="comma-separated subset")
    parser.add_argument("--iters", type=int, default=30, help="in-process timing iterations")
    parser.add_argument(
        "--ingress",
        default="proxy,direct",
        help="comma-separated: proxy (Serve's HTTP/gRPC proxy actor, the default deployment) "
        "and/or direct (Serve's throughput-optimized mode: clients talk to the replica's own "
        "servers); each gets its own no-op floor",
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=4,
        help="paired ratios: after the main phases, c=1 and c=8 load again in this many short "
        "slices, each against in-process references taken right before and after it (0: off)",
    )
    parser.add_argument(
        "--sequences",
        action="store_true",
        help="instead: the cost of a behaviour sequence (target attention) at 256 candidates, "
        "histories of 50 and 256 items, against the same model without it",
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="comma-separated dtypes timed in-process (fp32, bf16, int8); the fastest is served",
    )
    parser.add_argument(
        "--inference",
        choices=["default", "preset"],
        default="default",
        help="the artifacts' inference: section: default options, or the model preset's own "
        "(configs/models/rankmixer_medium.yaml: micro-batches of 256, fused blocks)",
    )
    parser.add_argument("--plot", default=None, help="write the ratios against targets (PNG)")
    parser.add_argument(
        "--replot",
        nargs="+",
        default=None,
        metavar="FILE",
        help="with --plot: plot the JSON lines of earlier runs (their output) instead of measuring",
    )


def _models() -> dict:
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    medium = yaml.safe_load((REPO / "configs" / "models" / "rankmixer_medium.yaml").read_text())
    return {
        "default": (demo["schema"], demo["model"], demo.get("inference")),
        "medium": (medium["schema"], medium["model"], medium.get("inference")),
    }


def _p(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def _time(fn, iters: int, gap: float = 0.0) -> list[float]:
    """Seconds of ``iters`` calls after one warm-up call. With ``gap``, the CPU idles that long
    before each call, as for requests at concurrency 1: on our VMs the same call then runs
    1.2-2x slower than back to back (its caches and the vCPU cool down; docs/BENCHMARKS.md)."""
    fn()
    out = []
    for _ in range(iters):
        if gap:
            time.sleep(gap)
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


PACE_S = 0.01  # idle gap before each paced call: a request arriving at an idle server


def in_process(art, request: dict, iters: int, dtypes=("fp32", "bf16")) -> dict:
    """Forward p50 per dtype, full-answer p50, raw batched forward candidates/s."""
    import torch

    from ranking.data.encode import merged_batch
    from serving.model import rank_response
    from serving.request import Limits, parse_json

    torch.set_num_threads(1)  # as deploy/serve.yaml's torch_threads
    body = json.dumps(request).encode()
    req = parse_json(body, art.schema, Limits())
    cols = req.features
    batch = merged_batch(art.schema, [cols])
    big = merged_batch(art.schema, [cols] * 8)
    out = {}
    for dtype in dtypes:
        art.dtype = dtype
        out[f"forward_p50_ms_{dtype}"] = _p(_time(lambda: art.predict(batch), iters), 0.5) * 1e3
    art.dtype = min(dtypes, key=lambda d: out[f"forward_p50_ms_{d}"])
    out["dtype"] = art.dtype

    def answer():
        r = parse_json(body, art.schema, Limits())
        b = merged_batch(art.schema, [r.features])
        rank_response(art, r.request_id, art.predict(b).numpy(), None)

    out["answer_p50_ms"] = _p(_time(answer, iters), 0.5) * 1e3
    out["forward_paced_p50_ms"] = _p(_time(lambda: art.predict(batch), iters, PACE_S), 0.5) * 1e3
    out["answer_paced_p50_ms"] = _p(_time(answer, iters, PACE_S), 0.5) * 1e3
    sec = statistics.median(_time(lambda: art.predict(big), max(5, iters // 3)))
    out["raw_forward_cand_per_s"] = big.size / sec
    return out


def _again(art, request: dict, iters: int, dtype: str) -> dict:
    """``in_process`` for the served dtype only (after the served phases)."""
    out = in_process(art, request, iters, dtypes=(dtype,))
    return {k: v for k, v in out.items() if k != "dtype"}


def _probe(art, request: dict, dtype: str, iters: int = 10) -> dict:
    """A short in-process reference taken between load slices (the replica idle): forward p50
    of the request's ``Batch`` back to back, and the raw batched forward's candidates/s."""
    import torch

    from ranking.data.encode import merged_batch
    from serving.request import Limits, parse_json

    torch.set_num_threads(1)
    art.dtype = dtype
    cols = parse_json(json.dumps(request).encode(), art.schema, Limits()).features
    batch, big = merged_batch(art.schema, [cols]), merged_batch(art.schema, [cols] * 8)
    fwd = _p(_time(lambda: art.predict(batch), iters), 0.5) * 1e3
    sec = statistics.median(_time(lambda: art.predict(big), 3))
    return {"forward_ms": fwd, "raw_cand_per_s": big.size / sec}


def _sliced(load, probe, duration: float, slices: int) -> list[tuple[dict, dict]]:
    """``slices`` load runs of ``duration / slices`` seconds with a ``probe`` before the first
    and after each: per slice, its load result and the mean of the probes around it."""
    before = probe()
    out = []
    for _ in range(slices):
        res = load(duration / slices)
        after = probe()
        out.append((res, {k: (before[k] + after[k]) / 2 for k in before}))
        before = after
    return out


def serve_phase(
    artifact: Path,
    dtype: str,
    request: dict,
    duration: float,
    after=None,
    ingress="proxy",
    probe=None,
    slices: int = 0,
) -> dict:
    from ray import serve

    from serving import config
    from serving.client import free_port
    from serving.loadtest import run_load

    http, grpc = free_port(), free_port()
    cfg = config.load_config(
        artifact=artifact,
        http_port=http,
        grpc_port=grpc,
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": 1, "user_config": {"dtype": dtype}}},
    )
    cfg["applications"].append(
        {
            "name": "noop",
            "route_prefix": "/noop",
            "import_path": "benchmarks.serve_floors:build_noop",
        }
    )
    # the framework's floor with the forward in it: the Ranker's deployment settings, batching
    # and forward; per request only the no-op's work (benchmarks.serve_floors.ForwardFloor)
    app = next(a for a in cfg["applications"] if a["name"] == config.APP)
    ranker = next(d for d in app["deployments"] if d["name"] == config.RANKER)
    cfg["applications"].append(
        {
            "name": "forward_floor",
            "route_prefix": "/floor",
            "import_path": "benchmarks.serve_floors:build_forward_floor",
            "deployments": [{**copy.deepcopy(ranker), "name": "ForwardFloor"}],
        }
    )
    direct = ingress == "direct"
    out = {}
    config.start(cfg, direct_ingress=direct)
    try:
        url, noop_url = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{http}/noop"
        ff_url = f"http://127.0.0.1:{http}/floor"
        if direct:  # the replicas' own servers (they bind http_options.host: loopback here)
            ours, noop = config.ingress_targets(), config.ingress_targets("noop")
            ff = config.ingress_targets("forward_floor")
            url = f"http://127.0.0.1:{ours['http'][0][1]}"
            noop_url = f"http://127.0.0.1:{noop['http'][0][1]}/noop"
            ff_url = f"http://127.0.0.1:{ff['http'][0][1]}/floor"
            grpc = ours["grpc"][0][1]
        floor = run_load(noop_url, request, concurrency=1, duration=duration, progress=None)
        out["noop_p50_ms"] = floor["p50_ms"]
        h1 = run_load(url, request, concurrency=1, duration=duration, progress=None)
        g1 = run_load(url, request, concurrency=1, duration=duration, grpc_port=grpc, progress=None)
        h8 = run_load(url, request, concurrency=8, duration=duration, progress=None)
        f8 = run_load(noop_url, request, concurrency=8, duration=duration, progress=None)
        ff1 = run_load(ff_url, request, concurrency=1, duration=duration, progress=None)
        ff8 = run_load(ff_url, request, concurrency=8, duration=duration, progress=None)
        out.update(
            http_p50_ms=h1["p50_ms"],
            http_p99_ms=h1["p99_ms"],
            grpc_p50_ms=g1["p50_ms"],
            grpc_p99_ms=g1["p99_ms"],
            c8_cand_per_s=h8["candidates_per_s"],
            c8_p50_ms=h8["p50_ms"],
            noop_c8_cand_per_s=f8["candidates_per_s"],
            floor_p50_ms=ff1["p50_ms"],
            floor_c8_cand_per_s=ff8["candidates_per_s"],
            errors=sum(sum(r["errors"].values()) for r in (floor, h1, g1, h8, f8, ff1, ff8)),
        )
        if probe is not None and slices > 0:
            # Drift-robust ratios: each short load slice against in-process references taken
            # just before and after it (the host's speed drifts by up to 2x over a minute).
            lat = _sliced(
                lambda d: run_load(url, request, concurrency=1, duration=d, progress=None),
                probe,
                duration,
                slices,
            )
            thr = _sliced(
                lambda d: run_load(url, request, concurrency=8, duration=d, progress=None),
                probe,
                duration,
                slices,
            )
            out["latency_ratio_slices"] = [
                r["p50_ms"] / (ref["forward_ms"] + out["noop_p50_ms"]) for r, ref in lat
            ]
            out["throughput_ratio_slices"] = [
                r["candidates_per_s"] / ref["raw_cand_per_s"] for r, ref in thr
            ]
            out["errors"] += sum(sum(r["errors"].values()) for r, _ in (*lat, *thr))
            # ours against the forward floor, alternating short slices (A/B under the same drift)
            vs_lat, vs_thr = [], []
            for _ in range(slices):
                for c, acc, key in ((1, vs_lat, "p50_ms"), (8, vs_thr, "candidates_per_s")):
                    a = run_load(url, request, concurrency=c, duration=duration / slices, progress=None)  # fmt: skip
                    b = run_load(ff_url, request, concurrency=c, duration=duration / slices, progress=None)  # fmt: skip
                    acc.append(a[key] / b[key])
                    out["errors"] += sum(a["errors"].values()) + sum(b["errors"].values())
            out["latency_vs_floor_slices"], out["throughput_vs_floor_slices"] = vs_lat, vs_thr
        if after is not None:  # e.g. the in-process references again, Ray up and idle
            out["after"] = after()
    finally:
        serve.shutdown()
        config.stop()
    return out


REFERENCES = (
    "forward_p50_ms_fp32",
    "forward_p50_ms_bf16",
    "forward_p50_ms_int8",
    "answer_p50_ms",
    "forward_paced_p50_ms",
    "answer_paced_p50_ms",
    "raw_forward_cand_per_s",
)


def _references(before: dict, after: dict) -> dict:
    """This host's speed drifts by up to 2x over seconds to minutes: the in-process references
    are measured before and after the served phases (same dtype) and their means are the
    references; both are kept."""
    rec = {"dtype": before["dtype"]}
    for key in (k for k in REFERENCES if k in before):  # the dtypes timed (--dtypes)
        rec[key] = (before[key] + after[key]) / 2 if key in after else before[key]
        if key in after:
            rec[f"{key}_before"], rec[f"{key}_after"] = before[key], after[key]
    return rec


def _ratios(rec: dict) -> None:
    """The issue's definition: e2e p50 over (model forward p50 + no-op floor p50), the forward
    timed back to back; ``_paced``: the forward timed as a request at concurrency 1 meets it
    (idle CPU before each call); ``_vs_answer``: the in-process answer (parse + features +
    forward) as reference. Throughput: c=8 candidates/s over the raw batched forward's, and the
    no-op deployment's c=8 candidates/s over the same (the framework's own ceiling)."""
    fwd = rec[f"forward_p50_ms_{rec['dtype']}"]
    rec["latency_ratio"] = rec["http_p50_ms"] / (fwd + rec["noop_p50_ms"])
    rec["latency_ratio_paced"] = rec["http_p50_ms"] / (
        rec["forward_paced_p50_ms"] + rec["noop_p50_ms"]
    )
    rec["latency_ratio_vs_answer"] = rec["http_p50_ms"] / (
        rec["answer_p50_ms"] + rec["noop_p50_ms"]
    )
    rec["latency_target"] = 1.15
    rec["throughput_ratio"] = rec["c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
    rec["noop_throughput_ratio"] = rec["noop_c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
    rec["throughput_target"] = 0.7
    # against the forward floor (the Ranker's batching and forward, the no-op's request work):
    # what the framework lets any request path reach, and our share of it
    rec["floor_latency_ratio"] = rec["floor_p50_ms"] / (fwd + rec["noop_p50_ms"])
    rec["floor_throughput_ratio"] = rec["floor_c8_cand_per_s"] / rec["raw_forward_cand_per_s"]
    rec["latency_vs_floor"] = rec["http_p50_ms"] / rec["floor_p50_ms"]
    rec["throughput_vs_floor"] = rec["c8_cand_per_s"] / rec["floor_c8_cand_per_s"]
    for key in ("latency_ratio", "throughput_ratio", "latency_vs_floor", "throughput_vs_floor"):
        if rec.get(f"{key}_slices"):
            rec[f"{key}_paired"] = statistics.median(rec[f"{key}_slices"])


def run(args) -> int:
    from ranking.errors import UserError

    if args.replot:
        if not args.plot:
            raise UserError("--replot: name the PNG to write with --plot")
        return replot(args.replot, args.plot)

    if args.sequences:
        return sequences(args)
    modes = [m.strip() for m in args.ingress.split(",") if m.strip()]
    if not modes or set(modes) - {"proxy", "direct"}:
        raise UserError(f"--ingress: expected proxy and/or direct, got {args.ingress!r}")
    from benchmarks.artifacts import make_artifact
    from benchmarks.common import emit, machine_info, table
    from ranking.export import load_artifact
    from ranking.features import load_schema
    from serving.loadtest import synthetic_request

    models = _models()
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or set(dtypes) - {"fp32", "bf16", "int8"}:
        raise UserError(f"--dtypes: expected some of fp32, bf16, int8, got {args.dtypes!r}")
    records = []
    emit({"bench": "serve", "machine": machine_info()})
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        for name in args.models.split(","):
            schema_name, model_cfg, inference = models[name]
            inference = inference if args.inference == "preset" else None
            path = make_artifact(
                Path(tmp) / name, schema=schema_name, model=model_cfg, inference=inference
            )
            art = load_artifact(path)
            request = synthetic_request(load_schema(schema_name), CANDIDATES, seed=1)
            before = in_process(art, request, args.iters, dtypes)
            phases = {}
            for i, mode in enumerate(modes):
                last = i == len(modes) - 1
                phases[mode] = serve_phase(
                    path,
                    before["dtype"],
                    request,
                    args.duration,
                    after=functools.partial(_again, art, request, args.iters, before["dtype"])
                    if last
                    else None,
                    ingress=mode,
                    probe=functools.partial(_probe, art, request, before["dtype"]),
                    slices=args.slices,
                )
            after = phases[modes[-1]].pop("after")
            for mode in modes:
                rec = {"bench": "serve", "model": name, "ingress": mode, "candidates": CANDIDATES}
                rec.update(_references(before, after))
                rec.update(phases[mode])
                _ratios(rec)
                emit(rec)
                records.append(rec)
    if not args.json_only:
        cols = [
            "model", "ingress", "dtype", "forward_p50_ms_fp32", "forward_p50_ms_bf16",
            "forward_p50_ms_int8",
            "forward_paced_p50_ms", "answer_p50_ms", "noop_p50_ms", "http_p50_ms", "http_p99_ms",
            "grpc_p50_ms", "grpc_p99_ms", "latency_ratio", "latency_ratio_paced",
            "latency_ratio_vs_answer", "latency_ratio_paired", "raw_forward_cand_per_s",
            "c8_cand_per_s", "throughput_ratio", "throughput_ratio_paired", "noop_c8_cand_per_s",
            "noop_throughput_ratio", "floor_p50_ms", "floor_latency_ratio", "floor_c8_cand_per_s",
            "floor_throughput_ratio", "latency_vs_floor_paired", "throughput_vs_floor_paired",
            "errors",
        ]  # fmt: skip
        table(records, cols)
    if args.plot:
        plot(records, args.plot)
    return 0


SEQ_MODEL = {
    "arch": "rankmixer",
    "dim": 64,
    "num_tokens": 8,
    "num_layers": 2,
    "ffn_mult": 2,
    "sequence": {"encoder": "target_attention"},
}


def _sequence_schemas() -> dict:
    """``none`` (the preset without its sequences), ``hist50``, ``hist256`` (max_length)."""
    from ranking.features import FeatureSchema, load_schema

    base = load_schema("synth_sequence").to_dict()
    out = {"none": {**base, "features": [f for f in base["features"] if f["kind"] != "sequence"]}}
    for n in (50, 256):
        feats = [{**f, "max_length": n} if f["kind"] == "sequence" else f for f in base["features"]]
        out[f"hist{n}"] = {**base, "features": feats}
    return {k: FeatureSchema.from_dict(v) for k, v in out.items()}


def sequences(args) -> int:
    """``--sequences``: p50 of the replica's whole answer in-process (parse, features, forward;
    the faster dtype) and end to end over HTTP through Serve at concurrency 1, for the
    sequence model (``SEQ_MODEL`` on the ``sequence`` preset's schema) with histories of 50 and
    256 items and for the same model without the sequence, at 256 candidates. The in-process
    p50s are taken in ``--slices`` alternating rounds (A/B/C under the same drift); ratios are
    the medians of the per-round ratios to ``none``. Target: at most 1.25x at 256 items."""
    import torch

    from benchmarks.common import emit, machine_info, table
    from ranking.export import load_artifact, write_artifact
    from ranking.model.config import ModelConfig
    from ranking.model.ranker import build_model
    from serving.loadtest import synthetic_request

    emit({"bench": "serve-sequences", "machine": machine_info()})
    rounds = max(args.slices, 3)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-seq-") as tmp:
        arts, reqs = {}, {}
        for name, fs in _sequence_schemas().items():
            torch.manual_seed(0)
            model = {k: v for k, v in SEQ_MODEL.items() if k != "sequence" or name != "none"}
            net = build_model(ModelConfig.from_dict(model), fs)
            config = {"name": f"seq-{name}", "schema": fs.to_dict(), "model": model}
            path = write_artifact(
                Path(tmp) / name, net.state_dict(), config=config, schema=fs, dtype="fp32",
                metrics={}, step=0,
            )  # fmt: skip
            arts[name] = (path, load_artifact(path))
            hist = None if name == "none" else int(name.removeprefix("hist"))
            reqs[name] = synthetic_request(fs, CANDIDATES, seed=1, history=hist)
        dtype = {n: in_process(a, reqs[n], args.iters)["dtype"] for n, (_, a) in arts.items()}
        answer = {n: [] for n in arts}
        forward = {n: [] for n in arts}
        for _ in range(rounds):
            for n, (_, art) in arts.items():
                got = _again(art, reqs[n], max(5, args.iters // rounds * 2), dtype[n])
                answer[n].append(got["answer_p50_ms"])
                forward[n].append(got["forward_p50_ms_" + dtype[n]])
        for n, (path, _) in arts.items():
            http = _http_p50(path, dtype[n], reqs[n], args.duration)
            rec = {
                "bench": "serve-sequences",
                "model": n,
                "candidates": CANDIDATES,
                "dtype": dtype[n],
                "forward_p50_ms": statistics.median(forward[n]),
                "answer_p50_ms": statistics.median(answer[n]),
                "http_p50_ms": http["p50_ms"],
                "http_p99_ms": http["p99_ms"],
                "errors": sum(http["errors"].values()),
            }
            if n != "none":
                rec["answer_ratio"] = statistics.median(
                    a / b for a, b in zip(answer[n], answer["none"])
                )
                rec["forward_ratio"] = statistics.median(
                    a / b for a, b in zip(forward[n], forward["none"])
                )
            records.append(rec)
        none = next(r for r in records if r["model"] == "none")
        for rec in records:
            rec["http_ratio"] = rec["http_p50_ms"] / none["http_p50_ms"]
            emit(rec)
    if not args.json_only:
        cols = [
            "model", "dtype", "forward_p50_ms", "answer_p50_ms", "http_p50_ms", "http_p99_ms",
            "forward_ratio", "answer_ratio", "http_ratio", "errors",
        ]  # fmt: skip
        table(records, cols)
    return 0


def _http_p50(artifact: Path, dtype: str, request: dict, duration: float) -> dict:
    """End-to-end ``/v1/rank`` at concurrency 1 over HTTP, one Ranker replica."""
    from ray import serve

    from serving import config
    from serving.client import free_port
    from serving.loadtest import run_load

    http = free_port()
    cfg = config.load_config(
        artifact=artifact,
        http_port=http,
        grpc_port=free_port(),
        host="127.0.0.1",
        deployments={"Ranker": {"num_replicas": 1, "user_config": {"dtype": dtype}}},
    )
    config.start(cfg)
    try:
        url = f"http://127.0.0.1:{http}"
        return run_load(url, request, concurrency=1, duration=duration, progress=None)
    finally:
        serve.shutdown()
        config.stop()


def plot(records: list[dict], path: str) -> None:
    """Latency and throughput ratios per model and ingress mode against the targets: bars are
    the median over the runs in ``records``, dots the single runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["ingress"]), []).append(r)
    keys = list(groups)
    runs = max(len(g) for g in groups.values())
    x = list(range(len(keys)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.38
    series = [
        (a, "latency_ratio", -w / 2, w, "tab:blue", "forward"),
        (a, "latency_ratio_paced", w / 2, w, "tab:orange", "paced forward"),
        (b, "throughput_ratio", 0.0, 0.6, "tab:green", None),
    ]
    for ax, key, dx, width, color, label in series:
        values = [[r[key] for r in groups[k]] for k in keys]
        ax.bar([i + dx for i in x], [statistics.median(v) for v in values], width, color=color, label=label, alpha=0.75)  # fmt: skip
        for i, v in enumerate(values):
            ax.plot([i + dx] * len(v), v, "k.", ms=4)
    # the forward floor (only where the runs measured it): what the framework reaches with the
    # same batching and forward and no request work of ours
    for ax, key, label in (
        (a, "floor_latency_ratio", "forward floor"),
        (b, "floor_throughput_ratio", "forward floor"),
    ):
        pts = [(i, statistics.median(v)) for i, k in enumerate(keys) if (v := [r[key] for r in groups[k] if key in r])]  # fmt: skip
        if pts:
            ax.plot([i for i, _ in pts], [v for _, v in pts], "r_", ms=22, mew=2, label=label)
    a.axhline(1.15, color="k", ls="--", lw=1, label="target 1.15")
    a.set_title("e2e HTTP p50 / (forward p50 + no-op p50)\n(lower is better)", fontsize=9)
    b.axhline(0.7, color="k", ls="--", lw=1, label="target 0.7")
    b.set_title("c=8 candidates/s / raw batched forward\n(higher is better)", fontsize=9)
    for ax in (a, b):
        ax.set_xticks(x)
        ax.set_xticklabels([f"{m}\n{i}" for m, i in keys], fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"mixrank bench serve: 256 candidates, 1 replica, 1 torch thread; "
        f"bars: median of {runs} run(s), dots: runs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(paths: list[str], out: str) -> int:
    """``--plot`` from the JSON lines of earlier runs (``--replot FILE ...``), no measuring."""
    from ranking.errors import UserError

    records = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise UserError(f"--replot: cannot read {path}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.startswith("{"):
                continue  # the table and logs around the JSON lines
            try:
                rec = json.loads(line)
            except ValueError:
                raise UserError(f"--replot: {path}:{n} is not a JSON line") from None
            if rec.get("bench") == "serve" and "ingress" in rec:
                records.append(rec)
    if not records:
        raise UserError(f"--replot: no bench serve records in {', '.join(paths)}")
    plot(records, out)
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    p.add_argument("--json-only", action="store_true")
    raise SystemExit(run(p.parse_args()))
