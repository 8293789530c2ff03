"""FP8 dense inference (``optimize_for_inference(dtype="fp8")``): the per-token GEMMs on e4m3
operands through ``kernels.grouped_linear_fp8`` (Triton on a GPU; on the CPU its reference
twin, an emulation with the same quantization). The fp8 blocks against their equations with an
independent float64 quantized product, every architecture against fp32, and the artifact path
(``mixrank export --dtype fp8``, ``mixrank eval --dtype fp8``: tests/test_int8.py's
``test_export_and_eval_quantized_artifact``). The Triton op itself is tested
in tests/test_kernels_ops.py (``-k fp8``), under the interpreter here and compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_inference import SMALL, TOKEN_MAJOR, _model
from test_int8 import rankmixer_equation, tokenmixer_large_equation

from ranking.export import LOWERING_TOLERANCE
from ranking.inference import InferenceRanker, QuantizedModel, optimize_for_inference
from ranking.lowered import (
    Fp8Linear,
    Fp8RankMixer,
    Fp8SparseMoE,
    Fp8TokenMixerLarge,
    TokenMajorStack,
)
from ranking.model.synthetic import random_batch

E4M3_MAX = 448.0


def _e4m3(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Round to e4m3 with one scale per slice along ``dim`` (max |x| -> 448), dequantized in
    float64: written from the format's definition, not from kernels.reference."""
    x = x.double()
    s = x.abs().amax(dim=dim, keepdim=True) / E4M3_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (x / s).to(torch.float8_e4m3fn).double() * s


def _ref_bmm(x, w, b=None):
    """Per-token ``x [T, B, K] @ w [T, K, N] (+ b [T, N])`` on e4m3 rows and columns, float64."""
    y = torch.bmm(_e4m3(x, -1), _e4m3(w, -2))
    if b is not None:
        y = y + b.double().unsqueeze(1)
    return y.float()


def test_e4m3_rounding_is_within_its_half_ulp():
    """The quantization the emulation uses: 3 mantissa bits, so |error| <= 2^-4 |x| for normal
    values, and the slice maximum is exact."""
    x = torch.randn(64, 100, dtype=torch.float64) * 10
    q = _e4m3(x, -1)
    s = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    normal = (x.abs() / s) >= 2**-6
    assert bool(((q - x).abs() <= 2**-4 * x.abs() + 1e-12)[normal].all())
    torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1), rtol=0, atol=1e-12)


