"""Triton kernels (under Triton's CPU interpreter) against their PyTorch reference twins.

Forward and backward on fresh random inputs, odd sizes, fp32 and bf16. Every Triton output and
gradient buffer is poisoned (``torch.empty`` returns NaN / a sentinel while a test runs), so an
element a kernel forgot to write fails the comparison.

Tolerances (max |triton - ref| / max |ref|): fp32 1e-5 (GEMMs 1e-4, other summation order);
bf16 2e-2 (GEMMs 3e-2, the composed MoE 4e-2; gradients twice these) against the reference run in fp32 on the same bf16 values (the kernels accumulate in
fp32; the error is bf16 rounding of outputs and intermediates).

``TRITON_INTERPRET=1`` must be set before triton is first imported (Triton 3.7 builds its
``tl.*`` helpers at import): it is set here, before ``kernels`` can import triton. If another
test module imported triton first in this process, these tests are skipped and
``test_rerun_in_subprocess`` runs this file in a fresh interpreter instead.

On a GPU machine, ``MIXRANK_TEST_DEVICE=cuda pytest tests/test_kernels_ops.py`` runs the same
tests on CUDA tensors with the kernels compiled (no interpreter); ``benchmarks/gpu_check.sh``
does that. CI has no GPU, so there they run interpreted on the CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

DEVICE = os.environ.get("MIXRANK_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels on the GPU

import pytest  # noqa: E402
import torch  # noqa: E402

_std = sys.modules.get("triton.language.standard")
if DEVICE == "cpu":
    INTERPRETER_OK = os.environ["TRITON_INTERPRET"] == "1" and (
        _std is None or type(_std.max).__name__ == "InterpretedFunction"
    )
else:
    if not torch.cuda.is_available():
        raise RuntimeError(f"MIXRANK_TEST_DEVICE={DEVICE} but torch sees no CUDA device")
    # every tensor a test makes lands on the GPU; seeded generators stay on the CPU
    torch.set_default_device(DEVICE)
    INTERPRETER_OK = True
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER_OK, reason="triton imported before TRITON_INTERPRET=1: run in a subprocess"
)

import kernels  # noqa: E402
from kernels import reference as ref  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.skipif(
    INTERPRETER_OK or DEVICE != "cpu", reason="the interpreter works in this process"
)
def test_rerun_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@needs_interpreter
def test_autotune_keys_cover_caller_constexprs():
    """An autotuned kernel's key names every constexpr its caller sets (all but the tuned block
    sizes): a config tuned for one variant must not be reused for another (a missing HAS_A2 made
    the grouped FFN backward ask an H200 for more shared memory than it has)."""
    import importlib
    import inspect

    from kernels.triton_ops._triton import Kernel

    checked = 0
    for mod in ("grouped_ffn", "mix_norm", "moe_gate", "moe_permute", "moe_unpermute", "token_mix"):
        m = importlib.import_module(f"kernels.triton_ops.{mod}")
        for name, k in vars(m).items():
            if not isinstance(k, Kernel) or not k.configs:
                continue
            tuned = {n for c in k.configs for n in c.kwargs}
            params = inspect.signature(k.fn).parameters.values()
            constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
            missing = constexprs - tuned - set(k.key)
            assert not missing, f"{mod}.{name}: autotune key lacks {sorted(missing)}"
            checked += 1
    assert checked >= 3


@pytest.fixture
def triton_ops(monkeypatch):
    """Force the Triton path and poison fresh allocations (NaN floats, sentinel ints)."""
    monkeypatch.setenv("MIXRANK_KERNELS", "triton")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    return kernels


def _tol(dtype, gemm=False):
    if dtype == torch.bfloat16:
        return 3e-2 if gemm else 2e-2
    return 1e-4 if gemm else 1e-5


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite (unwritten?) elements"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * max(scale, 1e-3), f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def _grads(out, inputs, seed=1):
    """Gradients of <out, random cotangent> (cotangents are the same for both backends)."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, device="cpu").to(o.device, o.dtype) for o in outs]
    loss = sum((o.float() * c.float()).sum() for o, c in zip(outs, cot))
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _fp32(ts):
    return [t.detach().float().requires_grad_() for t in ts]


