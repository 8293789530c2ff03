"""Build script for the two C extensions (everything else is in pyproject.toml).

- ``ranking.data._fastrows`` turns a ranking request's rows into bucket ids in one C pass
  (ranking/data/_fastrows.c);
- ``serving._fastproto`` reads a serialized gRPC ``RankRequest`` into the JSON request shape
  (serving/_fastproto.c).

Both are optional: where no C compiler is at hand the build goes on without them and the same
results come from the pure-Python paths (``ranking.data.fastrows.AVAILABLE``,
``serving.request.FAST_PROTO``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            name,
            [source],
            extra_compile_args=["-O3", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        )
        for name, source in (
            ("ranking.data._fastrows", "ranking/data/_fastrows.c"),
            ("serving._fastproto", "serving/_fastproto.c"),
        )
    ]
)