def test_fp8_rankmixer_block_follows_its_equations():
    """The RankMixer block's equation with both GEMMs on e4m3 operands (rows and columns
    scaled on their own)."""
    model, _ = _model("rankmixer")
    block = model.blocks.blocks[0]
    x = torch.randn(block.num_tokens, 30, block.ffn.ffn.w1.shape[1])
    with torch.no_grad():
        want = rankmixer_equation(block, x, _ref_bmm)
        got = Fp8RankMixer(block, torch.float32, torch.device("cpu"))(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_fp8_tokenmixer_large_block_follows_its_equations():
    model, _ = _model("tokenmixer_large_reverted")
    block = model.blocks.blocks[0]
    x = torch.randn(block.num_tokens, 30, block.norm2.weight.shape[0])
    with torch.no_grad():
        want = tokenmixer_large_equation(block, x, _ref_bmm)
        got = Fp8TokenMixerLarge(block, torch.float32, torch.device("cpu"))(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_fp8_scores_do_not_depend_on_the_rest_of_the_batch():
    """Per-row activation scales: a row's output is the same alone and beside a row a hundred
    times larger, for the GEMM and for a whole fp8 model split into other micro-batches."""
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(64, 32)
    x[5] *= 100
    f = Fp8Linear(lin)
    with torch.no_grad():
        full = f(x)
        for i in (0, 5, 63):
            assert torch.equal(f(x[i : i + 1])[0], full[i])
    model, schema = _model("rankmixer")
    batch = random_batch(schema, 40, seed=2)
    a = optimize_for_inference(model, dtype="fp8")(batch).logits
    b = optimize_for_inference(model, dtype="fp8", micro_batch=7)(batch).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(SMALL))
def test_fp8_model_is_close_to_fp32_for_every_architecture(name):
    """Every architecture lowers to fp8: dense RankMixer / TokenMixer-Large blocks become fp8
    blocks, the baselines' linear layers fp8 GEMMs, the rest (UniMixer, MoE stages) stays in
    the float dtype; logits within export's fp8 tolerance of the eager model's, tables shared,
    the eager model untouched."""
    model, schema = _model(name)
    with torch.no_grad():  # make the dense stack matter (small down-projection inits)
        for n, p in model.named_parameters():
            if "w_down" in n or n.endswith("w2"):
                p.mul_(5)
    batch = random_batch(schema, 60, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(batch).logits
    fast = optimize_for_inference(model, dtype="fp8")
    got = fast(batch).logits
    assert got.dtype == torch.float32 and not got.requires_grad
    err = (got - ref).abs()
    atol, rtol = LOWERING_TOLERANCE["fp8"]
    assert bool((err <= atol + rtol * ref.abs()).all()), (name, float(err.max()))
    if isinstance(fast, InferenceRanker):
        assert fast.tokenizer is model.tokenizer
        if name in TOKEN_MAJOR:
            assert isinstance(fast.blocks, TokenMajorStack)
            types = {type(b) for b in fast.blocks.blocks}
            assert types <= {Fp8RankMixer, Fp8TokenMixerLarge} and float(err.max()) > 0
        if name.endswith("_moe"):  # the experts in fp8
            assert any(isinstance(m, Fp8SparseMoE) for m in fast.blocks.modules())
            assert float(err.max()) > 0
    else:
        assert isinstance(fast, QuantizedModel) and fast.swapped >= 2
        assert any(isinstance(m, Fp8Linear) for m in fast.modules())
        ebc = model.model.sparse_arch.embedding_bag_collection
        assert fast.model.model.sparse_arch.embedding_bag_collection is ebc
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["rankmixer_moe", "tokenmixer_large_moe"])
def test_fp8_moe_is_the_routed_sum_of_e4m3_experts(name):
    """``Fp8SparseMoE`` against a slow loop over (row, chosen expert) pairs: ``sum_j w_nj
    FFN_e(x_n)`` with every expert GEMM on e4m3 operands (each permuted row scaled on its own,
    weights per column), plus the shared expert; the same routing and aux as the module."""
    model, _ = _model(name)
    moe = next(m for m in model.modules() if type(m).__name__ == "SparsePerTokenMoE")
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    B, T = 9, moe.num_tokens
    x = torch.randn(B, T, moe.w_up.shape[1])
    with torch.no_grad():
        weights, ids, aux = moe.eval().route(x)
        flat = x.reshape(B * T, -1)
        want = torch.zeros_like(flat, dtype=torch.float64)
        for n in range(B * T):
            for j in range(ids.shape[1]):
                e = int(ids[n, j])
                if e < 0:
                    continue
                xn = flat[n : n + 1]
                if moe.w_gate is not None:
                    w_gu = torch.cat([moe.w_gate[e], moe.w_up[e]], dim=-1)
                    gate, up = _ref_bmm(xn[None], w_gu[None])[0].split(moe.w_up.shape[-1], -1)
                    h = F.silu(gate) * up
                else:
                    h = F.gelu(_ref_bmm(xn[None], moe.w_up[e][None], moe.b_up[e][None])[0])
                b_down = None if moe.b_down is None else moe.b_down[e][None]
                want[n] += (
                    float(weights[n, j])
                    * _ref_bmm(h[None], moe.w_down[e][None], b_down)[0][0].double()
                )
        want = want.float().view(B, T, -1)
        if moe.shared is not None:
            want = want + moe.shared(x)
        got, got_aux = Fp8SparseMoE(moe, torch.float32, torch.device("cpu"))(x)
    assert got_aux == aux
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_fp8_linear_is_the_e4m3_product():
    lin = torch.nn.Linear(37, 11)
    x = torch.randn(5, 3, 37) * 4
    got = Fp8Linear(lin)(x)
    want = (_e4m3(x.reshape(15, 37), -1) @ _e4m3(lin.weight.t(), -2)).float() + lin.bias
    torch.testing.assert_close(got, want.view(5, 3, 11).detach(), atol=1e-5, rtol=1e-5)


def test_bench_stack_inference_rows_on_the_cpu():
    """``bench stack``'s serving-lowering rows (run on a GPU by benchmarks/gpu_check.sh) as a
    logic check on the CPU: the fp32 lowering matches the stack, the fp8 one runs fp8 blocks
    within e4m3's error, and the side-by-side ratio is reported."""
    import time

    from benchmarks.bench_stack_gpu import _config, inference_rows
    from ranking.model.blocks import build_stack

    def timer(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    cases = (
        ("rankmixer_small", ["Fp8RankMixer"]),
        ("tokenmixer_large_small", ["Fp8TokenMixerLarge"]),
        ("tokenmixer_large_small+moe", ["TokenMixerLargeBlock"]),  # experts: Fp8SparseMoE
    )
    for name, blocks in cases:
        cfg, _ = _config(name)
        torch.manual_seed(0)
        stack = build_stack(cfg, cfg.num_tokens)
        x = torch.randn(16, cfg.num_tokens, cfg.dim)
        rows = inference_rows(name, stack, x, timer, flops=1e6, peak=1e12)
        bf, f8, bfg, f8g = rows
        assert [r["lowering"] for r in rows] == ["bf16", "fp8", "bf16+graphs", "fp8+graphs"]
        assert bf["err_vs_fp32"] < 1e-5  # on the CPU the "bf16" row is the fp32 lowering
        assert 0 < f8["err_vs_fp32"] < 0.1, f8
        # the graphs rows (padded to a bucket off the GPU) give the same rows
        assert bfg["err_vs_fp32"] < 1e-5 and abs(f8g["err_vs_fp32"] - f8["err_vs_fp32"]) < 1e-6
        assert f8["blocks"] == blocks and bfg["graph_failed"] is None
        assert f8["fp8_vs_bf16"] > 0 and f8g["graphs_speedup"] > 0 and f8["frac_of_peak"] > 0


def test_serving_lowerings_import_without_torchrec():
    """The GPU benchmark machine has torch and triton only: ``bench stack``'s serving rows (and
    so ``ranking.inference.lower_stack`` and the fp8 blocks) must import without TorchRec."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torchrec', 'fbgemm_gpu'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from benchmarks.bench_stack_gpu import inference_rows\n"
        "from ranking.inference import lower_stack\n"
        "from ranking.lowered import Fp8SparseMoE, CudaGraphs\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