# --------------------------------------------------------------------------- token mixing


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,D,H", [(2, 3, 12, 4), (3, 5, 10, 5), (1, 16, 48, 8), (2, 7, 6, 3)])
def test_token_mix_and_revert(triton_ops, dtype, B, T, D, H):
    x = torch.randn(B, T, D).to(dtype)
    (xt,) = _leaves(x)
    (xr,) = _leaves(x)
    y = triton_ops.token_mix(xt, H)
    yr = ref.token_mix(xr, H)
    assert torch.equal(y, yr)
    assert torch.equal(_grads(y, [xt])[0], _grads(yr, [xr])[0])
    (yt,) = _leaves(yr)
    z = triton_ops.token_revert(yt, T)
    assert torch.equal(z, x)
    # non-contiguous input
    xn = torch.randn(B, D, T).to(dtype).transpose(1, 2)
    assert torch.equal(triton_ops.token_mix(xn, H), ref.token_mix(xn, H))


@needs_interpreter
def test_token_revert_backward(triton_ops):
    y = torch.randn(3, 4, 15)
    (yt,) = _leaves(y)
    (yr,) = _leaves(y)
    assert torch.equal(
        _grads(triton_ops.token_revert(yt, 5), [yt])[0], _grads(ref.token_revert(yr, 5), [yr])[0]
    )


