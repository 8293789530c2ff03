"""``kernels.cpu.vnni``: the AVX512-VNNI int8 kernels against independent references.

- ``linear``: the int32 sums against int64 matmuls of the same integers, and the whole product
  bit for bit against ``Int8PerToken``'s other routes (oneDNN, the exact fp32 ``bmm``), over
  shapes that exercise every micro-tile remainder (rows % 6, columns % 64, K % 4).
- the fused blocks against the blocks' equations with the reference twin's int8 products
  (test_int8's ``rankmixer_equation`` / ``tokenmixer_large_equation``), and whole lowered
  models against the unfused int8 lowering.
- bad arguments get errors that name them.

Skipped where the CPU lacks AVX512-VNNI or the library was not built (``vnni.reason()``).
"""

from __future__ import annotations

import pytest
import torch
from test_int8 import _ref_bmm, rankmixer_equation, tokenmixer_large_equation

from kernels.cpu import int8, vnni
from kernels.cpu.vnni import BACKENDS
from ranking.inference import optimize_for_inference
from ranking.lowered import (
    Int8RankMixer,
    Int8TokenMixerLarge,
    VnniInt8RankMixer,
    VnniInt8TokenMixerLarge,
    VnniInt8UniMixer,
)
from ranking.model.blocks import UniMixerBlock
from ranking.model.config import ModelConfig
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema

needs_vnni = pytest.mark.skipif(vnni.ops() is None, reason=f"kernels.cpu.vnni: {vnni.reason()}")


