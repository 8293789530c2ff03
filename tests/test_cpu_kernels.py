"""kernels.cpu: the RankMixer block as one C++ op (AMX GEMMs, fused prologue and epilogues), checked against the block's equations evaluated in float64 with a per-token loop,
with the eager bf16 block's own error as the yardstick.

Skipped where the op cannot run (no AMX bf16 CPU, or the library was not built); the fallback
tests run everywhere."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import kernels.cpu as kc

needs_op = pytest.mark.skipif(kc.ops() is None, reason=f"kernels.cpu: {kc.reason()}")


def _block(T: int, D: int, mult: float, norm: str, seed: int = 0):
    from ranking.model.blocks import RankMixerBlock
    from ranking.model.config import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict(
        {"arch": "rankmixer", "dim": D, "num_tokens": T, "ffn_mult": mult, "norm": norm}
    )
    cfg.resolve(T)
    blk = RankMixerBlock(T, D, cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in blk.parameters():
            if p.dim() <= 2:
                p.add_(torch.randn_like(p) * 0.3)
    return blk


def _lowered(blk, fused: bool):
    """The block as ``optimize_for_inference`` lowers it in bf16 on the CPU: the AMX op
    (``fused``) or the token-major eager block; both take token-major ``[T, B, D]``."""
    from ranking.lowered import (
        AmxRankMixer,
        AmxTokenMixerLarge,
        TokenMajorRankMixer,
        TokenMajorTokenMixerLarge,
    )
    from ranking.model.blocks import RankMixerBlock

    rm = isinstance(blk, RankMixerBlock)
    if fused:
        return (AmxRankMixer if rm else AmxTokenMixerLarge)(blk)
    eager = TokenMajorRankMixer if rm else TokenMajorTokenMixerLarge
    return eager(blk, torch.bfloat16, torch.device("cpu"))


def _reference(blk, x_tm: torch.Tensor) -> torch.Tensor:
    """The block's equations in float64, one token at a time: token-major in and out."""
    T, _, D = x_tm.shape
    d = D // T
    x = x_tm.double().transpose(0, 1)  # [B, T, D]
    # TokenMixing with H = T: mixed token h = concat over t of chunk h of token t
    mixed = torch.stack(
        [torch.cat([x[:, t, h * d : (h + 1) * d] for t in range(T)], -1) for h in range(T)], 1
    )
    rms = isinstance(blk.norm1, torch.nn.RMSNorm)

    def norm(n, v):
        w = n.weight.double()
        if rms:
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + n.eps) * w
        return F.layer_norm(v, (D,), w, n.bias.double(), n.eps)

    s = norm(blk.norm1, mixed + x)
    f = blk.ffn.ffn
    w1, b1, w2, b2 = (p.double() for p in (f.w1, f.b1, f.w2, f.b2))
    y = torch.stack([F.gelu(s[:, t] @ w1[t] + b1[t]) @ w2[t] + b2[t] for t in range(T)], 1)
    return norm(blk.norm2, y + s).transpose(0, 1)


@needs_op
@pytest.mark.parametrize(
    "T, D, mult, norm, B",
    [
        (16, 256, 4, "layer", 256),  # RankMixer medium's block
        (16, 256, 4, "layer", 37),  # rows not a multiple of the 64-row block
        (8, 128, 2, "rms", 100),
        (4, 64, 1, "layer", 1),
        (16, 512, 3, "rms", 130),  # d = 32, hidden 1536
    ],
)
def test_fused_block_matches_the_equations(T, D, mult, norm, B):
    blk = _block(T, D, mult, norm)
    x = torch.randn(T, B, D).to(torch.bfloat16).float()  # the bf16 paths' exact input
    want = _reference(blk, x)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        eager = _lowered(blk, False)(xb)
        got = _lowered(blk, True)(xb)
    assert got.dtype == torch.bfloat16 and got.shape == (T, B, D)
    err = (got.double() - want).abs()
    eager_err = (eager.double() - want).abs()
    # the fused op rounds to bf16 less often than the eager bf16 block: no worse than it
    assert err.max() <= 1.1 * eager_err.max() + 1e-3, (err.max(), eager_err.max())
    assert err.mean() <= 1.1 * eager_err.mean(), (err.mean(), eager_err.mean())
    assert err.max() < 0.1 and eager_err.max() < 0.1  # the reference is the model's math