# --------------------------------------------------------------------------- mix + norm


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("revert", [False, True])
@pytest.mark.parametrize("residual,bias", [(False, False), (True, True), (True, False)])
def test_mix_norm(triton_ops, dtype, norm, revert, residual, bias):
    B, T, D, H = 3, 5, 12, 4
    x = torch.randn(B, H, T * D // H) if revert else torch.randn(B, T, D)
    n = T if revert else H
    zshape = (B, T, D) if revert else (B, H, T * D // H)
    W = zshape[2]
    ins = [x, 1 + 0.1 * torch.randn(W)]
    ins.append(torch.randn(W) if bias else None)
    ins.append(torch.randn(zshape) if residual else None)
    ins = [t.to(dtype) if t is not None else None for t in ins]
    present = [i for i, t in enumerate(ins) if t is not None]

    def run(fn, ts):
        xx, w, b, r = ts
        return fn(xx, n, w, b, residual=r, revert=revert, norm=norm)

    tri = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
    rf = [t.detach().float().requires_grad_() if t is not None else None for t in ins]
    out = run(triton_ops.mix_norm, tri)
    out_r = run(ref.mix_norm, rf)
    tol = _tol(dtype)
    for a, e, name in zip(out, out_r, ["z", "norm"]):
        assert a.dtype == dtype
        assert_close(a, e, tol, name)
    g = _grads(out, [tri[i] for i in present])
    g_r = _grads(tuple(o.to(dtype) for o in out_r), [rf[i] for i in present])
    for a, e, i in zip(g, g_r, present):
        assert_close(a, e, 4 * tol, f"grad {['x', 'weight', 'bias', 'residual'][i]}")


@needs_interpreter
def test_mix_norm_many_rows_and_wide(triton_ops):
    """More rows than one program's block, and a width that is not a power of two."""
    x = torch.randn(70, 4, 30)
    w = torch.randn(40)
    (xt,) = _leaves(x)
    (xr,) = _leaves(x)
    z, y = triton_ops.mix_norm(xt, 3, w, revert=True)
    zr, yr = ref.mix_norm(xr, 3, w, revert=True)
    assert_close(z, zr, 1e-6, "z")
    assert_close(y, yr, 1e-5, "norm")
    assert_close(_grads(y, [xt])[0], _grads(yr, [xr])[0], 1e-5, "dx")


# --------------------------------------------------------------------------- gates


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,E,k", [(37, 5, 1), (50, 7, 3), (9, 16, 4), (20, 6, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_gate(triton_ops, dtype, N, E, k, renormalize):
    # distinct logits in every row (bf16 would otherwise produce ties, which torch.topk and the
    # kernel (lowest expert id first) may break differently)
    logits = (torch.argsort(torch.rand(N, E), dim=1).float() / 4 - E / 8).to(dtype)
    (lt,) = _leaves(logits)
    (lr,) = _fp32([logits])
    w, ids = triton_ops.topk_gate(lt, k, renormalize=renormalize)
    wr, idr = ref.topk_gate(lr, k, renormalize=renormalize)
    assert ids.dtype == torch.int64 and w.dtype == dtype
    assert torch.equal(ids, idr)
    assert_close(w, wr, _tol(dtype), "weights")
    assert_close(_grads(w, [lt])[0], _grads(wr.to(dtype), [lr])[0], 2 * _tol(dtype), "dlogits")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_gate(triton_ops, dtype):
    logits = torch.randn(45, 9).to(dtype)
    logits[3] = -1.0  # a row with no active expert
    logits[4, 2] = 0.0  # exactly zero: inactive
    (lt,) = _leaves(logits)
    (lr,) = _fp32([logits])
    g, ids, l1 = triton_ops.relu_gate(lt)
    gr, idr, l1r = ref.relu_gate(lr)
    assert torch.equal(ids, idr) and ids[3].eq(-1).all() and ids[4, 2] == -1
    assert_close(g, gr, _tol(dtype), "gates")
    assert_close(l1, l1r, _tol(dtype), "l1")
    assert_close(_grads((g, l1), [lt])[0], _grads((gr, l1r), [lr])[0], _tol(dtype), "dlogits")


# --------------------------------------------------------------------------- routing


def _ids(N, k, G, seed, empty=(), all_to=None, drop=0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, G, (N, k), generator=g, device="cpu")
    for e in empty:
        ids[ids == e] = (e + 1) % G
    if all_to is not None:
        ids[:, 0] = all_to
    if drop:
        ids[torch.rand(N, k, generator=g, device="cpu") < drop] = -1
    return ids.to(DEVICE)


ROUTING_CASES = {
    "basic": dict(N=37, k=2, G=5, seed=0),
    "empty experts": dict(N=41, k=3, G=7, seed=1, empty=(0, 4, 6)),
    "one expert gets every row": dict(N=23, k=1, G=4, seed=2, all_to=3),
    "dropped pairs": dict(N=50, k=2, G=6, seed=3, drop=0.3),
    "all dropped": dict(N=8, k=2, G=3, seed=4, drop=1.0),
    "several blocks": dict(N=700, k=2, G=33, seed=5, drop=0.1),
    "256 experts, many blocks": dict(N=1500, k=2, G=256, seed=6),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_moe_permute(triton_ops, case):
    c = dict(ROUTING_CASES[case])
    G = c["G"]
    ids = _ids(**c)
    r = triton_ops.moe_permute(ids, G)
    rr = ref.moe_permute(ids, G)
    assert r.M == rr.M == int((ids >= 0).sum())
    assert torch.equal(r.offsets, rr.offsets)
    assert torch.equal(r.row_index, rr.row_index)
    assert torch.equal(r.slot_of, rr.slot_of)
    # independent checks of the definition
    valid = ids >= 0
    assert torch.equal(r.row_index[r.slot_of[valid]], torch.nonzero(valid)[:, 0])
    counts = torch.bincount(ids[valid], minlength=G)
    assert torch.equal(r.offsets[1:] - r.offsets[:-1], counts)
    expert_of_slot = ids[valid][torch.argsort(r.slot_of[valid])]
    assert torch.all(expert_of_slot[1:] >= expert_of_slot[:-1])


@needs_interpreter
def test_moe_permute_rejects_bad_ids(triton_ops):
    with pytest.raises(ValueError, match="outside"):
        triton_ops.moe_permute(torch.tensor([[0, 5], [1, -2]]), 3)


@needs_interpreter
@pytest.mark.parametrize("case", ["basic", "several blocks", "256 experts, many blocks"])
def test_moe_permute_all_routed(triton_ops, case):
    """Top-k routing (no -1): ``all_routed`` gives the same routing with M = N*k known on the
    host (no sync); a broken promise is caught (for Triton by ``torch._assert_async``: at once
    on the CPU, as a device-side assert at the next sync on CUDA)."""
    c = {k: v for k, v in ROUTING_CASES[case].items() if k != "drop"}
    ids = _ids(**c)
    rr = ref.moe_permute(ids, c["G"])
    for r in (triton_ops.moe_permute(ids, c["G"], True), ref.moe_permute(ids, c["G"], True)):
        assert r.M == ids.numel() == rr.M
        for name in ("row_index", "slot_of", "offsets"):
            assert torch.equal(getattr(r, name), getattr(rr, name)), name
    ids[3, 0] = -1
    with pytest.raises(ValueError, match="-1"):
        ref.moe_permute(ids, c["G"], True)
    if DEVICE == "cpu":  # on CUDA a device-side assert would end the process's CUDA context
        with pytest.raises(RuntimeError, match="all_routed"):
            triton_ops.moe_permute(ids, c["G"], True)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["basic", "empty experts", "dropped pairs", "all dropped"])
def test_gather_and_unpermute(triton_ops, dtype, case):
    c = dict(ROUTING_CASES[case])
    ids = _ids(**c)
    r = ref.moe_permute(ids, c["G"])
    D = 19
    x = torch.randn(c["N"], D).to(dtype)
    y = torch.randn(r.M, D).to(dtype)
    w = torch.rand(c["N"], c["k"]).to(dtype)
    xt, yt, wt = _leaves(x, y, w)
    xr, yr, wr = _fp32([x, y, w])
    tol = _tol(dtype)
    xp = triton_ops.moe_gather(xt, r)
    assert torch.equal(xp, x[r.row_index])
    assert_close(_grads(xp, [xt])[0], _grads(ref.moe_gather(xr, r).to(dtype), [xr])[0], tol, "dx")
    out = triton_ops.moe_unpermute(yt, r, wt)
    out_r = ref.moe_unpermute(yr, r, wr)
    assert out.dtype == dtype
    assert_close(out, out_r, tol, "out")
    for a, e, name in zip(_grads(out, [yt, wt]), _grads(out_r.to(dtype), [yr, wr]), ["dy", "dw"]):
        assert_close(a, e, 2 * tol, name)


# --------------------------------------------------------------------------- grouped FFN


def _ffn_params(G, D, Hd, dtype, act, bias, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cpu")

    p = {
        "w_up": rnd(G, D, Hd) / D**0.5,
        "w_down": rnd(G, Hd, D) / Hd**0.5,
        "w_gate": rnd(G, D, Hd) / D**0.5 if act == "swiglu" else None,
        "b_up": rnd(G, Hd) if bias else None,
        "b_down": rnd(G, D) if bias else None,
    }
    return {k: v.to(DEVICE, dtype) if v is not None else None for k, v in p.items()}


FFN_CASES = [
    # (rows per group, D, Hd)
    ([5, 0, 17, 1], 24, 40),  # odd sizes, an empty group
    ([0, 0, 33], 16, 20),  # every row in one group
    ([70, 3], 40, 72),  # more rows than a row tile, Hd not a multiple of the block
    ([0, 0, 0], 16, 16),  # no rows at all: weight grads are zeros
]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,bias", [("swiglu", False), ("swiglu", True), ("gelu", True)])
@pytest.mark.parametrize("case", range(len(FFN_CASES)))
def test_grouped_ffn(triton_ops, dtype, act, bias, case):
    counts, D, Hd = FFN_CASES[case]
    G = len(counts)
    offsets = torch.zeros(G + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), D).to(dtype)
    params = _ffn_params(G, D, Hd, dtype, act, bias, seed=case)
    names = ["x"] + [k for k, v in params.items() if v is not None]
    tri = {k: v.detach().clone().requires_grad_() for k, v in params.items() if v is not None}
    rf = {k: v.detach().float().requires_grad_() for k, v in tri.items()}
    xt, xr = x.clone().requires_grad_(), x.float().requires_grad_()
    y = triton_ops.grouped_ffn(xt, offsets, activation=act, **tri)
    yr = ref.grouped_ffn(xr, offsets, activation=act, **rf)
    tol = _tol(dtype, gemm=True)
    assert y.dtype == dtype
    assert_close(y, yr, tol, "y")
    g = _grads(y, [xt, *tri.values()])
    g_r = _grads(yr.to(dtype), [xr, *rf.values()])
    for a, e, name in zip(g, g_r, names):
        assert_close(a, e, 2 * tol, f"grad {name}")


@needs_interpreter
def test_grouped_ffn_many_small_groups(triton_ops):
    """Per-token MoE shape: many groups of a few rows (row tiles -> group binary search)."""
    counts = [3, 0, 1, 2, 0, 0, 5, 1, 2, 2, 0, 4, 1, 1, 3, 2, 0, 1, 2, 2, 1, 0, 3, 1]
    G, D, Hd = len(counts), 16, 16
    offsets = torch.zeros(G + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), D)
    params = _ffn_params(G, D, Hd, torch.float32, "swiglu", False, seed=9)
    with torch.no_grad():
        y = triton_ops.grouped_ffn(x, offsets, **params)
    assert_close(y, ref.grouped_ffn(x, offsets, **params), 1e-4, "y")


# --------------------------------------------------------------------------- FP8 serving GEMM


def test_fp8_reference_is_the_scaled_e4m3_product():
    """The reference twin against its formula in float64: per-row e4m3 activations, per-column
    e4m3 weights (``fp8_quantize_weight``), scales and bias after the sum; and within e4m3's
    error (3 mantissa bits: a few % on Gaussian data) of the fp32 product."""
    g = torch.Generator().manual_seed(11)
    counts = [5, 0, 9, 3]
    G, K, N = len(counts), 24, 20
    offsets = torch.zeros(G + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), K, generator=g, device="cpu").to(DEVICE) * 3
    x[2] = 0  # a zero row: scale 1, output = bias
    w = torch.randn(G, K, N, generator=g, device="cpu").to(DEVICE)
    bias = torch.randn(G, N, generator=g, device="cpu").to(DEVICE)
    w8, sw = ref.fp8_quantize_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and sw.shape == (G, N)
    assert float(w8.float().abs().max()) == ref.FP8_MAX  # each column's largest maps to 448
    y = ref.grouped_linear_fp8(x, offsets, w8, sw, bias=bias)
    sx = x.abs().amax(1, keepdim=True).double() / 448
    sx = torch.where(sx > 0, sx, torch.ones_like(sx))
    x8 = (x.double() / sx).float().to(torch.float8_e4m3fn).double()
    bounds = offsets.tolist()
    for gi in range(G):
        a, b = bounds[gi], bounds[gi + 1]
        want = (x8[a:b] @ w8[gi].double()) * sx[a:b] * sw[gi].double() + bias[gi].double()
        assert_close(y[a:b], want, 1e-6, f"group {gi}")
        exact = x[a:b].double() @ w[gi].double() + bias[gi].double()
        assert_close(y[a:b], exact, 0.1, f"group {gi} vs fp32")
    assert torch.equal(y[2], bias[0])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        ref.grouped_linear_fp8(x, offsets, w, sw)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_quantize_rows_gives_the_reference_values(triton_ops, dtype):
    """The fused per-row e4m3 quantization (one Triton pass) gives the reference's scales
    exactly and its e4m3 values exactly: rows over 60 orders of magnitude, a zero row, a row
    of tiny values beside a large one (e4m3 subnormals), and a row sweeping [-448, 448] and
    [-0.02, 0.02] finely (every rounding boundary, ties included)."""
    from kernels.triton_ops.grouped_ffn import fp8_quantize_rows

    g = torch.Generator().manual_seed(13)
    x = torch.randn(40, 300, generator=g, device="cpu")
    x *= torch.logspace(-30, 30, 40).unsqueeze(1)
    x[3] = 0
    x[5, :150] *= 1e-4
    sweep = torch.cat([torch.linspace(-448, 448, 39999), torch.linspace(-0.02, 0.02, 8001)])
    sweep = torch.cat([sweep.view(-1, 480), torch.full((100, 1), 448.0)], 1)  # every scale 1
    rows = [x.to(dtype), sweep.to(dtype)]
    for xr in rows:
        xr = xr.to(DEVICE)
        x8, s = fp8_quantize_rows(xr)
        r8, rs = ref.fp8_quantize(xr)
        assert torch.equal(s, rs.squeeze(-1))
        assert torch.equal(x8.float(), r8.float())  # values (a zero may differ in sign)