def _quantized(T, K, N, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(T, K, N, generator=g)
    b = torch.randn(T, N, generator=g) if bias else None
    q, s = int8.quantize_weight(w)
    return w, b, q, s


# shapes: every remainder of the 6-row tiles and the 64-column panels, K % 4 != 0, T > 1
SHAPES = [(1, 1, 1, 1), (1, 7, 13, 17), (3, 50, 30, 40), (2, 97, 64, 128), (16, 49, 32, 128),
          (2, 13, 256, 80), (1, 6, 1000, 1)]  # fmt: skip


@needs_vnni
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_gives_the_other_routes_bytes(shape, bias):
    """The VNNI route's output equals the exact fp32 route's and oneDNN's bit for bit (the
    integer sums are exact and the scales are applied in the same order), for any row block;
    a row of zeros scores the bias."""
    T, B, K, N = shape
    w, b, q, s = _quantized(T, K, N, seed=K * N + B, bias=bias)
    x = torch.randn(T, B, K, generator=torch.Generator().manual_seed(B)) * 3
    x[0, 0] = 0
    exact = int8.Int8PerToken(w, b, route="exact_fp32")
    want = exact(x)
    p = vnni.prepare(q, s, b)
    for row_block in (1, 5, 48):
        assert torch.equal(vnni.linear(x, p, row_block), want), row_block
    if int8.has_onednn():
        assert torch.equal(int8.Int8PerToken(w, b, route="onednn")(x), want)
    torch.testing.assert_close(want, _ref_bmm(x, w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(want[0, 0], torch.zeros(N) if b is None else b[0])


def _expected_tdpbusd(T, B, K, N, row_block):
    """The AMX path's tile multiplies for one ``linear`` call, counted from its tiling: per
    token and row block, per 32-column panel, per 32-row block, a K step of 64 is 4 TDPBUSDs
    (2 where the block has at most 16 rows); 0 where the shape takes the VNNI tiles."""
    kp, np_ = -(-K // 4) * 4, -(-N // 16) * 16
    if kp % 64 or np_ % 32:
        return 0
    n = 0
    for _ in range(T):
        for r0 in range(0, B, row_block):
            m = min(row_block, B - r0)
            n += sum((np_ // 32) * (kp // 64) * (4 if min(32, m - m0) > 16 else 2)
                     for m0 in range(0, m, 32))  # fmt: skip
    return n


# shapes that take the AMX path (K % 64 == 0, N padded to 16 a multiple of 32), with every
# row remainder of the 16-row tiles and 32-row blocks, a last panel of 17-31 columns
AMX_SHAPES = [(1, 1, 64, 32), (2, 37, 64, 24), (1, 48, 128, 96), (3, 17, 256, 64),
              (2, 100, 192, 48), (1, 33, 1024, 256)]  # fmt: skip


@needs_vnni
@pytest.mark.parametrize("row_block", [48, 7])
@pytest.mark.parametrize("shape", AMX_SHAPES + SHAPES)
def test_amx_path_gives_the_vnni_bytes(shape, row_block):
    """The AMX-INT8 GEMM (on emulated tiles: the same operations, checked against the tile
    configuration) gives the VNNI kernel's bytes, with and without bias and ReLU, and runs the
    number of tile multiplies its tiling implies (none where the shape takes the VNNI tiles)."""
    T, B, K, N = shape
    _, b, q, s = _quantized(T, K, N, seed=5)
    p = vnni.prepare(q, s, b)
    x = torch.randn(T, B, K, generator=torch.Generator().manual_seed(6))
    for relu in (False, True):
        want = vnni.linear(x, p, row_block, relu=relu)
        before = vnni.ops().emulated_tdpbusd()
        with vnni.gemm_backend("amx_emulated"):
            got = vnni.linear(x, p, row_block, relu=relu)
        assert vnni.ops().emulated_tdpbusd() - before == _expected_tdpbusd(T, B, K, N, row_block)
        assert torch.equal(got, want)
    assert vnni.backend() != "amx_emulated"  # restored


@needs_vnni
def test_amx_fused_blocks_give_the_vnni_bytes():
    """Both fused blocks with their GEMMs on (emulated) AMX tiles give the same bytes as on
    the VNNI tiles."""
    _, block = _block({"arch": "rankmixer", "dim": 128, "num_tokens": 4, "tokenizer": "slices"})
    f = VnniInt8RankMixer(block)
    x = torch.randn(block.num_tokens, 53, 128)
    _, tml = _block({"arch": "tokenmixer_large", "dim": 128, "num_tokens": 4, "num_heads": 2,
                     "tokenizer": "slices", "down_init_scale": 1.0})  # fmt: skip
    t = VnniInt8TokenMixerLarge(tml)
    xt = torch.randn(tml.num_tokens, 41, 128)
    _, uni = _block({**UNIMIXERS["unimixer"], "dim": 64})
    u = VnniInt8UniMixer(uni, uni)
    xu = torch.randn(29, 4, 64)
    with torch.no_grad():
        want = f(x), t(xt), *u(xu, xu + 1)[:2]
        before = vnni.ops().emulated_tdpbusd()
        with vnni.gemm_backend("amx_emulated"):
            got = f(x), t(xt), *u(xu, xu + 1)[:2]
        assert vnni.ops().emulated_tdpbusd() > before  # the blocks' GEMMs took the AMX path
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_vnni
def test_amx_tiles_run_where_the_cpu_has_them():
    """On a CPU with AMX-INT8 the ops' GEMMs run on AMX tiles (so every int8 test there runs
    the real instructions), or the reason is named (e.g. Linux refused the tile state)."""
    import os

    from kernels.cpu import _cpu_flags

    if not {"amx_tile", "amx_int8"} <= _cpu_flags():
        pytest.skip("this CPU lacks AMX-INT8")
    if os.environ.get("MIXRANK_INT8_AMX", "1") == "0":
        pytest.skip("MIXRANK_INT8_AMX=0")
    assert vnni.backend() == "amx", vnni.amx_reason()


@needs_vnni
def test_gemm_backend_names_what_is_wrong(monkeypatch):
    with pytest.raises(ValueError, match="gemm_backend: expected one of"), vnni.gemm_backend("x"):
        pass
    with pytest.raises(RuntimeError, match="kind must be"):
        vnni.ops().gemm_backend(3)
    from kernels.cpu import _cpu_flags

    if "amx_int8" not in _cpu_flags():
        assert vnni.backend() == "vnni" and "lacks AMX-INT8" in vnni.amx_reason()
        with pytest.raises(RuntimeError, match="lacks AMX-INT8"), vnni.gemm_backend("amx"):
            pass
    monkeypatch.setenv("MIXRANK_INT8_AMX", "0")
    prev = vnni.ops().gemm_backend(-1)
    try:
        vnni._use_amx(vnni.ops())
        assert "MIXRANK_INT8_AMX=0" in vnni.amx_reason() and vnni.backend() == BACKENDS[prev]
    finally:
        monkeypatch.delenv("MIXRANK_INT8_AMX")
        vnni._use_amx(vnni.ops())
        vnni.ops().gemm_backend(prev)


@needs_vnni
@pytest.mark.parametrize("backend", ["vnni", "amx_emulated"])
def test_grouped_linear_is_each_groups_linear(backend):
    """``grouped_linear``: each group's rows give the bytes of ``linear`` on them with that
    group's weights (empty groups, rows before the first and after the last group 0), on the
    VNNI tiles and on the (emulated) AMX ones; bad offsets are named."""
    G, K, N = 5, 64, 40
    _, b, q, s = _quantized(G, K, N, seed=7)
    p = vnni.prepare(q, s, b)
    off = torch.tensor([2, 5, 5, 60, 61, 70])
    x = torch.randn(75, K, generator=torch.Generator().manual_seed(8))
    with vnni.gemm_backend(backend):
        y = vnni.grouped_linear(x, p, off, row_block=16, relu=True)
    for g in range(G):
        lo, hi = int(off[g]), int(off[g + 1])
        one = vnni.prepare(q[g : g + 1], s[g : g + 1], b[g : g + 1])
        want = vnni.linear(x[lo:hi].unsqueeze(0), one, relu=True)[0]
        assert torch.equal(y[lo:hi], want)
    assert not y[:2].any() and not y[70:].any()
    with pytest.raises(RuntimeError, match=r"offsets must be int64 \[6\]"):
        vnni.ops().int8_grouped_linear(x, *p[:4], p.k, off[:5], 48, False)
    with pytest.raises(RuntimeError, match=r"offsets must not decrease \(group 2"):
        vnni.grouped_linear(x, p, torch.tensor([0, 5, 9, 7, 8, 9]))
    with pytest.raises(RuntimeError, match=r"offsets span rows 0 \.\. 80 of x's 75"):
        vnni.grouped_linear(x, p, torch.tensor([0, 5, 9, 17, 18, 80]))


def _moe_loop(moe, x, linear):
    """The MoE's routed experts, one (row, expert) pair at a time: ``weight * down_e(act(
    up_e(x)))`` summed over the pairs the router picks, each GEMM ``linear(x, w, b)``, plus a
    shared expert per token."""
    import torch.nn.functional as F

    weights, ids, _ = moe.route(x)
    B, T, W = x.shape
    flat = x.reshape(-1, W)
    y = torch.zeros_like(flat)
    for r in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[r, j])
            if e < 0:
                continue
            xr = flat[r : r + 1]
            if moe.w_gate is not None:
                h = F.silu(linear(xr, moe.w_gate[e])) * linear(xr, moe.w_up[e])
                y[r] += weights[r, j] * linear(h, moe.w_down[e])[0]
            else:
                h = F.gelu(linear(xr, moe.w_up[e], moe.b_up[e]))
                y[r] += weights[r, j] * linear(h, moe.w_down[e], moe.b_down[e])[0]
    y = y.view(B, T, W)
    if moe.shared is not None:
        s = moe.shared
        for t in range(T):
            gate, up = linear(x[:, t], s.w_gate_up[t]).split(s.hidden, -1)
            y[:, t] += linear(F.silu(gate) * up, s.w_down[t])
    return y


@needs_vnni
@pytest.mark.parametrize("kind", ["rankmixer", "tokenmixer_large"])
def test_int8_moe_follows_the_routed_equation(kind):
    """``Int8SparseMoE`` against a per-pair loop with the reference twin's int8 products (the
    shared expert's too): closer to it than to the fp32 experts, whose distance is int8's
    own error."""
    from test_int8 import _ref_linear

    from ranking.lowered import Int8SparseMoE
    from ranking.model.ffn import SparsePerTokenMoE

    torch.manual_seed(4)
    moe = SparsePerTokenMoE(4, 32, 4, 48, kind=kind, top_k=2, shared_expert=True,
                            down_init_scale=1.0).eval()  # fmt: skip
    with torch.no_grad():
        for n, p in moe.named_parameters():
            if n.startswith("b_") or n.startswith("router"):
                p.add_(torch.randn_like(p) * 0.3)
        x = torch.randn(37, 4, 32)
        got, aux = Int8SparseMoE(moe)(x)
        fp32 = lambda x, w, b=None: x @ w + (0 if b is None else b)  # noqa: E731
        want, ref32 = _moe_loop(moe, x, _ref_linear), _moe_loop(moe, x, fp32)
        torch.testing.assert_close(moe(x)[0], ref32, atol=1e-5, rtol=1e-5)  # the loop is the MoE
    assert float(aux) == float(moe(x)[1])
    _close_to_int8_equation(got, want, ref32)


@needs_vnni
def test_fused_relu_is_relu_of_the_product():
    """``relu=True`` (a Perceptron's ReLU in the GEMM's store) is ``torch.relu`` of the product,
    bit for bit."""
    _, b, q, s = _quantized(1, 40, 72, seed=3)
    x = torch.randn(1, 31, 40)
    p = vnni.prepare(q, s, b)
    got = vnni.linear(x, p, relu=True)
    assert torch.equal(got, torch.relu(vnni.linear(x, p)))
    assert (got == 0).any() and (got > 0).any()


@needs_vnni
def test_int32_sums_are_exact_past_fp32s_range():
    """Integers at the extremes (+-127 activations times +-127 weights, K = 4096: sums up to
    66M, past 2^24) with unit scales: the output is the int64 matmul of the same integers,
    rounded once to fp32; the zero point (u8 = q + 128) comes back out exactly."""
    g = torch.Generator().manual_seed(0)
    K, N, B = 4096, 48, 13
    sign = lambda *shape: torch.randint(0, 2, shape, generator=g) * 2 - 1  # noqa: E731
    wq = (sign(1, K, N) * 127).to(torch.int8)
    wq[0, :, 0] = 127  # one column at the largest sum
    xq = sign(1, B, K) * 127
    xq[0, 0] = 127
    xq[0, 1, ::3] = torch.randint(-127, 128, (xq[0, 1, ::3].numel(),), generator=g)
    p = vnni.prepare(wq, torch.ones(1, N))
    got = vnni.linear(xq.float(), p)
    want = (xq.long() @ wq.long()).float()
    assert want.abs().max() > 2**24
    assert torch.equal(got, want)


@needs_vnni
def test_quantization_is_quantize_rows():
    """The kernel's per-row quantization is ``quantize_rows``'s (max |x| / 127, rounding half to
    even): with an identity weight (scale 1 / 127 per column) the output is the dequantized
    rows ``s_x * round(x / s_x)``, exactly as the Python quantization gives them."""
    K = 40
    x = torch.randn(2, 33, K) * 5
    x[0, 3, :4] = torch.tensor([0.5, 1.5, 2.5, 127.0])  # ties: round half to even
    eye = (torch.eye(K) * 127).to(torch.int8).unsqueeze(0).expand(2, K, K).contiguous()
    p = vnni.prepare(eye, torch.full((2, K), 1 / 127))
    q, s = int8.quantize_rows_int(x)
    want = (q * 127).mul_(torch.full((K,), 1 / 127)).mul_(s)  # float(acc) * s_w * s_x
    assert torch.equal(vnni.linear(x, p), want)


@needs_vnni
def test_bad_arguments_name_themselves():
    _, b, q, s = _quantized(2, 32, 16, seed=1)
    p = vnni.prepare(q, s, b)
    with pytest.raises(RuntimeError, match="K = 31"):
        vnni.linear(torch.randn(2, 4, 31), p)
    with pytest.raises(RuntimeError, match="prepare for 3 tokens"):
        vnni.linear(torch.randn(3, 4, 32), p)
    with pytest.raises(ValueError, match="expected int8"):
        vnni.prepare(torch.randn(1, 4, 4), s)
    with pytest.raises(RuntimeError, match="weight bias has 5 elements"):
        vnni.linear(torch.randn(2, 4, 32), p._replace(bias=torch.zeros(5)))
    _, block = _block(UNIMIXERS["unimixer"])
    u = VnniInt8UniMixer(block, block)
    x = torch.randn(5, 4, 32)
    with pytest.raises(RuntimeError, match="ybar must be fp32 and xbar's shape"):
        vnni.unimixer_ffn(x, x[:4], u.norm_y, u.norm_x, u.gate_up, u.down)
    with pytest.raises(RuntimeError, match="xbar norm weight has 31 elements"):
        vnni.unimixer_ffn(x, x, u.norm_y, (u.norm_x[0][:31], 1e-6), u.gate_up, u.down)
    with pytest.raises(RuntimeError, match="do not chain D = 32"):
        vnni.unimixer_ffn(x, x, u.norm_y, u.norm_x, u.down, u.gate_up)


# ----------------------------------------------------------------------------- fused blocks


def _block(cfg: dict):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(cfg), toy_schema(num_tasks=1)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("b1", "b2")):
                p.add_(torch.randn_like(p) * 0.3)
    return model, model.blocks.blocks[0]


RANKMIXERS = {
    "layernorm": {"arch": "rankmixer", "dim": 64, "num_tokens": 4, "tokenizer": "slices"},
    "rmsnorm": {"arch": "rankmixer", "dim": 32, "num_tokens": 2, "norm": "rms",
                "tokenizer": "slices", "ffn_mult": 3},
}  # fmt: skip
TOKENMIXERS = {
    "input": {"arch": "tokenmixer_large", "dim": 32, "num_tokens": 4, "num_heads": 4,
              "tokenizer": "slices", "down_init_scale": 1.0},
    "reverted": {"arch": "tokenmixer_large", "dim": 48, "num_tokens": 4, "num_heads": 2,
                 "tokenizer": "slices", "down_init_scale": 1.0,
                 "tokenmixer_large": {"second_residual": "reverted"}},
}  # fmt: skip


def _close_to_int8_equation(got, want, fp32):
    """The fused block against the equation with reference int8 products. They differ only
    where an activation sits on a rounding tie of its quantization and the kernel's fp32
    norm / activation rounded it the other way: such flips move an output by about one
    quantization step, far below int8's own error against fp32."""
    err, int8_err = (got - want).abs(), (want - fp32).abs().max()
    assert err.max() <= 0.1 * int8_err, (err.max(), int8_err)
    assert (err > 1e-5).float().mean() < 0.01  # flips are rare


@needs_vnni
@pytest.mark.parametrize("name", list(RANKMIXERS))
def test_rankmixer_block_follows_its_equations(name):
    _, block = _block(RANKMIXERS[name])
    T, D = block.num_tokens, block.ffn.ffn.w1.shape[1]
    assert VnniInt8RankMixer.supports(block)
    x = torch.randn(T, 101, D)
    fp32 = lambda x, w, b=None: torch.baddbmm(b.unsqueeze(1), x, w) if b is not None else x @ w  # noqa: E731
    with torch.no_grad():
        want = rankmixer_equation(block, x, _ref_bmm)
        got = VnniInt8RankMixer(block)(x)
        for row_block in (1, 7):
            f = VnniInt8RankMixer(block)
            again = vnni.rankmixer_block(x, f.norm1, f.g1, f.g2, f.norm2, f.rms, row_block)
            assert torch.equal(again, got)  # row blocks only split the work
        _close_to_int8_equation(got, want, rankmixer_equation(block, x, fp32))


@needs_vnni
@pytest.mark.parametrize("name", list(TOKENMIXERS))
def test_tokenmixer_large_block_follows_its_equations(name):
    _, block = _block(TOKENMIXERS[name])
    x = torch.randn(block.num_tokens, 77, block.norm2.weight.shape[0])
    fp32 = lambda x, w: x @ w  # noqa: E731
    with torch.no_grad():
        want = tokenmixer_large_equation(block, x, _ref_bmm)
        got = VnniInt8TokenMixerLarge(block)(x)
        _close_to_int8_equation(got, want, tokenmixer_large_equation(block, x, fp32))


UNIMIXERS = {
    "unimixer": {"arch": "unimixer", "dim": 32, "num_tokens": 4, "tokenizer": "slices",
                 "unimixer": {"block_size": 16}, "down_init_scale": 1.0},
    "unimixer_lite": {"arch": "unimixer_lite", "dim": 48, "num_tokens": 4, "tokenizer": "slices",
                      "ffn_mult": 3, "unimixer": {"block_size": 24}, "down_init_scale": 1.0},
}  # fmt: skip


def unimixer_equation(block, xbar, ybar, bmm):
    """The UniMixer block on its streams (``[B, T, D]`` each) with the FFN's GEMMs
    ``bmm(x [T, B, K], w)``: ``O = Mix(Xbar + N(Ybar))``, ``Xbar = N(Xbar + O)``,
    ``Ybar = Ybar + O``, then the same with ``O = W_down (Swish(gate) * up)``."""
    from ranking.model.ffn import PerTokenSwiGLU

    o = block.mixing(xbar + block.y_norm1(ybar))
    xbar, ybar = block.x_norm1(xbar + o), ybar + o
    f = block.ffn.ffn
    assert isinstance(f, PerTokenSwiGLU)
    gate, up = bmm((xbar + block.y_norm2(ybar)).transpose(0, 1), f.w_gate_up).split(f.hidden, -1)
    o = bmm(torch.nn.functional.silu(gate) * up, f.w_down).transpose(0, 1)
    return block.x_norm2(xbar + o), ybar + o


@needs_vnni
@pytest.mark.parametrize("name", list(UNIMIXERS))
def test_unimixer_block_follows_its_equations(name):
    """``VnniInt8UniMixer`` (the FFN sub-layer one VNNI op on both streams) against the block's
    equations with the reference twin's int8 products; row blocks only split the work."""
    _, block = _block(UNIMIXERS[name])
    T, D = block.ffn.ffn.w_gate_up.shape[:2]
    xbar, ybar = torch.randn(61, T, D), torch.randn(61, T, D)
    fp32 = lambda x, w: x @ w  # noqa: E731
    with torch.no_grad():
        f = VnniInt8UniMixer(block, block)
        gx, gy, aux = f(xbar, ybar)
        wx, wy = unimixer_equation(block, xbar, ybar, _ref_bmm)
        fx, fy = unimixer_equation(block, xbar, ybar, fp32)
        o = block.mixing(xbar + block.y_norm1(ybar))
        x1, y1 = block.x_norm1(xbar + o), ybar + o
        for row_block in (1, 7):
            again = vnni.unimixer_ffn(x1, y1, f.norm_y, f.norm_x, f.gate_up, f.down, row_block)
            assert torch.equal(again[0], gx) and torch.equal(again[1], gy)
    assert float(aux) == 0.0
    _close_to_int8_equation(gx, wx, fx)
    _close_to_int8_equation(gy, wy, fy)


@pytest.mark.parametrize(
    "cfg",
    [RANKMIXERS["layernorm"], TOKENMIXERS["reverted"], UNIMIXERS["unimixer_lite"]],
    ids=["rankmixer", "tokenmixer", "unimixer_lite"],
)
@needs_vnni
def test_lowering_fuses_int8_blocks_and_scores_like_the_unfused(cfg):
    """``optimize_for_inference(dtype="int8", cpu_fused_block=True)`` runs every block as one
    VNNI op, and scores as the unfused int8 lowering does (to the rare rounding-tie flip)."""
    model, _ = _block({**cfg, "num_layers": 2})
    batch = random_batch(toy_schema(num_tasks=1), 64, seed=3)
    fused = optimize_for_inference(model, dtype="int8", cpu_fused_block=True, micro_batch=16)
    unfused = optimize_for_inference(model, dtype="int8", micro_batch=16)
    kinds = {type(b) for b in fused.blocks.blocks}
    assert kinds <= {VnniInt8RankMixer, VnniInt8TokenMixerLarge, VnniInt8UniMixer}
    assert len(kinds) == 1
    assert {type(b) for b in unfused.blocks.blocks} <= {Int8RankMixer, Int8TokenMixerLarge,
                                                        UniMixerBlock}  # fmt: skip
    with torch.no_grad():
        a, b = fused(batch).logits, unfused(batch).logits
        ref = model(batch).logits
    assert (a - b).abs().max() <= 0.1 * (b - ref).abs().max() + 1e-5


@needs_vnni
@pytest.mark.parametrize("slow", ["fused", "unfused"])
def test_fused_block_is_kept_only_where_it_is_faster(monkeypatch, caplog, slow):
    """Where the unfused block's GEMMs take another route than vnni (an AMX-INT8 host's
    oneDNN; here forced by ``MIXRANK_INT8_ROUTE``), the lowering races the fused op against the
    unfused block once per block shape and keeps the faster for every block of that shape."""
    import logging
    import time

    monkeypatch.setenv("MIXRANK_INT8_ROUTE", "onednn")
    cls = VnniInt8RankMixer if slow == "fused" else Int8RankMixer
    forward = cls.forward

    def slowed(self, x):
        time.sleep(0.02)  # the block's own time at 256 rows is well under a millisecond here
        return forward(self, x)

    monkeypatch.setattr(cls, "forward", slowed)
    model, _ = _block({**RANKMIXERS["layernorm"], "num_layers": 3})
    with caplog.at_level(logging.INFO, logger="ranking.inference"):
        low = optimize_for_inference(model, dtype="int8", cpu_fused_block=True)
    want = Int8RankMixer if slow == "fused" else VnniInt8RankMixer
    assert [type(b) for b in low.blocks.blocks] == [want] * 3
    races = [r.getMessage() for r in caplog.records if "rows per token: fused" in r.getMessage()]
    assert len(races) == 1 and races[0].endswith("unfused" if slow == "fused" else ": fused")
    assert "GEMM routes onednn" in races[0]


@needs_vnni
def test_no_race_where_every_gemm_takes_the_vnni_route(monkeypatch, caplog):
    """The fused op runs the vnni kernel with the steps in between fused: where the unfused
    block's GEMMs all take that route the fused op is kept without timing the two."""
    import logging

    monkeypatch.setenv("MIXRANK_INT8_ROUTE", "vnni")
    model, _ = _block({**RANKMIXERS["layernorm"], "num_layers": 2})
    with caplog.at_level(logging.INFO, logger="ranking.inference"):
        low = optimize_for_inference(model, dtype="int8", cpu_fused_block=True)
    assert all(type(b) is VnniInt8RankMixer for b in low.blocks.blocks)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("int8 ")]
    assert msgs == ["int8 RankMixerBlock: fused VNNI block (every GEMM's fastest route is vnni)"]


@needs_vnni
def test_ops_fake_kernels_agree_with_the_real_ones():
    """``torch.library.opcheck``: each op's schema holds and its fake kernel (what
    ``torch.compile`` traces) gives the real output's shape, dtype and strides."""
    ops = vnni.ops()
    x = torch.randn(3, 13, 40)
    _, b, q, s = _quantized(3, 40, 24, seed=0)
    p = vnni.prepare(q, s, b)
    torch.library.opcheck(ops.int8_linear, (x, *p, 48, True))
    _, block = _block(RANKMIXERS["layernorm"])
    f = VnniInt8RankMixer(block)
    xr = torch.randn(block.num_tokens, 9, block.ffn.ffn.w1.shape[1])
    args = (xr, *f.norm1, *f.g1[:4], f.g1.k, *f.g2[:4], f.g2.k, *f.norm2, f.rms, 48)
    torch.library.opcheck(ops.int8_rankmixer_block, args)
    _, block = _block(TOKENMIXERS["reverted"])
    t = VnniInt8TokenMixerLarge(block)
    (g, eps), gu, down = t.stages[0]
    z = torch.randn(block.num_heads, 9, g.numel())
    args = (z, z.clone(), g, eps, *gu[:3], gu.k, *down[:3], down.k, 48)
    torch.library.opcheck(ops.int8_swiglu_stage, args)
    _, block = _block(UNIMIXERS["unimixer"])
    u = VnniInt8UniMixer(block, block)
    x = torch.randn(9, 4, 32)
    args = (x, x + 1, *u.norm_y, *u.norm_x, *u.gate_up[:3], u.gate_up.k, *u.down[:3], u.down.k, 48)
    torch.library.opcheck(ops.int8_unimixer_ffn, args)


@needs_vnni
@pytest.mark.parametrize(
    "cfg", [RANKMIXERS["layernorm"], TOKENMIXERS["reverted"]], ids=["rankmixer", "tokenmixer"]
)
def test_compile_traces_through_the_fused_blocks(cfg):
    """``compile=True`` on top of the fused int8 blocks compiles (the ops are opaque calls with
    fake kernels; no fall-back to eager) and scores as the eager fused lowering does."""
    import ranking.lowered as lowered

    torch._dynamo.reset()
    model, _ = _block({**cfg, "num_layers": 2})
    batch = random_batch(toy_schema(num_tasks=1), 40, seed=2)
    eager = optimize_for_inference(model, dtype="int8", cpu_fused_block=True)
    comp = optimize_for_inference(model, dtype="int8", cpu_fused_block=True, compile=True)
    assert {type(b) for b in comp.blocks.blocks} <= {VnniInt8RankMixer, VnniInt8TokenMixerLarge}
    with torch.no_grad():
        want, got = eager(batch).logits, comp(batch).logits
    assert isinstance(comp._stack, lowered.CompiledOrEager) and not comp._stack.fell_back
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unavailable_kernels_fall_back_with_one_warning(monkeypatch, caplog):
    """Where the CPU or the build lacks the kernels, ``cpu_fused_block`` int8 runs each GEMM on
    its own (the unfused blocks), says why once, and scores the same as without the option;
    asking for the ``vnni`` route names the reason."""
    import logging

    import ranking.inference as inference

    monkeypatch.setattr(vnni.LIBRARY, "state", {"ops": None, "why": "no VNNI here (test)"})
    monkeypatch.setattr(inference, "_WARNED", set())
    model, _ = _block({**RANKMIXERS["layernorm"], "num_layers": 2})
    batch = random_batch(toy_schema(num_tasks=1), 20, seed=1)
    with caplog.at_level(logging.WARNING, logger="ranking.inference"):
        low = optimize_for_inference(model, dtype="int8", cpu_fused_block=True)
        optimize_for_inference(model, dtype="int8", cpu_fused_block=True)
    assert all(type(b) is Int8RankMixer for b in low.blocks.blocks)
    msgs = [r.getMessage() for r in caplog.records if "cpu_fused_block" in r.getMessage()]
    assert len(msgs) == 1 and "no VNNI here (test)" in msgs[0]
    with torch.no_grad():
        plain = optimize_for_inference(model, dtype="int8")(batch).logits
        assert torch.equal(low(batch).logits, plain)
    with pytest.raises(ValueError, match="no VNNI here"):
        int8.Int8PerToken(torch.randn(2, 8, 8), route="vnni")


def test_env_switch_turns_them_off(monkeypatch):
    monkeypatch.setattr(vnni.LIBRARY, "state", {})
    monkeypatch.setenv("MIXRANK_CPU_KERNELS", "0")
    assert vnni.ops() is None and "MIXRANK_CPU_KERNELS=0" in vnni.reason()


@needs_vnni
@pytest.mark.parametrize("preset", ["rankmixer_medium", "tokenmixer_large_medium"])
def test_preset_runs_fused_int8_through_an_artifact(preset, tmp_path):
    """The medium presets switch ``cpu_fused_block`` on: their int8 artifact (``mixrank export
    --dtype int8``, what a replica loads) runs every block as one VNNI op, and its scores are
    as close to the fp32 artifact's as the unfused int8 lowering's."""
    from pathlib import Path

    from ranking.cli import main
    from ranking.export import load_artifact, write_artifact
    from ranking.train.config import load_experiment

    path = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{preset}.yaml"
    exp = load_experiment(path, require_data=False)
    assert exp.inference.cpu_fused_block
    torch.manual_seed(0)
    model = build_model(exp.model, exp.schema).eval()
    config = {"name": preset, "schema": "criteo", "model": exp.model.to_dict(),
              "inference": exp.inference.options()}  # fmt: skip
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = write_artifact(
        tmp_path / "fp32", weights, config=config, schema=exp.schema, dtype="fp32",
        metrics={"auc": 0.5}, step=1,
    )  # fmt: skip
    out = tmp_path / "int8"
    assert main(["export", "--artifact", str(src), "--out", str(out), "--dtype", "int8"]) == 0
    art, fp32 = load_artifact(out), load_artifact(src)
    low = art.lowered()
    assert all(type(b) in (VnniInt8RankMixer, VnniInt8TokenMixerLarge) for b in low.blocks.blocks)
    batch = random_batch(exp.schema, 300, seed=2)
    opts = {**exp.inference.options(), "cpu_fused_block": False}
    with torch.no_grad():
        want = fp32.predict(batch)
        unfused = torch.sigmoid(
            optimize_for_inference(fp32.model, dtype="int8", **opts)(batch).logits
        )
        got = art.predict(batch)
    assert (got - want).abs().max() <= 1.5 * (unfused - want).abs().max() + 1e-4


def test_the_cpu_kernel_libraries_are_built_where_a_cxx_compiler_is():
    """setup.py builds them as optional extensions: a failed build only warns, and would show
    as skipped tests and slower int8 / bf16 inference."""
    import importlib.util
    import platform
    import shutil
    import sys

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("the C++ libraries are built for x86-64 Linux only")
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler (g++)")
    for name in ("kernels.cpu._int8", "kernels.cpu._block"):
        assert importlib.util.find_spec(name) is not None, f"{name} is not built: run `make setup`"
