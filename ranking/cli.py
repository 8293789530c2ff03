"""The ``mixrank`` command line.

Each command group lives in its own module, which exposes ``register(subparsers)`` and sets
``func`` on its parsers; heavy imports (torch, ray) happen inside the command functions so that
``mixrank --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ranking.errors import UserError

# One line per command group: the module that registers it.
COMMAND_MODULES = (
    "ranking.data.commands",  # mixrank data {synth,convert-criteo,inspect,vocab,sequences,join-labels}
    "ranking.train.commands",  # mixrank train, export, eval
    "ranking.consistency",  # mixrank check-consistency
    "benchmarks",  # mixrank bench {data,model,kernels,...}
    "serving.demo",  # mixrank demo (data, train and serve: it sits above both)
    "serving.commands",  # mixrank serve, loadtest
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixrank",
        description="Industrial ranking models: data, training, serving, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for modname in COMMAND_MODULES:
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ranking.data.errors import DataError
    from ranking.features import SchemaError
    from ranking.model.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (UserError, DataError, SchemaError, ConfigError) as e:
        print(f"mixrank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixrank: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
