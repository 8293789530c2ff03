"""Blocks against their equations, and whole models: gradients reach every parameter, a seed
fixes the output, micro-batching and bf16 keep the result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranking.model.blocks import (
    RankMixerBlock,
    TokenMixerLargeBlock,
    TokenMixerLargeStack,
    UniMixerBlock,
)
from ranking.model.config import ModelConfig
from ranking.model.mixing import UniMixing
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema


def head_mix(x, H):
    """The tensor form from the paper: X.view(B,T,H,D/H).transpose(1,2).reshape(B,H,T*D/H)."""
    B, T, D = x.shape
    return x.view(B, T, H, D // H).transpose(1, 2).reshape(B, H, T * D // H)


def head_revert(y, T):
    B, H, W = y.shape
    return y.view(B, H, T, W // T).transpose(1, 2).reshape(B, T, H * W // T)


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize(
    ("T", "D", "H"), [(4, 16, 4), (8, 64, 8), (3, 12, 2), (5, 10, 5), (2, 6, 3)]
)
def test_token_major_mix_and_revert_move_whole_chunks(dtype, T, D, H):
    """``mix_tm`` / ``revert_tm`` (token-major, copies moved as wide elements where the chunk
    size allows) against an element loop of the definition, also on a tensor that starts at an
    odd offset in its storage and with autograd on (the plain copy)."""
    from ranking.model.blocks import mix_tm, revert_tm

    B, d = 3, D // H
    base = (torch.arange(T * B * D + 1) % 127).to(dtype)
    for x in (base[:-1].view(T, B, D), base[1:].view(T, B, D)):  # aligned / offset by one
        want = torch.empty(H, B, T * d, dtype=dtype)
        for t in range(T):
            for b in range(B):
                for h in range(H):
                    want[h, b, t * d : (t + 1) * d] = x[t, b, h * d : (h + 1) * d]
        got = mix_tm(x, H)
        assert torch.equal(got, want) and got.is_contiguous()
        assert got.data_ptr() != x.data_ptr()
        assert torch.equal(revert_tm(got, T), x)
    if dtype.is_floating_point:
        x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: revert_tm(mix_tm(v, H) * 2, T), (x,))


def test_rankmixer_block_equations():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"arch": "rankmixer", "dim": 16, "num_tokens": 4})
    blk = RankMixerBlock(4, 16, cfg)
    with torch.no_grad():
        for p in (blk.norm1.weight, blk.norm1.bias, blk.norm2.weight, blk.norm2.bias):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 4, 16)
    s = F.layer_norm(head_mix(x, 4) + x, (16,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    f = blk.ffn.ffn
    pffn = torch.stack(
        [F.gelu(s[:, t] @ f.w1[t] + f.b1[t]) @ f.w2[t] + f.b2[t] for t in range(4)], 1
    )
    ref = F.layer_norm(pffn + s, (16,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    y, _aux = blk(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # the CPU token-major path ([T, B, D]) against the same equations, with and without autograd
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            yt = blk.forward_tm(x.transpose(0, 1).contiguous())
        torch.testing.assert_close(yt.transpose(0, 1), ref, atol=1e-5, rtol=1e-5)


def swiglu_ref(m, x):
    Hd = m.hidden
    outs = []
    for t in range(x.shape[1]):
        g, u = m.w_gate_up[t, :, :Hd], m.w_gate_up[t, :, Hd:]
        outs.append((F.silu(x[:, t] @ g) * (x[:, t] @ u)) @ m.w_down[t])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("second_residual", ["input", "reverted"])
@pytest.mark.parametrize(("T", "D", "H"), [(4, 16, 4), (4, 16, 8), (3, 12, 2)])
def test_tokenmixer_large_block_equations(second_residual, T, D, H):
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {
            "arch": "tokenmixer_large",
            "dim": D,
            "num_heads": H,
            "second_residual": second_residual,
            "down_init_scale": 1.0,
        }
    )
    blk = TokenMixerLargeBlock(T, D, H, cfg)
    with torch.no_grad():
        blk.norm1.weight.add_(torch.randn_like(blk.norm1.weight) * 0.3)
        blk.norm2.weight.add_(torch.randn_like(blk.norm2.weight) * 0.3)
    assert all(p.dim() != 1 or "norm" in n for n, p in blk.named_parameters())  # bias-free
    x = torch.randn(2, T, D)
    hm = head_mix(x, H)
    h = hm + swiglu_ref(blk.f1.ffn, rms(hm, blk.norm1.weight))
    r = head_revert(h, T)
    base = x if second_residual == "input" else r
    ref = base + swiglu_ref(blk.f2.ffn, rms(r, blk.norm2.weight))
    y, _ = blk(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            yt = blk.forward_tm(x.transpose(0, 1).contiguous())
        torch.testing.assert_close(yt.transpose(0, 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "rankmixer", "dim": 24, "num_tokens": 4, "num_layers": 2},
        {"arch": "rankmixer", "dim": 24, "num_tokens": 4, "norm": "rms"},
        {"arch": "tokenmixer_large", "dim": 24, "num_heads": 6, "num_layers": 3},
        {"arch": "tokenmixer_large", "dim": 16, "num_heads": 2, "second_residual": "reverted"},
        {"arch": "rankmixer", "dim": 8, "num_tokens": 1},  # T = 1: mixing is the identity
    ],
)
def test_token_major_stack_matches_batch_major(model, monkeypatch):
    """The CPU stacks run token-major; the [B, T, D] path (the one the GPU kernels use) must give
    the same outputs, hidden states and gradients of every parameter."""
    import ranking.model.blocks as blocks_mod

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**model, "down_init_scale": 1.0})
    T = model.get("num_tokens", 4)
    cfg.resolve(T)
    stack = blocks_mod.build_stack(cfg, T)
    x = torch.randn(5, T, cfg.dim)
    assert blocks_mod.token_major(stack.blocks, x)

    def run():
        stack.zero_grad()
        xx = x.clone().requires_grad_()
        out = stack(xx)
        (out.x.sin().sum() + sum(h.cos().sum() for h in out.hidden)).backward()
        grads = {n: p.grad.clone() for n, p in stack.named_parameters()}
        return out, xx.grad, grads

    out_tm, gx_tm, g_tm = run()
    x_before = x.clone()
    with torch.no_grad():
        eval_tm = stack(x).x
    assert torch.equal(x, x_before)  # the input is never written into
    monkeypatch.setattr(blocks_mod, "token_major", lambda blocks, x: False)
    out_bm, gx_bm, g_bm = run()
    torch.testing.assert_close(out_tm.x, out_bm.x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eval_tm, out_bm.x.detach(), atol=1e-5, rtol=1e-5)
    assert len(out_tm.hidden) == len(out_bm.hidden) == cfg.num_layers - 1
    for a, b in zip(out_tm.hidden, out_bm.hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_tm, gx_bm, atol=1e-5, rtol=1e-5)
    assert g_tm.keys() == g_bm.keys()
    for n in g_tm:
        torch.testing.assert_close(g_tm[n], g_bm[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "rankmixer", "dim": 32, "num_tokens": 4},
        {"arch": "rankmixer", "dim": 32, "num_tokens": 4, "norm": "rms"},
        {"arch": "tokenmixer_large", "dim": 32, "num_heads": 4, "num_layers": 2},
    ],
)
def test_compiled_epilogues_keep_the_result(model):
    """``compile_epilogues``: the norms and SwiGLU activations between the GEMMs go through
    torch.compile at inference (fp32: equal to float rounding; bf16: within a couple of bf16
    steps), and training (autograd on) keeps the eager path."""
    import ranking.model.blocks as blocks_mod

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**model, "down_init_scale": 1.0})
    cfg.resolve(4)
    stack = blocks_mod.build_stack(cfg, 4).eval()
    x = torch.randn(7, 4, cfg.dim)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        s, xd = stack.to(dtype), x.to(dtype)
        for b in s.blocks:
            b.compile_epilogues = False
        with torch.no_grad():
            ref = s(xd).x
        for b in s.blocks:
            b.compile_epilogues = True
        with torch.no_grad():
            got = s(xd).x
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    want = {"norm", "swiglu"} if model["arch"] == "tokenmixer_large" else {"norm"}
    assert want <= set(blocks_mod._EPILOGUES)  # the compiled path really ran
    assert not any(blocks_mod._EPILOGUES[k].fell_back for k in want)
    norm = blocks_mod._EPILOGUES["norm"]
    with pytest.raises(RuntimeError):  # a bad input fails eagerly too: no fallback
        norm(x, torch.ones(cfg.dim + 1), None, 1e-6, True)
    assert not norm.fell_back
    stack = stack.float().train()
    torch.manual_seed(1)
    eager = stack(x).x  # compile_epilogues is still on: with autograd it must not apply
    for b in stack.blocks:
        b.compile_epilogues = False
    torch.manual_seed(1)
    assert torch.equal(eager, stack(x).x)


NO_COMPILER_SCRIPT = """
import logging, torch
from ranking.model.config import ModelConfig
from ranking.model.ranker import build_model
from ranking.model.synthetic import random_batch, toy_schema
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
schema = toy_schema()
cfg = {"arch": "tokenmixer_large", "dim": 16, "num_tokens": 4, "num_heads": 4}
m = build_model(ModelConfig.from_dict(cfg), schema).eval()
b = random_batch(schema, 8)
with torch.no_grad():
    ref = m(b).logits
    m.compile_epilogues = True
    first, second = m(b).logits, m(b).logits
    m.compile_epilogues, m.compile = False, True
    whole = m(b).logits