@needs_op
def test_gelu_is_exact_erf_gelu():
    """Identity weights put the activation in front: with W1 = W2 = I and zero biases the
    block's output is Norm2(GELU(S) + S); as close to the float64 equations as the eager bf16
    block (ATen's erf GELU) and within bf16 rounding of S and of the output."""
    T, D = 4, 64
    blk = _block(T, D, 1, "layer")
    f = blk.ffn.ffn
    with torch.no_grad():
        f.w1.copy_(torch.eye(D).expand(T, D, D))
        f.w2.copy_(torch.eye(D).expand(T, D, D))
        f.b1.zero_()
        f.b2.zero_()
        blk.norm2.weight.fill_(1.0)
        blk.norm2.bias.zero_()
    x = (torch.randn(T, 512, D) * 2).to(torch.bfloat16).float()
    want = _reference(blk, x)
    with torch.no_grad():
        eager = _lowered(blk, False)(x.to(torch.bfloat16)).double()
        got = _lowered(blk, True)(x.to(torch.bfloat16)).double()
    err, eager_err = (got - want).abs(), (eager - want).abs()
    assert err.max() <= 1.1 * eager_err.max() and err.mean() <= 1.1 * eager_err.mean()
    # S rounds to bf16 (2^-9 relative) before the GELU; both terms carry it, then the output
    assert ((got - want).abs() / want.abs().clamp_min(1.0)).max() < 2**-5


def _tml_block(T: int, D: int, H: int, mult: float, second_residual: str):
    from ranking.model.blocks import TokenMixerLargeBlock
    from ranking.model.config import ModelConfig

    torch.manual_seed(1)
    cfg = ModelConfig.from_dict(
        {
            "arch": "tokenmixer_large",
            "dim": D,
            "num_tokens": T,
            "num_heads": H,
            "ffn_mult": mult,
            "tokenmixer_large": {"second_residual": second_residual},
            "down_init_scale": 1.0,
        }
    )
    cfg.resolve(T)
    blk = TokenMixerLargeBlock(T, D, H, cfg).eval()
    with torch.no_grad():
        for n in (blk.norm1, blk.norm2):
            n.weight.add_(torch.randn_like(n.weight) * 0.3)
    return blk


def _tml_reference(blk, x_tm: torch.Tensor) -> torch.Tensor:
    """TokenMixer-Large's equations in float64, one token at a time: token-major in and out."""
    T, _, D = x_tm.shape
    H = blk.num_heads
    x = x_tm.double().transpose(0, 1)  # [B, T, D]
    d = D // H  # head h of the mixed token takes chunk h of every token

    def rms(n, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + n.eps) * n.weight.double()

    def swiglu(f, v):  # per token: W_down (Swish(v W_gate) * v W_up)
        wgu, wd = f.ffn.w_gate_up.double(), f.ffn.w_down.double()
        hd = wd.shape[1]
        outs = []
        for t in range(v.shape[1]):
            gu = v[:, t] @ wgu[t]
            outs.append((F.silu(gu[:, :hd]) * gu[:, hd:]) @ wd[t])
        return torch.stack(outs, 1)

    hm = torch.stack(
        [torch.cat([x[:, t, h * d : (h + 1) * d] for t in range(T)], -1) for h in range(H)], 1
    )
    h = hm + swiglu(blk.f1, rms(blk.norm1, hm))
    w = h.shape[-1] // T  # revert: token t takes chunk t of every mixed token
    r = torch.stack(
        [torch.cat([h[:, k, t * w : (t + 1) * w] for k in range(H)], -1) for t in range(T)], 1
    )
    base = x if blk.second_residual == "input" else r
    return (base + swiglu(blk.f2, rms(blk.norm2, r))).transpose(0, 1)


