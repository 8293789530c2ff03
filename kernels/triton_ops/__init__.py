"""The Triton kernels and their autograd functions, one op per module.

Imported lazily by ``kernels.dispatch`` on first use of the Triton path, never by
``import kernels``: Triton's interpreter (``TRITON_INTERPRET=1``, used on CPU) must be switched
on before the first ``import triton``. A subpackage of its own, so that these module names never
shadow the package's public functions of the same names (``kernels.token_mix`` is always the
dispatching function).
"""
