"""Int8 CPU inference (``kernels.cpu.int8``, ``optimize_for_inference(dtype="int8")``): the
GEMM against the exact integer product, scores independent of the batch, the int8 blocks
against their equations computed with the reference twin, every architecture against fp32,
and the artifact path (``mixrank export --dtype int8``, ``mixrank eval --dtype int8``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_inference import SMALL, TOKEN_MAJOR, _model

from kernels.cpu import int8, vnni
from ranking.export import LOWERING_TOLERANCE
from ranking.inference import InferenceRanker, QuantizedModel, optimize_for_inference
from ranking.lowered import (
    Int8Linear,
    Int8RankMixer,
    Int8SparseMoE,
    Int8SwiGLU,
    Int8TokenMixerLarge,
    TokenMajorStack,
    int8_gemms,
    mix_tm,
    revert_tm,
)
from ranking.model.blocks import UniMixerStack
from ranking.model.ffn import SparsePerTokenMoE
from ranking.model.synthetic import random_batch

HOST_BITS = int8.weight_bits()


def _ref_linear(x, w, b=None):
    """The reference twin on weights quantized the documented way (max |column| / Q)."""
    qmax = 2 ** (HOST_BITS - 1) - 1
    s = w.abs().amax(0) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(w / s).to(torch.int8)
    return int8.int8_linear_reference(x, q, s, b)


# ----------------------------------------------------------------------------- the GEMM


@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 3), (37, 64, 48), (256, 300, 130)])
def test_int8_linear_is_the_exact_integer_product(shape, emulated, monkeypatch):
    """oneDNN's kernel (and the fp32 emulation where oneDNN is missing) gives the exactly
    summed integer product of the documented quantization, and stays within int8's error of
    the fp32 product; a row of zeros and a column of zeros give zeros."""
    if emulated:
        monkeypatch.setitem(int8._state, "onednn", False)
    elif not int8.has_onednn():
        pytest.skip("this torch build has no oneDNN quantized linear")
    M, K, N = shape
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g) * 3
    w = torch.randn(K, N, generator=g)
    b = torch.randn(N, generator=g)
    x[0] = 0
    w[:, -1] = 0
    W = int8.Int8Weight(w, b, keep_q=True)
    assert (W.packed is None) == emulated
    got = int8.int8_linear(x, W)
    want = _ref_linear(x, w, b)
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=1e-5)
    assert torch.equal(got[0], b)  # zero row: only the bias
    assert torch.equal(got[:, -1], b[-1].expand(M))  # zero column: only its bias
    exact = x.double() @ w.double() + b.double()
    rel = float((got.double() - exact).norm() / exact.norm())
    assert rel < 0.03, rel  # 8-bit rows, 7-8 bit columns: about 1-2% on Gaussian data
    # the weight round trip: |w - w_q s| <= s / 2 per column
    assert bool(((W.dequantized() - w).abs() <= W.scale / 2 + 1e-7).all())


def test_weight_bits_follow_the_cpu_and_the_override(monkeypatch):
    """7-bit weights where the CPU lacks VNNI / AMX-INT8 (AVX2's saturating u8 x s8 pairs),
    8-bit with them; ``MIXRANK_INT8_WEIGHT_BITS`` overrides, a bad value names the variable."""
    flags = int8._cpu_flags()
    assert (8 if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else 7) == HOST_BITS
    W = int8.Int8Weight(torch.randn(40, 8), keep_q=True)
    assert int(W.q.abs().max()) == 2 ** (HOST_BITS - 1) - 1
    monkeypatch.setenv("MIXRANK_INT8_WEIGHT_BITS", "8")
    assert int8.weight_bits() == 8
    monkeypatch.setenv("MIXRANK_INT8_WEIGHT_BITS", "6")
    with pytest.raises(ValueError, match="MIXRANK_INT8_WEIGHT_BITS"):
        int8.weight_bits()


def test_scores_do_not_depend_on_the_rest_of_the_batch():
    """Per-row activation scales: a row's output is the same alone, in a batch and in another
    micro-batch split, for the GEMM and for a whole int8 model (unlike a per-tensor scale)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    x[5] *= 100  # an outlier row would change a per-tensor scale for everyone
    W = int8.Int8Weight(torch.randn(32, 16, generator=g))
    full = int8.int8_linear(x, W)
    for i in (0, 5, 63):
        assert torch.equal(int8.int8_linear(x[i : i + 1], W)[0], full[i])
    model, schema = _model("rankmixer")
    batch = random_batch(schema, 40, seed=2)
    a = optimize_for_inference(model, dtype="int8")(batch).logits
    b = optimize_for_inference(model, dtype="int8", micro_batch=7)(batch).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_int8_bmm_is_int8_linear_per_token():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 20, 24, generator=g)
    ws = [int8.Int8Weight(torch.randn(24, 10, generator=g), torch.randn(10)) for _ in range(3)]
    out = int8.int8_bmm(x, ws)
    for t in range(3):
        assert torch.equal(out[t], int8.int8_linear(x[t], ws[t]))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 7, 40, 24), (5, 33, 32, 128), (3, 16, 300, 20)])