@needs_interpreter
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_fp8(triton_ops, bias):
    """The Triton FP8 grouped GEMM (row and column scales and the bias in its epilogue) equals
    the reference on the same e4m3 values, with empty groups and many small ones."""
    g = torch.Generator().manual_seed(12)
    counts = [3, 0, 17, 1, 0, 6, 2]
    G, K, N = len(counts), 40, 24
    offsets = torch.zeros(G + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    x = torch.randn(int(offsets[-1]), K, generator=g, device="cpu").to(DEVICE)
    w8, sw = ref.fp8_quantize_weight(torch.randn(G, K, N, generator=g, device="cpu").to(DEVICE))
    b = torch.randn(G, N, generator=g, device="cpu").to(DEVICE) if bias else None
    with torch.no_grad():
        y = triton_ops.grouped_linear_fp8(x, offsets, w8, sw, bias=b)
    assert_close(y, ref.grouped_linear_fp8(x, offsets, w8, sw, bias=b), 1e-5, "y")


# --------------------------------------------------------------------------- composed MoE


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["topk", "relu"])
def test_moe_ffn_per_token_experts(triton_ops, dtype, gate):
    """Per-token MoE as the model calls it: T tokens x E experts -> global ids t*E + e."""
    B, T, E, k, D, Hd = 6, 3, 4, 2, 16, 24
    x = torch.randn(B * T, D).to(dtype)
    logits = (torch.argsort(torch.rand(B * T, E), dim=1).float() / 4 - 0.3).to(dtype)
    params = _ffn_params(T * E, D, Hd, dtype, "swiglu", False, seed=3)
    params = {k: v for k, v in params.items() if v is not None}
    tok = torch.arange(B * T) % T

    def run(ops, xx, lg, p):
        if gate == "topk":
            w, ids = ops.topk_gate(lg, k)
        else:
            w, ids, _ = ops.relu_gate(lg)
        gids = torch.where(ids >= 0, tok[:, None] * E + ids, ids)
        return ops.moe_ffn(xx, w, gids, **p)

    tri = _leaves(x, logits, *params.values())
    rf = _fp32([x, logits, *params.values()])
    out = run(triton_ops, tri[0], tri[1], dict(zip(params, tri[2:])))
    out_r = run(ref, rf[0], rf[1], dict(zip(params, rf[2:])))
    # four stages, each rounding to bf16 (x_perm, h, y_perm, out): measured up to ~2.3e-2
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out, out_r, tol, "out")
    for a, e, name in zip(_grads(out, tri), _grads(out_r.to(dtype), rf), ["x", "logits", *params]):
        assert_close(a, e, 2 * tol, f"grad {name}")