@needs_op
@pytest.mark.parametrize(
    "T, D, H, mult, residual, B",
    [
        (16, 256, 16, 4, "input", 256),  # TokenMixer-Large medium's block
        (8, 128, 4, 2, "reverted", 37),  # W = 256, rows not a multiple of 32
        (4, 64, 2, 1.5, "input", 65),  # W = 128, hidden 192 and 96
    ],
)
def test_fused_tokenmixer_large_block_matches_the_equations(T, D, H, mult, residual, B):
    blk = _tml_block(T, D, H, mult, residual)
    x = torch.randn(T, B, D).to(torch.bfloat16).float()
    want = _tml_reference(blk, x)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        eager = _lowered(blk, False)(xb)
        got = _lowered(blk, True)(xb)
    err, eager_err = (got.double() - want).abs(), (eager.double() - want).abs()
    assert err.max() <= 1.1 * eager_err.max() + 1e-3, (err.max(), eager_err.max())
    assert err.mean() <= 1.1 * eager_err.mean(), (err.mean(), eager_err.mean())
    # the reference is the model's own math: bf16 rounding away from it, relative to its scale
    assert eager_err.max() < 0.05 * want.abs().max() and err.max() < 0.05 * want.abs().max()


@needs_op
def test_the_op_owns_its_packed_weights():
    """Lowering packs the weights once: changing the trained block afterwards does not reach
    the lowered op (lower again to serve new weights), and the new lowering follows them."""
    blk = _block(16, 256, 4, "layer")
    x = torch.randn(16, 64, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        op = _lowered(blk, True)
        before = op(x)
        blk.ffn.ffn.w1.mul_(-1.0)
        assert torch.equal(op(x), before)
        after = _lowered(blk, True)(x)
        eager = _lowered(blk, False)(x)
    assert not torch.allclose(before.float(), after.float(), atol=0.1)
    assert (after.float() - eager.float()).abs().max() < 0.1


def test_training_and_fp32_never_take_the_op():
    """Training runs the block's own forward; fp32 inference lowers to the token-major block,
    never the op, even with cpu_fused_block asked for."""
    from ranking.inference import lower_stack
    from ranking.lowered import AmxRankMixer, TokenMajorRankMixer
    from ranking.model.blocks import RankMixerStack

    stack = RankMixerStack([_block(16, 256, 4, "layer")])
    low = lower_stack(stack, torch.float32, torch.device("cpu"), cpu_fused_block=True)
    assert isinstance(low.blocks[0], TokenMajorRankMixer)
    assert not any(isinstance(m, AmxRankMixer) for m in stack.modules())


def test_unavailable_op_falls_back_with_one_warning(monkeypatch, caplog):
    import ranking.inference as inference
    from ranking.inference import lower_stack
    from ranking.lowered import TokenMajorRankMixer
    from ranking.model.blocks import RankMixerStack

    monkeypatch.setattr(kc.LIBRARY, "state", {"ops": None, "why": "no AMX here (test)"})
    monkeypatch.setattr(inference, "_WARNED", set())
    stack = RankMixerStack([_block(16, 256, 4, "layer"), _block(16, 256, 4, "layer", seed=1)])
    x = torch.randn(20, 16, 256)
    with caplog.at_level(logging.WARNING, logger="ranking.inference"):
        low = lower_stack(stack, torch.bfloat16, torch.device("cpu"), cpu_fused_block=True)
        lower_stack(stack, torch.bfloat16, torch.device("cpu"), cpu_fused_block=True)
    assert all(isinstance(b, TokenMajorRankMixer) for b in low.blocks)
    eager = lower_stack(stack, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(low(x.bfloat16()).x, eager(x.bfloat16()).x)
    msgs = [r.getMessage() for r in caplog.records if "cpu_fused_block" in r.getMessage()]
    assert len(msgs) == 1 and "no AMX here (test)" in msgs[0]


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setattr(kc.LIBRARY, "state", {})
    monkeypatch.setenv("MIXRANK_CPU_KERNELS", "0")
    assert kc.ops() is None and "MIXRANK_CPU_KERNELS=0" in kc.reason()


@needs_op
def test_bad_inputs_name_the_argument():
    lib = kc.ops()
    with pytest.raises(RuntimeError, match="pack_tiles: N % 32 and K % 32"):
        lib.pack_tiles(torch.zeros(2, 64, 48, dtype=torch.bfloat16))
    blk = _block(4, 64, 1, "layer")
    prepared = kc.prepare_rankmixer(
        (blk.norm1.weight, blk.norm1.bias, 1e-5),
        blk.ffn.ffn.w1,
        blk.ffn.ffn.b1,
        blk.ffn.ffn.w2,
        blk.ffn.ffn.b2,
        (blk.norm2.weight, blk.norm2.bias, 1e-5),
        False,
    )
    with pytest.raises(RuntimeError, match="x must be a contiguous CPU bfloat16"):
        kc.rankmixer_block(torch.zeros(4, 8, 64), prepared)
    with pytest.raises(RuntimeError, match="w1p does not match x"):
        kc.rankmixer_block(torch.zeros(4, 8, 128, dtype=torch.bfloat16), prepared)


@needs_op
@pytest.mark.parametrize("preset", ["rankmixer_medium", "tokenmixer_large_medium"])
def test_preset_runs_the_op_through_the_ranker(preset):
    """The medium presets switch it on (``inference.cpu_fused_block``); through
    ``optimize_for_inference`` in bf16 (what ``Artifact.predict`` runs) the logits stay as close
    to the fp32 model as the eager bf16 model's."""
    from pathlib import Path

    from ranking.inference import optimize_for_inference
    from ranking.lowered import AmxRankMixer, AmxTokenMixerLarge
    from ranking.model.ranker import build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.config import load_experiment

    path = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{preset}.yaml"
    exp = load_experiment(path, require_data=False)
    assert exp.inference.cpu_fused_block
    torch.manual_seed(0)
    model = build_model(exp.model, exp.schema).eval()
    batch = random_batch(exp.schema, 300)
    opts = exp.inference.options()
    with torch.no_grad():
        want = model(batch).logits
        m = optimize_for_inference(model, dtype="bf16", **opts)
        got = m(batch).logits.float()
        e = optimize_for_inference(model, dtype="bf16", **{**opts, "cpu_fused_block": False})
        eager = e(batch).logits.float()
    assert all(isinstance(b, AmxRankMixer | AmxTokenMixerLarge) for b in m.blocks.blocks)
    assert (got - want).abs().max() <= 1.5 * (eager - want).abs().max() + 1e-3


@needs_op
def test_ops_fake_kernels_agree_with_the_real_ones():
    """``torch.library.opcheck``: each AMX op's schema holds and its fake kernel (what
    ``torch.compile`` traces) gives the real output's shape, dtype and strides."""
    blk = _block(8, 128, 2, "layer")
    f = _lowered(blk, True)
    x = torch.randn(8, 40, 128).to(torch.bfloat16)
    torch.library.opcheck(kc.ops().rankmixer_block, (x, *f.prepared, 64))
    t = _lowered(_tml_block(4, 128, 4, 2, "input"), True)
    z = torch.randn(4, 40, 128).to(torch.bfloat16)
    torch.library.opcheck(kc.ops().swiglu_stage, (z, z.clone(), *t.prepared[0], 64))
