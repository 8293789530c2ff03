"""Per-token FFNs and the sparse MoE against slow loops over samples, tokens and experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranking.model.ffn import PerTokenFFN, PerTokenSwiGLU, SparsePerTokenMoE


def test_per_token_ffn_matches_loop():
    torch.manual_seed(0)
    m = PerTokenFFN(3, 8, 32)
    with torch.no_grad():
        m.b1.normal_()
        m.b2.normal_()
    x = torch.randn(4, 3, 8)
    ref = torch.stack(
        [F.gelu(x[:, t] @ m.w1[t] + m.b1[t]) @ m.w2[t] + m.b2[t] for t in range(3)], dim=1
    )
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    # weights are per token: changing token 1's weights leaves tokens 0 and 2 alone
    with torch.no_grad():
        m.w1[1].mul_(2)
    y = m(x)
    torch.testing.assert_close(y[:, [0, 2]], ref[:, [0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, 1], ref[:, 1])


def test_per_token_swiglu_matches_loop_and_init():
    torch.manual_seed(0)
    m = PerTokenSwiGLU(3, 8, 16, down_init_scale=0.01)
    x = torch.randn(4, 3, 8)
    ref = []
    for t in range(3):
        gate, up = m.w_gate_up[t, :, :16], m.w_gate_up[t, :, 16:]
        ref.append((F.silu(x[:, t] @ gate) * (x[:, t] @ up)) @ m.w_down[t])
    torch.testing.assert_close(m(x), torch.stack(ref, 1), atol=1e-6, rtol=1e-5)
    assert m.w_down.abs().max() <= 0.01 / 16**0.5 + 1e-9
    assert m.w_gate_up.abs().max() > 0.1


def rankmixer_expert(m, g, x):
    return F.gelu(x @ m.w_up[g] + m.b_up[g]) @ m.w_down[g] + m.b_down[g]


def tml_expert(m, g, x):
    return (F.silu(x @ m.w_gate[g]) * (x @ m.w_up[g])) @ m.w_down[g]


def test_rankmixer_moe_all_active_equals_dense_sum():
    torch.manual_seed(0)
    T, D, E = 3, 8, 4
    m = SparsePerTokenMoE(T, D, E, 16, kind="rankmixer", l1_weight=0.5).eval()
    with torch.no_grad():
        m.router_infer_bias.fill_(5.0)  # every ReLU gate open
        m.b_up.normal_()
        m.b_down.normal_()
    x = torch.randn(5, T, D)
    y, aux = m(x)
    ref = torch.zeros_like(x)
    l1 = 0.0
    for b in range(5):
        for t in range(T):
            logits = x[b, t] @ m.router_infer[t] + m.router_infer_bias[t]
            assert (logits > 0).all()
            for e in range(E):
                ref[b, t] += logits[e] * rankmixer_expert(m, t * E + e, x[b, t])
                l1 += logits[e].item()
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert float(aux) == pytest.approx(0.5 * l1 / 5, rel=1e-5)


def test_rankmixer_moe_sparse_gate_skips_closed_experts():
    torch.manual_seed(1)
    T, D, E = 2, 8, 6
    m = SparsePerTokenMoE(T, D, E, 8, kind="rankmixer").eval()
    x = torch.randn(7, T, D)
    y, _ = m(x)
    ref = torch.zeros_like(x)
    closed = 0
    for b in range(7):
        for t in range(T):
            g = torch.relu(x[b, t] @ m.router_infer[t] + m.router_infer_bias[t])
            closed += int((g == 0).sum())
            for e in range(E):
                if g[e] > 0:
                    ref[b, t] += g[e] * rankmixer_expert(m, t * E + e, x[b, t])
    assert closed > 0
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_tokenmixer_large_moe_all_active_equals_dense_sum(shared):
    torch.manual_seed(0)
    T, D, E = 3, 8, 4
    m = SparsePerTokenMoE(
        T,
        D,
        E,
        6,
        kind="tokenmixer_large",
        top_k=E,
        shared_expert=shared,
        alpha=2.0,
        down_init_scale=1.0,
    )
    x = torch.randn(5, T, D)
    y, aux = m(x)
    ref = torch.zeros_like(x)
    for b in range(5):
        for t in range(T):
            p = torch.softmax(x[b, t] @ m.router_infer[t], dim=-1)
            for e in range(E):
                ref[b, t] += 2.0 * p[e] * tml_expert(m, t * E + e, x[b, t])
            if shared:
                s = m.shared
                gate, up = s.w_gate_up[t, :, :6], s.w_gate_up[t, :, 6:]
                ref[b, t] += (F.silu(x[b, t] @ gate) * (x[b, t] @ up)) @ s.w_down[t]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    assert float(aux) == 0.0


def test_tokenmixer_large_moe_topk_same_in_train_and_eval():
    torch.manual_seed(2)
    T, D, E, k = 2, 8, 4, 2
    m = SparsePerTokenMoE(
        T, D, E, 6, kind="tokenmixer_large", top_k=k, alpha=E / k, down_init_scale=1.0
    )
    x = torch.randn(6, T, D)
    y_train, _ = m.train()(x)
    y_eval, _ = m.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    ref = m.shared(x)
    for b in range(6):
        for t in range(T):
            logits = x[b, t] @ m.router_infer[t]
            top = logits.topk(k)
            p = torch.softmax(top.values, -1)
            for w, e in zip(p, top.indices.tolist()):
                ref[b, t] = ref[b, t] + (E / k) * w * tml_expert(m, t * E + e, x[b, t])
    torch.testing.assert_close(y_eval, ref, atol=1e-5, rtol=1e-4)


def test_dtsi_eval_uses_only_the_inference_router():
    torch.manual_seed(0)
    m = SparsePerTokenMoE(2, 8, 4, 8, kind="rankmixer", dtsi=True)
    x = torch.randn(6, 2, 8)
    m.eval()
    y0, _ = m(x)
    m.train()
    t0, _ = m(x)
    with torch.no_grad():
        m.router_train.add_(torch.randn_like(m.router_train))
        m.router_train_bias.add_(1.0)
    m.eval()
    y1, _ = m(x)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    m.train()
    t1, _ = m(x)
    assert not torch.allclose(t0, t1)  # ... while training does use h_train


@pytest.mark.parametrize(
    ("mode", "infer_gets_task_grad"), [("average", True), ("sum", True), ("train_router", False)]
)
def test_dtsi_inference_router_gradients(mode, infer_gets_task_grad):
    torch.manual_seed(0)
    m = SparsePerTokenMoE(
        2, 8, 4, 8, kind="rankmixer", dtsi=True, dtsi_train_mode=mode, l1_weight=0.0
    )
    x = torch.randn(16, 2, 8)
    y, aux = m.train()(x)
    (y.pow(2).sum() + aux).backward()
    g_infer = m.router_infer.grad
    assert m.router_train.grad is not None and m.router_train.grad.abs().sum() > 0
    if infer_gets_task_grad:
        assert g_infer is not None and g_infer.abs().sum() > 0
    else:  # the port behaviour, kept as an option: h_infer learns only from the L1 term
        assert g_infer is None or g_infer.abs().sum() == 0
    # the L1 term reaches h_infer only
    m.zero_grad()
    m.l1_weight = 1.0
    _, aux = m(x)
    aux.backward()
    assert m.router_infer.grad.abs().sum() > 0
    assert m.router_train.grad is None or m.router_train.grad.abs().sum() == 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_tokenmixer_large_gate_renormalize_switch(renormalize):
    """renormalize=True: softmax over the k chosen logits; False: top-k of the full softmax.
    Both scaled by alpha; checked against the formula on the router's own logits."""
    torch.manual_seed(0)
    moe = SparsePerTokenMoE(3, 8, 4, 6, kind="tokenmixer_large", top_k=2, alpha=2.0,
                            renormalize=renormalize)  # fmt: skip
    x = torch.randn(5, 3, 8)
    weights, ids, _ = moe.route(x)
    logits = moe._logits(x, moe.router_infer, moe.router_infer_bias)  # [B*T, E]
    top = logits.topk(2, dim=-1)
    if renormalize:
        want = torch.softmax(top.values, dim=-1)
    else:
        want = torch.softmax(logits, dim=-1).gather(1, top.indices)
    assert torch.allclose(weights, 2.0 * want, atol=1e-6)
    local = ids - (torch.arange(15).remainder(3) * 4).unsqueeze(1)
    assert torch.equal(local, top.indices)