def test_int8_routes_give_the_same_bytes(shape, bias):
    """``Int8PerToken``'s two routes, one oneDNN call per token and one exact fp32 ``bmm`` of
    the integers, give bit-identical outputs, and both equal ``int8_bmm`` per token; the
    integers' sums are exactly the float64 ones (the reference twin)."""
    if not int8.has_onednn():
        pytest.skip("this torch build has no oneDNN quantized linear")
    T, B, K, N = shape
    g = torch.Generator().manual_seed(K)
    w, x = torch.randn(T, K, N, generator=g), torch.randn(T, B, K, generator=g) * 2
    b = torch.randn(T, N, generator=g) if bias else None
    x[0, 1] = 0
    one = int8.Int8PerToken(w, b, route="onednn")
    exact = int8.Int8PerToken(w, b, route="exact_fp32")
    assert (one.route, exact.route) == ("onednn", "exact_fp32")
    got_one, got_exact = one(x), exact(x)
    assert torch.equal(got_one, got_exact)
    if vnni.ops() is not None:  # the AVX512-VNNI kernel's route: the same bytes again
        fast = int8.Int8PerToken(w, b, route="vnni")
        assert fast.route == "vnni" and fast.weights == [] and fast.wf is None
        assert torch.equal(fast(x), got_one)
    ws = [int8.Int8Weight(w[t], None if b is None else b[t]) for t in range(T)]
    assert torch.equal(got_one, int8.int8_bmm(x, ws))
    torch.testing.assert_close(got_exact, _ref_bmm(x, w, b), atol=1e-5, rtol=1e-5)
    # the exact route's weights are the integers, once; the oneDNN route keeps only the packed
    assert exact.weights == [] and torch.equal(exact.wf, exact.wf.round())
    assert all(wt.q is None and wt.packed is not None for wt in one.weights)


def test_exact_fp32_route_is_bounded_where_fp32_sums_are_exact(monkeypatch):
    """At the bound ``K * 127 * Q_w <= 2^24`` the worst case (every product at its largest)
    still sums exactly in fp32; one past it an fp32 sum can round, so the exact route is
    refused there (naming the bound) and ``auto`` keeps oneDNN."""
    for bits in (7, 8):
        qmax = 2 ** (bits - 1) - 1
        k = (1 << 24) // (127 * qmax)
        assert int8.exact_in_fp32(k, bits) and not int8.exact_in_fp32(k + 1, bits)
        ones = torch.full((1, k), 127.0)
        assert float(ones @ torch.full((k, 1), float(qmax))) == k * 127 * qmax
    # past the bound, fp32 rounds: the reason for it (odd sums above 2^24 are not fp32s)
    big = 2**24 + 1
    assert float(torch.tensor(float(big))) != big
    monkeypatch.setenv("MIXRANK_INT8_WEIGHT_BITS", "8")
    k = (1 << 24) // (127 * 127) + 1
    with pytest.raises(ValueError, match="2\\^24"):
        int8.Int8PerToken(torch.randn(1, k, 4), route="exact_fp32")
    assert int8.Int8PerToken(torch.randn(1, k, 4)).route in ("onednn", "vnni")