print("EQUAL", torch.equal(first, ref), torch.equal(second, ref), torch.equal(whole, ref))
"""


def test_compile_without_a_cxx_compiler_runs_eagerly(tmp_path):
    """``compile_epilogues`` / ``compile`` where Inductor finds no C++ compiler (the serving
    image has none): the forward runs eagerly with the same result and one warning per
    compiled function, instead of failing every request."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),  # no compiled kernels to reuse
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", NO_COMPILER_SCRIPT],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "EQUAL True True True" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "torch.compile failed" in ln]
    assert len(warnings) == 3, r.stderr[-3000:]  # norm, swiglu, the whole stack: once each
    assert all("running it eagerly" in w and "C++ compiler" in w for w in warnings)


def test_interlayer_residual_every_two_not_after_last():
    class Add(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return x + self.c, x.new_zeros(())

    x = torch.zeros(1, 1, 1)
    out = TokenMixerLargeStack([Add(1.0), Add(1.0), Add(1.0), Add(1.0)], every=2)(x)
    # l1: 1, l2: 2 (+x0=0) -> 2, l3: 3, l4: 4 (last: no extra residual)
    assert float(out.x) == 4.0
    out = TokenMixerLargeStack([Add(1.0)] * 3, every=2)(torch.full((1, 1, 1), 5.0))
    # l1: 6, l2: 7 + 5 = 12, l3: 13
    assert float(out.x) == 13.0 and [float(h) for h in out.hidden] == [6.0, 12.0]


def test_unimixer_block_siamese_equations():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        {"arch": "unimixer", "dim": 8, "block_size": 4, "down_init_scale": 1.0}
    )
    mixing = UniMixing(3, 8, 4, iters=5)
    blk = UniMixerBlock(3, 8, mixing, cfg)
    xb, yb = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    o = mixing(xb + rms(yb, blk.y_norm1.weight))
    xb2, yb2 = rms(xb + o, blk.x_norm1.weight), yb + o
    o2 = swiglu_ref(blk.ffn.ffn, xb2 + rms(yb2, blk.y_norm2.weight))
    ref_x, ref_y = rms(xb2 + o2, blk.x_norm2.weight), yb2 + o2
    x_out, y_out, _ = blk(xb, yb)
    torch.testing.assert_close(x_out, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_out, ref_y, atol=1e-5, rtol=1e-5)


