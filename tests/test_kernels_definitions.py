"""The kernels against their definitions (DESIGN.md), on both backends, plus the dispatch.

- token_mix equals multiplication of the flattened x by an explicit permutation matrix built
  from the index formula in a slow loop;
- mix then revert is the identity for many (T, D, H);
- RankMixer's ``S = LN(mix(X) + X)`` equals ``mix_norm(X, T, w, b, residual=X, norm="layer")``;
- an MoE with every expert active (k = E) equals the dense weighted sum over experts.

The Triton backend runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; see test_kernels_ops.py for the subprocess fallback used when it was imported first).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

_std = sys.modules.get("triton.language.standard")
INTERPRETER_OK = os.environ["TRITON_INTERPRET"] == "1" and (
    _std is None or type(_std.max).__name__ == "InterpretedFunction"
)

import kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not INTERPRETER_OK, reason="triton imported before TRITON_INTERPRET=1"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def ops(request, monkeypatch):
    monkeypatch.setenv("MIXRANK_KERNELS", request.param)
    assert kernels.backend("cpu") == request.param
    return kernels


def _perm_matrix(T: int, D: int, H: int) -> torch.Tensor:
    """P with ``token_mix(x).flatten(1) = x.flatten(1) @ P.T``, from the index formula."""
    d = D // H
    P = torch.zeros(T * D, T * D)
    for h in range(H):
        for t in range(T):
            for i in range(d):
                P[h * (T * d) + t * d + i, t * D + h * d + i] = 1.0
    return P


@pytest.mark.parametrize("T,D,H", [(4, 12, 3), (5, 10, 5), (3, 8, 8), (6, 6, 2)])
def test_token_mix_is_the_permutation_matrix(ops, T, D, H):
    x = torch.randn(3, T, D)
    P = _perm_matrix(T, D, H)
    assert torch.equal(P.sum(0), torch.ones(T * D)) and torch.equal(P.sum(1), torch.ones(T * D))
    expected = (x.reshape(3, T * D) @ P.T).reshape(3, H, T * D // H)
    assert torch.equal(ops.token_mix(x, H), expected)
    # the inverse is the transpose
    assert torch.equal(ops.token_revert(expected, T).reshape(3, -1), expected.reshape(3, -1) @ P)


def test_mix_then_revert_is_identity(ops):
    cases = [(T, D, H) for T in (1, 2, 3, 5, 7) for D in (6, 8, 12, 20) for H in (1, 2, 4, 6)]
    cases = [c for c in cases if c[1] % c[2] == 0]
    for T, D, H in cases:
        x = torch.randn(2, T, D)
        y = ops.token_mix(x, H)
        assert y.shape == (2, H, T * D // H)
        assert torch.equal(ops.token_revert(y, T), x), (T, D, H)


def test_rankmixer_block_norm(ops):
    B, T, D = 4, 6, 12
    x = torch.randn(B, T, D)
    w, b = torch.randn(D), torch.randn(D)
    z, s = ops.mix_norm(x, T, w, b, residual=x, norm="layer")
    mixed = x.reshape(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(z, mixed + x)
    torch.testing.assert_close(s, F.layer_norm(mixed + x, (D,), w, b, 1e-6), atol=1e-5, rtol=1e-5)
    # RMSNorm variant, after a revert
    y = torch.randn(B, 3, T * D // 3)
    z, s = ops.mix_norm(y, T, w, revert=True, norm="rms", eps=1e-6)
    zz = y.reshape(B, 3, T, D // 3).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(z, zz)
    torch.testing.assert_close(
        s, zz * torch.rsqrt(zz.pow(2).mean(-1, keepdim=True) + 1e-6) * w, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_with_every_expert_active_is_the_dense_sum(ops, activation):
    N, D, Hd, E = 13, 16, 24, 5
    x = torch.randn(N, D)
    gates = torch.softmax(torch.randn(N, E), -1)
    ids = torch.arange(E).expand(N, E).contiguous()
    wu, wg, wd = torch.randn(E, D, Hd), torch.randn(E, D, Hd), torch.randn(E, Hd, D)
    bu, bd = torch.randn(E, Hd), torch.randn(E, D)
    kw = {"w_gate": wg} if activation == "swiglu" else {"b_up": bu, "b_down": bd}
    out = ops.moe_ffn(x, gates, ids, wu, wd, activation=activation, **kw)
    dense = torch.zeros(N, D)
    for e in range(E):
        if activation == "swiglu":
            h = F.silu(x @ wg[e]) * (x @ wu[e])
            y = h @ wd[e]
        else:
            y = F.gelu(x @ wu[e] + bu[e]) @ wd[e] + bd[e]
        dense += gates[:, e : e + 1] * y
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_relu_gated_moe_is_the_dense_sum(ops):
    """ReLU gate: inactive experts (gate 0, id -1) are skipped, which equals the dense sum."""
    N, D, Hd, E = 11, 16, 16, 4
    x = torch.randn(N, D)
    gates, ids, l1 = ops.relu_gate(torch.randn(N, E))
    assert (ids == -1).any()
    torch.testing.assert_close(l1, gates.sum(-1))
    wu, wg, wd = torch.randn(E, D, Hd), torch.randn(E, D, Hd), torch.randn(E, Hd, D)
    out = ops.moe_ffn(x, gates, ids, wu, wd, w_gate=wg)
    dense = sum(gates[:, e : e + 1] * ((F.silu(x @ wg[e]) * (x @ wu[e])) @ wd[e]) for e in range(E))
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_env(monkeypatch):
    monkeypatch.delenv("MIXRANK_KERNELS", raising=False)
    assert kernels.backend("cpu") == "torch"
    assert kernels.backend("cuda") == "triton"
    monkeypatch.setenv("MIXRANK_KERNELS", "torch")
    assert kernels.backend("cuda") == "torch"
    monkeypatch.setenv("MIXRANK_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="MIXRANK_KERNELS"):
        kernels.token_mix(torch.randn(1, 2, 4), 2)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_triton_on_cpu_without_interpreter_is_a_clear_error_and_import_order_is_safe():
    code = """
import os, sys, torch
import kernels  # must not import triton
assert "triton" not in sys.modules, "import kernels imported triton"
assert kernels.token_mix.__module__ == "kernels.dispatch"
os.environ["MIXRANK_KERNELS"] = "triton"
try:
    kernels.token_mix(torch.randn(1, 2, 4), 2)
    raise SystemExit("no error")
except RuntimeError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
# switching the interpreter on after `import kernels` (but before triton) works
os.environ["TRITON_INTERPRET"] = "1"
x = torch.randn(2, 3, 4)
assert torch.equal(kernels.token_revert(kernels.token_mix(x, 2), 3), x)
assert kernels.token_mix.__module__ == "kernels.dispatch"  # not shadowed by the submodule
print("ok")
"""
    proc = _run(code, MIXRANK_KERNELS="")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_bench_interpret_smoke():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_kernels", "--interpret-smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout and "moe_ffn" in proc.stdout


def test_bench_without_gpu_exits_zero():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_kernels"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "needs a CUDA GPU" in proc.stdout, proc.stdout + proc.stderr