def test_a_large_layer_never_makes_the_exact_routes_weights(monkeypatch):
    """Past the exact route's 8 MiB cap the fp32 integers are never made, not even to time
    the route at load (a D = 768 layer's would be hundreds of MB)."""
    if not int8.has_onednn():
        pytest.skip("this torch build has no oneDNN quantized linear")
    made = []
    real = int8.Int8PerToken._integers
    monkeypatch.setattr(
        int8.Int8PerToken, "_integers", lambda self: made.append(self.k) or real(self)
    )
    big = int8.Int8PerToken(torch.randn(3, 512, 1400))  # 8.6 MB of fp32
    assert big.route in ("onednn", "vnni") and big.wf is None and made == []
    small = int8.Int8PerToken(torch.randn(3, 32, 64))
    assert set(made) == {32} and (small.wf is None) == (small.route != "exact_fp32")


def test_auto_route_and_its_override(monkeypatch):
    """``auto`` times both routes and keeps one of them; ``MIXRANK_INT8_ROUTE`` forces one and a
    bad value names the variable; a bad ``route`` argument names the argument."""
    w = torch.randn(4, 32, 64)
    assert int8.Int8PerToken(w, rows=64).route in int8.ROUTES
    monkeypatch.setenv("MIXRANK_INT8_ROUTE", "onednn")
    assert int8.Int8PerToken(w).route == ("onednn" if int8.has_onednn() else "exact_fp32")
    monkeypatch.setenv("MIXRANK_INT8_ROUTE", "exact_fp32")
    assert int8.Int8PerToken(w).route == "exact_fp32"
    monkeypatch.setenv("MIXRANK_INT8_ROUTE", "fast")
    with pytest.raises(ValueError, match="MIXRANK_INT8_ROUTE"):
        int8.Int8PerToken(w)
    monkeypatch.delenv("MIXRANK_INT8_ROUTE")
    with pytest.raises(ValueError, match="route"):
        int8.Int8PerToken(w, route="fast")


@pytest.mark.parametrize("name", ["dlrm", "dcnv2"])
def test_baselines_fuse_their_relus_into_the_gemms(name):
    """A baseline's MLP layers (TorchRec ``Perceptron``: linear then ReLU) become one int8 GEMM
    with the ReLU in its store, scoring the same bytes as the layers swapped one linear at a
    time with the Perceptron's own ReLU after them."""
    from torchrec.modules.mlp import Perceptron

    from ranking.lowered import Int8Linear

    model, schema = _model(name)
    fused = optimize_for_inference(model, dtype="int8")
    plain = QuantizedModel(model, Int8Linear)
    relus = [m for m in fused.modules() if isinstance(m, Int8Linear) and m.relu]
    assert relus and not any(isinstance(m, Perceptron) for m in fused.modules())
    assert any(isinstance(m, Perceptron) for m in plain.modules())
    batch = random_batch(schema, 40, seed=6)
    with torch.no_grad():
        assert torch.equal(fused(batch).logits, plain(batch).logits)


@pytest.mark.parametrize("name", ["rankmixer", "tokenmixer_large_reverted", "dlrm", "dcnv2"])
def test_a_model_scores_the_same_bytes_on_either_route(name, monkeypatch):
    """The route is a speed choice only: a whole int8 model (mixer blocks, or a baseline's
    linear layers) gives bit-identical logits with every GEMM on oneDNN, every GEMM on the
    exact fp32 route and (where the CPU has it) every GEMM on the VNNI kernel."""
    if not int8.has_onednn():
        pytest.skip("this torch build has no oneDNN quantized linear")
    model, schema = _model(name)
    batch = random_batch(schema, 33, seed=4)
    logits = {}
    for route in int8.ROUTES:
        if route == "vnni" and vnni.ops() is None:
            continue
        monkeypatch.setenv("MIXRANK_INT8_ROUTE", route)
        low = optimize_for_inference(model, dtype="int8")
        routes = {m.route for m in int8_gemms(low)}
        assert routes == {route}, routes
        logits[route] = low(batch).logits
    first = logits.pop("onednn")
    assert logits and all(torch.equal(first, other) for other in logits.values())