# --------------------------------------------------------------------------- target attention
def _slow_target_attention(q, k, v, lengths, seq_of, scale):
    """Candidate by candidate, head by head: softmax over the first n items, then the weighted
    sum of their values (an empty sequence gives zeros)."""
    B, H, d = q.shape
    out = torch.zeros(B, H, d, dtype=torch.float64)
    for b in range(B):
        s = int(seq_of[b])
        n = int(lengths[s])
        for h in range(H):
            if n == 0:
                continue
            scores = [scale * float(q[b, h].double() @ k[s, i, h].double()) for i in range(n)]
            top = max(scores)
            w = [math.exp(x - top) for x in scores]
            total = sum(w)
            for i in range(n):
                out[b, h] += (w[i] / total) * v[s, i, h].double()
    return out


TA_CASES = [
    # B, S, L, H, d, lengths, seq_of (None: one sequence per candidate)
    (4, 4, 5, 2, 8, [5, 0, 3, 1], None),
    (6, 2, 7, 3, 5, [7, 4], [0, 1, 1, 0, 0, 1]),  # candidates sharing a request's sequence
    (3, 3, 40, 1, 16, [40, 17, 33], None),  # several BLOCK_L blocks
    (5, 1, 9, 4, 3, [0], [0, 0, 0, 0, 0]),  # an empty sequence for everyone
]


