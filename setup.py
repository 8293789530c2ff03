"""Build script for the C and C++ extensions (everything else is in pyproject.toml).

- ``ranking.data._fastrows`` turns a ranking request's rows into bucket ids in one C pass
  (ranking/data/_fastrows.c);
- ``serving._fastproto`` reads a serialized gRPC ``RankRequest`` into the JSON request shape
  (serving/_fastproto.c);
- ``kernels.cpu._block`` (C++, x86-64 Linux, built against the installed torch): the whole
  RankMixer block and TokenMixer-Large's pSwiGLU stages for bf16 CPU inference, AMX GEMMs with
  fused prologues and epilogues (kernels/cpu/mixer_blocks.cpp, loaded by ``kernels.cpu``);
- ``kernels.cpu._int8`` (C++, x86-64 Linux): int8 per-token GEMMs and whole int8 mixer blocks on
  AVX512-VNNI (kernels/cpu/int8_blocks.cpp, loaded by ``kernels.cpu.vnni``).

All are optional: where no C/C++ compiler (or no torch) is at hand the build goes on without
them and the same results come from the Python paths (``ranking.data.fastrows.AVAILABLE``,
``serving.request.FAST_PROTO``, ``kernels.cpu.reason()``).
"""

import platform
import sys

from setuptools import Extension, setup


def _cpu_kernels() -> list[Extension]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return []
    try:  # the library links against the torch it is installed next to
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        return []
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]

    def library(name: str, source: str, flags: list[str]) -> Extension:
        return Extension(
            f"kernels.cpu.{name}",
            [source],
            depends=["kernels/cpu/simd.h", "kernels/cpu/amx.h"],  # rebuilt when they change
            include_dirs=include_paths(),
            library_dirs=library_paths(),
            runtime_library_dirs=library_paths(),
            libraries=["c10", "torch", "torch_cpu"],
            language="c++",
            extra_compile_args=[
                "-std=c++17",
                "-O3",
                "-fopenmp",  # at::parallel_for is OpenMP inline code; torch's libgomp serves it
                *avx512,
                *flags,
                f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                f"-DTORCH_EXTENSION_NAME={name}",
            ],
            extra_link_args=["-fopenmp"],
            optional=True,
        )

    return [
        library(
            "_block", "kernels/cpu/mixer_blocks.cpp", ["-mavx512bf16", "-mamx-tile", "-mamx-bf16"]
        ),
        # -ffp-contract=off: the rescale's roundings are the Python routes' (the same bytes)
        # -mamx-*: the AMX-INT8 GEMM, chosen at run time only where the CPU has it
        library(
            "_int8",
            "kernels/cpu/int8_blocks.cpp",
            ["-mavx512vnni", "-mamx-tile", "-mamx-int8", "-ffp-contract=off"],
        ),
    ]


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
    + _cpu_kernels()
)
