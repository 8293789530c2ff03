"""``mixrank check-consistency --artifact DIR --logs DIR``: the train/serve skew check.

The rows of the request log (``ranking.data.servedlog``) that this artifact's model served are
read back as training reads Parquet (``ranking.data.convert.batch_from_arrow``: the same
hashing, vocabularies and per-row histories) and scored by the artifact's model as trained
(eager, fp32, not the serving lowering); the scores are compared with the ones the service
answered. Rows served by other model versions are counted and skipped.

The report: per task the max, p99 and mean absolute difference and the count over the
tolerance (default 1e-5 for an fp32 artifact, ``BF16_TOLERANCE`` for bf16); the command exits
1 when any row is over it.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from ranking.errors import UserError

FP32_TOLERANCE = 1e-5
# bf16 keeps 8 bits of mantissa; served bf16 against the fp32 training path differed by at most
# 8e-4 on random RankMixers (docs/LOOP.md)
BF16_TOLERANCE = 5e-3


def register(sub) -> None:
    p = sub.add_parser(
        "check-consistency",
        help="re-score logged requests offline and compare with the scores served",
        description="Re-score the request log's rows that ARTIFACT's model served through the "
        "training code path and compare with the logged online scores; exit 1 when a row "
        "differs by more than the tolerance.",
    )
    p.add_argument("--artifact", required=True, help="the artifact that served the logs")
    p.add_argument("--logs", required=True, help="request-log directory (mixrank serve --log-dir)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help=f"max absolute difference (default {FP32_TOLERANCE} for fp32, "
        f"{BF16_TOLERANCE} for bf16 artifacts)",
    )
    p.add_argument("--batch-rows", type=int, default=65536, help="rows scored per forward")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_check_consistency)


def cmd_check_consistency(args) -> int:
    report = check_consistency(
        args.artifact,
        args.logs,
        tolerance=args.tolerance,
        batch_rows=args.batch_rows,
        quiet=args.quiet,
    )
    print(json.dumps(report))
    worst = max(t["max_abs"] for t in report["tasks"].values())
    verdict = "OK" if report["ok"] else "FAILED"
    print(
        f"check-consistency {verdict}: {report['rows']:,} rows of model {report['model_version']}"
        f" re-scored, max |diff| {worst:.3g}, "
        f"{sum(t['over_tolerance'] for t in report['tasks'].values())} over {report['tolerance']}"
        f" ({sum(report['other_versions'].values()):,} rows of other versions skipped)",
        file=sys.stderr,
    )
    return 0 if report["ok"] else 1


def check_consistency(
    artifact: str,
    logs: str,
    *,
    tolerance: float | None = None,
    batch_rows: int = 65536,
    quiet: bool = False,
) -> dict:
    import pyarrow.compute as pc
    import torch

    from ranking.data.convert import batch_from_arrow
    from ranking.data.errors import DataError
    from ranking.data.servedlog import read_logs, score_column
    from ranking.export import ArtifactError, load_artifact

    try:
        art = load_artifact(artifact, dtype="fp32")
    except ArtifactError as e:
        raise UserError(str(e)) from e
    version = art.model_version
    served_dtype = art.manifest["dtype"]
    if tolerance is None:
        tolerance = FP32_TOLERANCE if served_dtype == "fp32" else BF16_TOLERANCE
    try:
        data = read_logs(logs)
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"{logs}: cannot read the request log: {e}") from e
    schema = art.schema
    scores = [score_column(t) for t in schema.task_names]
    missing = [c for c in ["model_version", *scores] if c not in data.schema.names]
    if missing:
        raise UserError(
            f"{logs}: the log has no column(s) {missing}: not a log of this model's tasks "
            f"{schema.task_names}"
        )
    counts = (
        data.to_table(columns=["model_version"])
        .group_by("model_version")
        .aggregate([("model_version", "count")])
    )
    per_version = dict(
        zip(counts["model_version"].to_pylist(), counts["model_version_count"].to_pylist())
    )
    ours = per_version.pop(version, 0)
    if not ours:
        raise UserError(
            f"{logs}: no logged rows of model_version {version} ({artifact}); the log holds "
            f"{per_version or 'no rows'}"
        )
    feature_cols = [f.column for f in schema.features]
    absent = [c for c in feature_cols if c not in data.schema.names]
    if absent:
        raise UserError(f"{logs}: the log lacks the feature column(s) {absent} of {artifact}")
    diffs: list[np.ndarray] = []
    t0 = last = time.time()
    done = 0
    scanner = data.scanner(
        columns=feature_cols + scores,
        filter=pc.field("model_version") == version,
        batch_size=batch_rows,
    )
    model = art.model.eval()
    for rb in scanner.to_batches():
        if rb.num_rows == 0:
            continue
        try:
            batch = batch_from_arrow(schema, rb, source=logs, with_labels=False)
        except DataError as e:
            raise UserError(f"{logs}: logged rows do not convert: {e}") from e
        with torch.no_grad():
            probs = torch.sigmoid(model(batch).logits.float()).numpy()
        served = np.stack([rb.column(c).to_numpy(zero_copy_only=False) for c in scores], axis=1)
        diffs.append(np.abs(probs.astype(np.float64) - served.astype(np.float64)))
        done += rb.num_rows
        now = time.time()
        if not quiet and now - last > 5:
            rate = done / (now - t0)
            print(
                f"check-consistency: {done:,}/{ours:,} rows, {rate:,.0f} rows/s, "
                f"ETA {(ours - done) / max(rate, 1e-9):.0f} s",
                file=sys.stderr,
            )
            last = now
    d = np.concatenate(diffs) if diffs else np.zeros((0, len(scores)))
    tasks = {}
    for j, task in enumerate(schema.task_names):
        col = d[:, j]
        tasks[task] = {
            "max_abs": float(col.max()),
            "p99_abs": float(np.quantile(col, 0.99)),
            "mean_abs": float(col.mean()),
            "over_tolerance": int((col > tolerance).sum()),
        }
    return {
        "model_version": version,
        "artifact_dtype": served_dtype,
        "rows": int(d.shape[0]),
        "other_versions": per_version,
        "tolerance": tolerance,
        "tasks": tasks,
        "ok": all(t["over_tolerance"] == 0 for t in tasks.values()),
    }