def _ta_inputs(case, dtype, nan_padding=False):
    B, S, L, H, d, lengths, seq_of = case
    g = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, H, d, generator=g).to(dtype)
    k = torch.randn(S, L, H, d, generator=g).to(dtype)
    v = torch.randn(S, L, H, d, generator=g).to(dtype)
    lengths = torch.tensor(lengths)
    if nan_padding:  # padding must never be read
        pad = torch.arange(L)[None, :] >= lengths[:, None]
        k[pad] = float("nan")
        v[pad] = float("nan")
    seq = torch.tensor(seq_of) if seq_of is not None else None
    return q, k, v, lengths, seq


@pytest.mark.parametrize("case", TA_CASES)
def test_target_attention_reference_against_a_slow_loop(case):
    q, k, v, lengths, seq = _ta_inputs(case, torch.float32, nan_padding=True)
    seq_of = seq if seq is not None else torch.arange(q.shape[0])
    want = _slow_target_attention(q, k, v, lengths, seq_of, q.shape[-1] ** -0.5)
    got = ref.target_attention(q, k, v, lengths, seq)
    assert_close(got, want, 1e-5, "reference")


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TA_CASES)
def test_target_attention_triton_matches_reference(triton_ops, dtype, case):
    """Forward and backward (queries, keys, values: the key/value gradients of a shared sequence
    add up over its candidates), with NaN in every padded position."""
    q, k, v, lengths, seq = _ta_inputs(case, dtype, nan_padding=True)
    tq, tk, tv = _leaves(q, k, v)
    rq, rk, rv = _fp32([q, k, v])
    out = triton_ops.target_attention(tq, tk, tv, lengths, seq)
    want = ref.target_attention(rq, rk, rv, lengths, seq)
    assert out.dtype == dtype
    assert_close(out, want, _tol(dtype, gemm=True), "out")
    got_g = _grads(out, [tq, tk, tv])
    want_g = _grads(want, [rq, rk, rv])
    pad = torch.arange(k.shape[1])[None, :] >= lengths[:, None]
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        if name != "dq":  # padded positions get no gradient (the reference's is NaN-free too)
            assert (a[pad] == 0).all(), name
            a, e = a[~pad], e[~pad]
        assert_close(a, e, _tol(dtype, gemm=True), name)


def test_target_attention_shared_sequence_equals_copies():
    """A request's candidates reading one sequence (seq_of) equal each reading its own copy: the
    candidate-independent keys and values can be computed once per request."""
    q, k, v, lengths, seq = _ta_inputs(TA_CASES[1], torch.float32)
    copies = ref.target_attention(q, k[seq], v[seq], lengths[seq])
    assert torch.allclose(ref.target_attention(q, k, v, lengths, seq), copies, atol=1e-6)
