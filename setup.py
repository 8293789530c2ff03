"""Build script for the one C extension (everything else is in pyproject.toml).

``ranking.data._fastrows`` turns a ranking request's rows into bucket ids in one C pass
(ranking/data/_fastrows.c). It is optional: where no C compiler is at hand the build goes on
without it and the same ids come from the pure-Python path (``ranking.data.fastrows.AVAILABLE``
says which one runs).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ranking.data._fastrows",
            ["ranking/data/_fastrows.c"],
            extra_compile_args=["-O3", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