# ----------------------------------------------------------------------------- the blocks


def _ref_bmm(x, w, b=None):
    return torch.stack(
        [_ref_linear(x[t], w[t], None if b is None else b[t]) for t in range(x.shape[0])]
    )


def _norm(n, x):
    if isinstance(n, torch.nn.RMSNorm):
        return F.rms_norm(x, (x.shape[-1],), n.weight, n.eps or 1e-6)
    return F.layer_norm(x, (x.shape[-1],), n.weight, n.bias, n.eps)


def rankmixer_equation(block, x, bmm):
    """``Norm2(W2_t GELU(W1_t S_t + b1_t) + b2_t + S_t)``, ``S = Norm1(Mix(X) + X)`` on
    token-major ``x``, each per-token GEMM ``bmm(x, w, b)`` (the quantized product under test)."""
    ffn = block.ffn.ffn
    s = _norm(block.norm1, mix_tm(x, block.num_tokens) + x)
    h = F.gelu(bmm(s, ffn.w1, ffn.b1))
    return _norm(block.norm2, bmm(h, ffn.w2, ffn.b2) + s)


def tokenmixer_large_equation(block, x, bmm):
    """``Hm = Mix(X)``, ``H' = Hm + F1(RMSNorm(Hm))``, ``base + F2(RMSNorm(Revert(H')))`` with
    ``F = W_down (Swish(gate) * up)``, each GEMM ``bmm(x, w)``."""

    def stage(f, z):
        gate, up = bmm(z, f.w_gate_up).split(f.hidden, dim=-1)
        return bmm(F.silu(gate) * up, f.w_down)

    hm = mix_tm(x, block.num_heads)
    r = revert_tm(hm + stage(block.f1.ffn, _norm(block.norm1, hm)), block.num_tokens)
    base = x if block.second_residual == "input" else r
    return base + stage(block.f2.ffn, _norm(block.norm2, r))


