"""``mixrank data {synth,convert-criteo,inspect,vocab,sequences,join-labels}``. Heavy imports inside the commands."""

from __future__ import annotations

import argparse
import json

PRESET_CHOICES = ("criteo", "criteo_large", "frappe", "movielens", "sequence")


def register(sub) -> None:
    """Add the ``data`` command group to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("data", help="generate, convert and inspect data sets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = dsub.add_parser("synth", help="synthetic rows with a planted signal in a preset's schema")
    s.add_argument("--preset", required=True, choices=PRESET_CHOICES)
    s.add_argument("--rows", required=True, type=_positive)
    s.add_argument("--out", required=True, help="output directory (part-NNNNN.parquet)")
    s.add_argument("--seed", type=int, default=0, help="seed of the rows drawn")
    s.add_argument(
        "--signal-seed",
        type=int,
        default=0,
        help="seed of the hidden signal; keep it and change --seed for train/valid splits",
    )
    s.add_argument(
        "--chunk-rows", type=_positive, default=262144, help="rows per chunk / row group"
    )
    s.add_argument("--day", type=int, default=0, help="the day of a drifting signal (with --drift)")
    s.add_argument(
        "--drift",
        type=float,
        default=0.0,
        help="radians the hidden signal turns per day (e.g. 0.15: day d's logit correlates "
        "about cos(0.15 d) with day 0's)",
    )
    s.add_argument(
        "--id-range",
        type=_positive,
        default=0,
        help="criteo_large: the number of distinct ids of its big field C3 (default 10^8)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress line")
    s.set_defaults(func=cmd_synth)

    c = dsub.add_parser("convert-criteo", help="raw Kaggle Criteo TSV to Parquet, streamed")
    c.add_argument("src", help="train.txt (or .gz)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_convert_criteo)

    i = dsub.add_parser("inspect", help="schema, rows, label rate, per-column cardinality")
    i.add_argument("path", help="Parquet file, directory or glob")
    i.add_argument("--schema", help="also check the data against this schema (preset or YAML)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    v = dsub.add_parser("vocab", help="vocabulary files for the sparse features of a schema")
    v.add_argument("--schema", required=True, help="preset name or YAML path")
    v.add_argument("--data", required=True, help="Parquet file, directory or glob")
    v.add_argument("--out", required=True, help="output directory: <feature>.txt, schema.yaml")
    v.add_argument("--min-count", type=_positive, default=1)
    v.set_defaults(func=cmd_vocab)

    q = dsub.add_parser(
        "sequences",
        help="point-in-time behaviour histories from an event log",
        description="Read every INPUT as one event log ordered by time and write each back "
        "under --out with {item}_hist (the user's items with a strictly earlier time, most "
        "recent first, at most --length) and, with --label, {item}_hist_pos / {item}_hist_neg.",
    )
    q.add_argument("inputs", nargs="+", metavar="INPUT", help="Parquet files, directories, globs")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--user", required=True, help="user column")
    q.add_argument("--item", required=True, help="item column (histories list its values)")
    q.add_argument("--time", required=True, help="event time column (numbers or timestamps)")
    q.add_argument("--label", default=None, help="0/1 column: also the _pos/_neg histories")
    q.add_argument("--length", type=_positive, default=50, help="longest history (default 50)")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    q.set_defaults(func=cmd_sequences)

    j = dsub.add_parser(
        "join-labels",
        help="served requests (the service's request log) joined with later outcome events",
        description="Join the request log (`mixrank serve --log-dir`) with outcome events into "
        "training rows, <out>/dt=YYYY-MM-DD/ by the day each request was served (a day "
        "written again is replaced whole). Events: Parquet with the key columns and label "
        "columns; several events of one key count once (their maximum).",
    )
    j.add_argument("--logs", required=True, help="request-log directory (or URI)")
    j.add_argument("--labels", required=True, help="outcome events: Parquet file, dir or glob")
    j.add_argument("--out", required=True, help="output directory (dt=YYYY-MM-DD partitions)")
    j.add_argument(
        "--key",
        default="request_id,candidate",
        help="join key columns, comma-separated (default request_id,candidate)",
    )
    j.add_argument(
        "--label-columns", default=None, help="label columns (default: every non-key column)"
    )
    j.add_argument(
        "--missing",
        choices=("zero", "drop"),
        default="zero",
        help="a served row without an event: label 0 (default) or left out",
    )
    j.add_argument(
        "--engine",
        choices=("arrow", "ray"),
        default="arrow",
        help="arrow: streamed on this machine; ray: the same join on Ray Data",
    )
    j.add_argument("--quiet", action="store_true", help="no progress lines")
    j.set_defaults(func=cmd_join_labels)


def cmd_join_labels(args) -> int:
    from ranking.data.join import join_labels

    result = join_labels(
        args.logs,
        args.labels,
        args.out,
        key=[k.strip() for k in args.key.split(",") if k.strip()],
        label_columns=(
            [c.strip() for c in args.label_columns.split(",") if c.strip()]
            if args.label_columns
            else None
        ),
        missing=args.missing,
        engine=args.engine,
        quiet=args.quiet,
    )
    print(json.dumps(result))
    return 0


def cmd_sequences(args) -> int:
    from ranking.data.sequences import build_histories

    files = build_histories(
        args.inputs,
        args.out,
        user=args.user,
        item=args.item,
        time=args.time,
        label=args.label,
        length=args.length,
        progress=not args.quiet,
    )
    print(json.dumps({"files": [str(f) for f in files], "length": args.length}))
    return 0


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def cmd_synth(args) -> int:
    from ranking.data.synth import write_synthetic

    files = write_synthetic(
        args.preset,
        args.rows,
        args.out,
        seed=args.seed,
        chunk_rows=args.chunk_rows,
        signal_seed=args.signal_seed,
        progress=not args.quiet,
        day=args.day,
        drift=args.drift,
        id_range=args.id_range,
    )
    print(json.dumps({"preset": args.preset, "rows": args.rows, "files": [str(f) for f in files]}))
    return 0


def cmd_convert_criteo(args) -> int:
    from ranking.data.criteo import convert_criteo

    rows, files = convert_criteo(args.src, args.out, progress=not args.quiet)
    print(json.dumps({"rows": rows, "files": [str(f) for f in files]}))
    return 0


def cmd_inspect(args) -> int:
    info = inspect_data(args.path, args.schema)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"files: {len(info['files'])}  rows: {info['rows']:,}  row groups: {info['row_groups']}")
    for name, rate in info["label_rate"].items():
        print(f"label rate ({name}): {rate:.4f}")
    if "schema" in info:
        print(f"schema {info['schema']}: OK")
    w = max(len(c["name"]) for c in info["columns"])
    print(f"{'column'.ljust(w)}  {'type':<20} {'nulls':>10} {'distinct':>10}")
    for c in info["columns"]:
        print(f"{c['name'].ljust(w)}  {c['type']:<20} {c['nulls']:>10,} {c['distinct']:>10,}")
    return 0


def inspect_data(path: str, schema_name: str | None = None) -> dict:
    """Summary of a data set: files, rows, label rate, per-column type / nulls / distinct values.

    Reads one column at a time. With a schema, also converts the first rows of every file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from ranking.data.errors import DataError
    from ranking.data.reader import list_units, resolve_files

    files = resolve_files(path)
    units = list_units(files, 1 << 62)
    try:
        dataset = ds.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot open as Parquet: {e}") from None
    rows = sum(u.rows for u in units)
    if rows == 0:
        raise DataError(f"{path}: the data set has no rows")
    info: dict = {
        "files": files,
        "rows": rows,
        "row_groups": len(units),
        "label_rate": {},
        "columns": [],
    }
    labels = set()
    if schema_name:
        schema = _check_schema(schema_name, files)
        info["schema"] = schema.name
        labels = set(schema.label_columns)
    for field in dataset.schema:
        col = dataset.to_table(columns=[field.name]).column(0)
        flat = pc.list_flatten(col) if pa.types.is_list(field.type) else col
        info["columns"].append(
            {
                "name": field.name,
                "type": str(field.type),
                "nulls": col.null_count,
                "distinct": pc.count_distinct(flat).as_py(),
            }
        )
        is_label = field.name in labels or (not labels and field.name.startswith("label"))
        if is_label and (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            info["label_rate"][field.name] = pc.mean(col).as_py()
    return info


def _check_schema(schema_name: str, files: list[str]):
    import pyarrow.parquet as pq

    from ranking.data.convert import columns_from_arrow
    from ranking.features import load_schema

    schema = load_schema(schema_name)
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        from ranking.data.errors import DataError

        for c in schema.columns:
            if c not in names:
                raise DataError(f"{f}: column {c!r}: missing (the file has {names})")
        if pf.metadata.num_rows:
            head = next(pf.iter_batches(batch_size=4096, columns=schema.columns))
            columns_from_arrow(schema, head, source=f)
    return schema


def cmd_vocab(args) -> int:
    from ranking.data.reader import resolve_files
    from ranking.data.vocab import build_vocabs
    from ranking.features import load_schema

    schema = load_schema(args.schema)
    sizes = build_vocabs(schema, resolve_files(args.data), args.out, min_count=args.min_count)
    print(json.dumps({"out": args.out, "sizes": sizes}))
    return 0
