"""Small Triton helpers shared by the op modules.

``kernel`` replaces ``@triton.jit`` (+ ``@triton.autotune``) for the top-level kernels here:
it builds the JITFunction (autotuned over ``configs`` on the GPU) or, when
``triton.knobs.runtime.interpret`` is on at launch, an InterpretedFunction launched with one fixed
config (autotuning would time every config through the interpreter).

Triton 3.7 reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, and its own ``tl.max``,
``tl.sum``, ``tl.sigmoid``... are ``@triton.jit`` functions built at ``import triton``: the
interpreter only works if the variable is set before triton is first imported. ``kernels``
therefore imports triton lazily (see ``dispatch._load_triton``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

AUTOTUNE_ENV = "MIXRANK_TRITON_AUTOTUNE"  # "0": the first config of each kernel, no autotuning


def interpreting() -> bool:
    """Whether Triton launches run in the interpreter now (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


class Kernel:
    """A Triton kernel whose compile-or-interpret choice is made at launch. ``k[grid](*args)``."""

    def __init__(
        self,
        fn: Callable,
        configs: Sequence[triton.Config] | None,
        key: Sequence[str],
        interpret_meta: dict[str, Any] | None,
    ) -> None:
        self.fn = fn
        self.configs = list(configs or [])
        self.key = list(key)
        self.interpret_meta = dict(interpret_meta or {})
        if self.configs and not interpret_meta:
            self.interpret_meta = dict(self.configs[0].kwargs)
        self._compiled = None
        self._interpreted = None
        functools.update_wrapper(self, fn)

    def _compiled_kernel(self):
        if self._compiled is None:
            jitted = JITFunction(self.fn)
            configs = self.configs
            if configs and os.environ.get(AUTOTUNE_ENV, "1").strip() == "0":
                configs = configs[:1]  # correctness runs: compile one config, not all
            if configs:
                jitted = triton.autotune(configs=configs, key=self.key)(jitted)
            self._compiled = jitted
        return self._compiled

    def __getitem__(self, grid):
        if interpreting():
            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.fn)
            launcher = self._interpreted[grid]
            meta = self.interpret_meta
            return lambda *args, **kwargs: launcher(*args, **{**meta, **kwargs})
        return self._compiled_kernel()[grid]


def kernel(
    fn: Callable | None = None,
    *,
    configs: Sequence[triton.Config] | None = None,
    key: Sequence[str] = (),
    interpret_meta: dict[str, Any] | None = None,
):
    """Decorator: ``@kernel`` or ``@kernel(configs=[...], key=[...], interpret_meta={...})``.

    With ``configs``, the compiled kernel is autotuned over them (keyed on ``key``); the
    interpreter uses ``interpret_meta`` (default: the first config's meta-parameters).
    """
    if fn is not None:
        return Kernel(fn, None, (), None)
    return lambda f: Kernel(f, configs, key, interpret_meta)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(block: int) -> int:
    """Warps for a row-wise kernel whose tile holds ``block`` elements."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def num_programs_cap(device: torch.device) -> int:
    """A grid size for persistent loops: a few programs per SM on CUDA, unlimited otherwise."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1 << 30