def test_int8_rankmixer_block_follows_its_equations():
    """The RankMixer block's equation with both GEMMs the reference twin's int8 products."""
    model, _ = _model("rankmixer")
    block = model.blocks.blocks[0]
    x = torch.randn(block.num_tokens, 30, block.ffn.ffn.w1.shape[1])
    with torch.no_grad():
        want = rankmixer_equation(block, x, _ref_bmm)
        got = Int8RankMixer(block)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_int8_tokenmixer_large_block_follows_its_equations():
    model, _ = _model("tokenmixer_large_reverted")
    block = model.blocks.blocks[0]
    x = torch.randn(block.num_tokens, 30, block.norm2.weight.shape[0])
    with torch.no_grad():
        want = tokenmixer_large_equation(block, x, _ref_bmm)
        got = Int8TokenMixerLarge(block)(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unimixer_int8_ffn_follows_its_equation():
    """``Int8SwiGLU`` (UniMixer's per-token SwiGLU in int8) on ``[B, T, D]``: ``W_down (Swish(
    gate) * up)`` per token with the reference twin's int8 products, closer to it than to the
    fp32 FFN (whose distance is int8's own error)."""
    from ranking.model.ffn import PerTokenSwiGLU

    torch.manual_seed(3)
    ffn = PerTokenSwiGLU(4, 32, 96, 1.0).eval()
    x = torch.randn(50, 4, 32)

    def equation(bmm):
        xt = x.transpose(0, 1)
        gate, up = bmm(xt, ffn.w_gate_up).split(ffn.hidden, dim=-1)
        return bmm(F.silu(gate) * up, ffn.w_down).transpose(0, 1)

    with torch.no_grad():
        got = Int8SwiGLU(ffn)(x)
        want = equation(_ref_bmm)
        fp32 = ffn(x)
    assert got.shape == x.shape
    err, int8_err = float((got - want).abs().max()), float((fp32 - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()) and int8_err > 100 * err, (err, int8_err)


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("name", list(SMALL))
def test_int8_model_is_close_to_fp32_for_every_architecture(name):
    """Every architecture lowers to int8: the dense RankMixer / TokenMixer-Large blocks become
    int8 blocks, UniMixer's dense per-token SwiGLUs int8 FFNs, MoE experts grouped int8 GEMMs
    (where the VNNI op runs), the baselines' linear layers int8 GEMMs, the rest (UniMixer's
    mixing, the routers) stays fp32; logits stay within int8's error of the eager model's, tables are shared, the eager
    model is left as it was."""
    model, schema = _model(name)
    with torch.no_grad():  # make the dense stack matter (small down-projection inits)
        for n, p in model.named_parameters():
            if "w_down" in n or n.endswith("w2"):
                p.mul_(5)
    batch = random_batch(schema, 60, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(batch).logits
    fast = optimize_for_inference(model, dtype="int8")
    got = fast(batch).logits
    assert got.dtype == torch.float32 and not got.requires_grad
    err = (got - ref).abs()
    atol, rtol = LOWERING_TOLERANCE["int8"]  # what export's lowering check allows
    assert bool((err <= atol + rtol * ref.abs()).all()), (name, float(err.max()))
    err = float(err.max())
    if isinstance(fast, InferenceRanker):
        assert fast.tokenizer is model.tokenizer
        types = {type(b) for b in getattr(fast.blocks, "blocks", [])}
        if name in TOKEN_MAJOR:
            assert isinstance(fast.blocks, TokenMajorStack)
            assert types <= {Int8RankMixer, Int8TokenMixerLarge} and err > 0
        # MoE experts: grouped int8 GEMMs where the VNNI op runs (a shared expert an Int8SwiGLU)
        moes = [m for m in model.blocks.modules() if isinstance(m, SparsePerTokenMoE)]
        int8_moes = [m for m in fast.blocks.modules() if isinstance(m, Int8SparseMoE)]
        assert len(int8_moes) == (len(moes) if vnni.ops() is not None else 0), name
        shared = sum(m.shared is not None for m in moes) if int8_moes else 0
        ffns = [m for m in fast.blocks.modules() if isinstance(m, Int8SwiGLU)]
        dense_unimixer = isinstance(model.blocks, UniMixerStack) and not moes
        assert len(ffns) == (len(model.blocks.blocks) if dense_unimixer else 0) + shared, name
        assert not (dense_unimixer or int8_moes) or err > 0
    else:
        assert isinstance(fast, QuantizedModel) and fast.swapped >= 2
        assert any(isinstance(m, Int8Linear) for m in fast.modules())
        ebc = model.model.sparse_arch.embedding_bag_collection
        assert fast.model.model.sparse_arch.embedding_bag_collection is ebc
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_int8_is_refused_off_the_cpu():
    model, _ = _model("rankmixer")
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        optimize_for_inference(model, dtype="int8", device="meta")


# ----------------------------------------------------------------------------- the artifact


def _fp32_artifact_and_data(tmp_path):
    """A RankMixer artifact on the synthetic Frappe schema (perturbed weights) and rows."""
    from ranking.data.synth import write_synthetic
    from ranking.export import _build, write_artifact
    from ranking.features import load_schema

    schema = load_schema("frappe")
    model_cfg = {"arch": "rankmixer", "dim": 16, "num_tokens": 4, "num_layers": 1}
    config = {"name": "int8", "schema": "frappe", "model": model_cfg}
    torch.manual_seed(0)
    model, _ = _build(config, schema.to_dict(), "test")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    art = write_artifact(
        tmp_path / "fp32", weights, config=config, schema=schema, dtype="fp32",
        metrics={"auc": 0.5}, step=1,
    )  # fmt: skip
    write_synthetic("frappe", 3000, tmp_path / "data", seed=1, progress=False)
    return art, tmp_path / "data"


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_export_and_eval_quantized_artifact(tmp_path, capsys, dtype):
    """``mixrank export --artifact A --out B --dtype int8|fp8`` writes a quantized artifact
    (manifest ``dtype``, the lowering check passed; fp8 on the CPU: the emulation) whose
    predictions are that lowering's; ``mixrank eval --dtype`` scores the fp32 artifact
    quantized, close to its fp32 AUC."""
    from ranking.cli import main
    from ranking.export import load_artifact, read_manifest

    src, data = _fp32_artifact_and_data(tmp_path)
    out = tmp_path / dtype
    assert main(["export", "--artifact", str(src), "--out", str(out), "--dtype", dtype]) == 0
    assert read_manifest(out)["dtype"] == dtype
    aq = load_artifact(out)
    assert aq.dtype == dtype
    fp = load_artifact(src)
    batch = random_batch(aq.schema, 50, seed=5)
    want = torch.sigmoid(optimize_for_inference(fp.model, dtype=dtype)(batch).logits)
    torch.testing.assert_close(aq.predict(batch), want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(fp.predict(batch), aq.predict(batch))
    capsys.readouterr()
    assert main(["eval", "--artifact", str(src), "--data", str(data), "--dtype", dtype]) == 0
    mq = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--artifact", str(src), "--data", str(data)]) == 0
    m32 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mq["rows"] == m32["rows"] > 0
    assert abs(mq["auc"] - m32["auc"]) < 0.005, (mq, m32)


def test_compiled_quantize_gives_the_same_bytes_and_the_same_blocks():
    """With ``compile_epilogues`` the int8 blocks quantize through the compiled function (one
    pass): the same bytes and scales as the eager one, and the same block outputs (where no C++
    compiler exists it falls back to the eager function: the same, trivially)."""
    from ranking.lowered import compiled

    x = torch.randn(3, 20, 48) * torch.rand(3, 20, 1) * 4
    x[1, 3] = 0
    for eager in (int8.quantize_rows, int8.quantize_rows_int):
        fn = compiled(f"test_{eager.__name__}", eager)
        (qa, sa), (qb, sb) = eager(x.clone()), fn(x.clone())
        assert torch.equal(qa, qb) and torch.equal(sa, sb)
    # the two routes' quantizations are the same integers
    (q8, s8), (qi, si) = int8.quantize_rows(x), int8.quantize_rows_int(x)
    assert torch.equal(q8.float() - int8.ACT_ZERO_POINT, qi) and torch.equal(s8, si)
    for name, cls in (
        ("rankmixer", Int8RankMixer),
        ("tokenmixer_large_reverted", Int8TokenMixerLarge),
    ):
        model, _ = _model(name)
        block = model.blocks.blocks[0]
        D = block.norm2.weight.shape[0]
        x = torch.randn(block.num_tokens, 24, D)
        with torch.no_grad():
            eager, comp = cls(block)(x.clone()), cls(block, compile_epilogues=True)(x.clone())
        torch.testing.assert_close(comp, eager, atol=1e-4, rtol=1e-4)


def test_packed_weights_are_held_once():
    """With oneDNN the packed copy alone serves: the int8 values are dropped after packing
    (``keep_q`` keeps them), the product is unchanged, and ``dequantized`` says why it cannot."""
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(48, 24, generator=g), torch.randn(5, 48, generator=g)
    lean, kept = int8.Int8Weight(w), int8.Int8Weight(w, keep_q=True)
    if lean.packed is None:
        pytest.skip("no oneDNN in this torch build: the emulation keeps q")
    assert lean.q is None and kept.q is not None
    assert torch.equal(int8.int8_linear(x, lean), int8.int8_linear(x, kept))
    with pytest.raises(ValueError, match="dropped after packing"):
        lean.dequantized()