SMALL = {
    "rankmixer": {"arch": "rankmixer", "dim": 16, "num_tokens": 4},
    "rankmixer_moe": {
        "arch": "rankmixer",
        "dim": 16,
        "num_tokens": 4,
        "moe": {"enabled": True, "l1_weight": 0.01},
    },
    "tokenmixer_large": {
        "arch": "tokenmixer_large",
        "dim": 16,
        "num_heads": 8,
        "num_layers": 3,
        "global_token": True,
        "aux_loss_weight": 0.1,
        "token_proj": "mlp",
    },
    "tokenmixer_large_moe": {
        "arch": "tokenmixer_large",
        "dim": 16,
        "num_layers": 2,
        "moe": {"enabled": True},
    },
    "unimixer": {"arch": "unimixer", "dim": 16, "block_size": 8},
    "unimixer_lite": {
        "arch": "unimixer_lite",
        "dim": 16,
        "block_size": 8,
        "flatten": "token_major",
    },
    "dlrm": {"arch": "dlrm", "dense_arch": [16], "over_arch": [32]},
    "dcnv2": {"arch": "dcnv2", "dense_arch": [16], "over_arch": [32], "dcn_rank": 8},
}


@pytest.mark.parametrize("name", list(SMALL))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    schema = toy_schema(num_tasks=2)
    model = build_model(ModelConfig.from_dict(SMALL[name]), schema).train()
    batch = random_batch(schema, 64, seed=1)
    out = model(batch)
    assert out.logits.shape == (64, 2) and out.aux_loss.dim() == 0
    loss = F.binary_cross_entropy_with_logits(out.logits, batch.labels) + out.aux_loss
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", ["rankmixer", "tokenmixer_large", "unimixer_lite", "dcnv2"])
def test_seed_fixes_the_output(name):
    schema = toy_schema()
    batch = random_batch(schema, 32)

    def run(seed):
        torch.manual_seed(seed)
        return build_model(ModelConfig.from_dict(SMALL[name]), schema).eval()(batch).logits

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", ["rankmixer_moe", "tokenmixer_large", "unimixer"])
def test_micro_batch_and_bf16_keep_the_result(name):
    schema = toy_schema(num_tasks=2)
    batch = random_batch(schema, 50)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SMALL[name]), schema).eval()
    with torch.no_grad():
        ref = model(batch).logits
        model.micro_batch = 16
        torch.testing.assert_close(model(batch).logits, ref, atol=1e-5, rtol=1e-5)
        model.compute_dtype = "bf16"
        torch.testing.assert_close(model(batch).logits, ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", [n for n in SMALL if SMALL[n]["arch"] not in ("dlrm", "dcnv2")])
def test_bf16_dense_copy(name):
    """``bf16_dense``: the served bf16 model. Its logits equal those of a deep copy whose stack
    and heads were converted with ``.to(bfloat16)`` (the benchmark's bf16 mode), they stay near
    fp32, and the fp32 model is left as it was, sharing only the tokenizer."""
    import copy

    from ranking.model.ranker import bf16_dense

    schema = toy_schema(num_tasks=2)
    batch = random_batch(schema, 40)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(SMALL[name]), schema).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    ref.blocks.to(torch.bfloat16)
    ref.heads.to(torch.bfloat16)
    for m in ref.blocks.modules():  # keep buffers (UniMixer's temperature) in fp32, as bf16_dense
        for key, buf in m._buffers.items():
            if buf is not None:
                m._buffers[key] = model.get_buffer(_buffer_path(ref, m, key)).clone()
    fast = bf16_dense(model)
    with torch.no_grad():
        want32 = model(batch).logits
        got = fast(batch).logits
        torch.testing.assert_close(got, ref(batch).logits, atol=0, rtol=0)
    torch.testing.assert_close(got.float(), want32, atol=0.1, rtol=0.05)
    assert fast.tokenizer is model.tokenizer and fast.blocks is not model.blocks
    assert all(p.dtype == torch.bfloat16 for p in fast.blocks.parameters())
    assert all(p.dtype == torch.bfloat16 for p in fast.heads.parameters())
    assert all(b.dtype == torch.float32 for b in fast.blocks.buffers())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(
        torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before
    )


def _buffer_path(root, module, key: str) -> str:
    for name, m in root.named_modules():
        if m is module:
            return f"{name}.{key}" if name else key
    raise KeyError(key)


def test_ebc_is_a_submodule_for_sharding():
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    schema = toy_schema()
    for name in ("rankmixer", "tokenmixer_large", "dlrm"):
        model = build_model(ModelConfig.from_dict(SMALL[name]), schema)
        ebcs = [n for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
        assert len(ebcs) == 1
