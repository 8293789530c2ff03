"""Token mixing against its definitions: explicit permutation matrices built in slow loops,
mix-then-revert identity, UniMixing reducing to TokenMixing at a hard permutation, Sinkhorn."""

from __future__ import annotations

import pytest
import torch

from ranking.model.mixing import (
    MixRevert,
    TokenMixing,
    UniMixing,
    UniMixingLite,
    anneal_temperature,
    sinkhorn,
    symmetric_sinkhorn,
)

SHAPES = [
    (T, D, H)
    for T in (1, 2, 3, 4, 5, 8, 16)
    for D in (4, 8, 12, 16, 32, 64)
    for H in (1, 2, 4, 8)
    if D % H == 0
]


@pytest.mark.parametrize(("T", "D", "H"), SHAPES)
def test_mix_then_revert_is_identity(T, D, H):
    x = torch.randn(3, T, D)
    mr = MixRevert(T, H)
    y = mr.mix(x)
    assert y.shape == (3, H, T * D // H)
    assert torch.equal(mr.revert(y), x)
    assert torch.equal(mr(x), x)


def slow_mix(x: torch.Tensor, H: int) -> torch.Tensor:
    """The definition, element by element: out[b, h, t*d + j] = x[b, t, h*d + j]."""
    B, T, D = x.shape
    d = D // H
    out = torch.empty(B, H, T * d)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for j in range(d):
                    out[b, h, t * d + j] = x[b, t, h * d + j]
    return out


@pytest.mark.parametrize(("T", "D", "H"), [(2, 4, 2), (3, 6, 2), (4, 8, 8), (5, 10, 5), (4, 12, 3)])
def test_mix_matches_definition(T, D, H):
    x = torch.randn(2, T, D)
    assert torch.equal(MixRevert(T, H).mix(x), slow_mix(x, H))


def permutation_matrix(T: int, D: int) -> torch.Tensor:
    """TokenMixing (H = T) as an explicit [T*D, T*D] matrix: out_flat = P @ x_flat."""
    d = D // T
    P = torch.zeros(T * D, T * D)
    for t in range(T):
        for c in range(D):
            h, j = divmod(c, d)
            P[h * D + t * d + j, t * D + c] = 1.0
    return P


@pytest.mark.parametrize(("T", "D"), [(2, 4), (4, 8), (4, 16), (8, 16), (3, 9)])
def test_token_mixing_is_a_permutation_matrix(T, D):
    x = torch.randn(5, T, D)
    P = permutation_matrix(T, D)
    assert torch.equal(P.sum(0), torch.ones(T * D)) and torch.equal(P.sum(1), torch.ones(T * D))
    expected = (x.reshape(5, T * D) @ P.T).reshape(5, T, D)
    out = TokenMixing(T)(x)
    assert out.shape == (5, T, D)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # with H = T, TokenMixing is its own inverse
    torch.testing.assert_close(TokenMixing(T)(out), x, rtol=0, atol=0)


def test_sinkhorn_is_doubly_stochastic():
    torch.manual_seed(0)
    for n in (2, 5, 16, 40):
        P = sinkhorn(torch.randn(3, n, n), iters=100)
        assert (P >= 0).all()
        torch.testing.assert_close(P.sum(-1), torch.ones(3, n), atol=1e-4, rtol=0)
        torch.testing.assert_close(P.sum(-2), torch.ones(3, n), atol=1e-5, rtol=0)
    S = symmetric_sinkhorn(torch.randn(6, 6), 0.5, iters=30)
    torch.testing.assert_close(S, S.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [UniMixing, UniMixingLite])
def test_unimixing_matrices_doubly_stochastic_in_train_and_eval(cls):
    torch.manual_seed(0)
    m = cls(4, 8, 4, iters=30)
    x = torch.randn(3, 4, 8)
    for mode in (True, False):
        m.train(mode)
        local, glob = m.matrices()
        for M in (local, glob):
            torch.testing.assert_close(M.sum(-1), torch.ones(M.shape[:-1]), atol=1e-4, rtol=0)
            torch.testing.assert_close(M.sum(-2), torch.ones(M.shape[:-1]), atol=1e-5, rtol=0)
    # eval runs the same Sinkhorn as training (ports that skip it in eval fail this)
    m.train()
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)


def unimixing_reference(x, local, glob, flatten):
    """The paper's equations, block by block: h_i = x_i W_i, out_i = sum_j G_ij h_j."""
    B, T, D = x.shape
    n, Bk, _ = local.shape
    f = (x.transpose(1, 2) if flatten == "channel_major" else x).reshape(B, n, Bk)
    out = torch.zeros_like(f)
    for i in range(n):
        for j in range(n):
            out[:, i] += glob[i, j] * (f[:, j] @ local[j])
    return out.reshape(B, T, D)


@pytest.mark.parametrize("flatten", ["channel_major", "token_major"])
def test_unimixing_matches_equations(flatten):
    torch.manual_seed(1)
    m = UniMixing(4, 8, 4, iters=5, flatten=flatten)
    m.set_temperature(0.7)
    x = torch.randn(2, 4, 8)
    local, glob = m.matrices()
    torch.testing.assert_close(
        m(x), unimixing_reference(x, local, glob, flatten), atol=1e-5, rtol=1e-5
    )


def test_unimixing_hard_permutation_equals_token_mixing_token_major():
    # token-major flatten, block size d: TokenMixing moves whole blocks (t, h) -> (h, t), an
    # involution, so W_G is a symmetric permutation and every local matrix is the identity.
    T, D = 4, 8
    d = D // T
    m = UniMixing(T, D, block_size=d, iters=10, flatten="token_major")
    n = m.num_blocks
    G = torch.zeros(n, n)
    for t in range(T):
        for h in range(T):
            G[h * T + t, t * T + h] = 1.0
    with torch.no_grad():
        m.global_logits.copy_(20 * G)
        m.local_logits.copy_(20 * torch.eye(d).expand(n, d, d))
    m.set_temperature(0.01)
    x = torch.randn(3, T, D)
    torch.testing.assert_close(m(x), TokenMixing(T)(x), atol=1e-5, rtol=0)


def test_unimixing_hard_permutation_equals_token_mixing_channel_major():
    # channel-major flatten (authors' code), block = one token (B = D), D = T^2: block h holds
    # head h of every token in order j*T + t; TokenMixing wants t*d + j, a transpose (involution).
    T, D = 4, 16
    d = D // T
    m = UniMixing(T, D, block_size=D, iters=10, flatten="channel_major")
    Wl = torch.zeros(D, D)
    for j in range(d):
        for t in range(T):
            Wl[j * T + t, t * d + j] = 1.0
    with torch.no_grad():
        m.local_logits.copy_(20 * Wl.expand(T, D, D))
        m.global_logits.copy_(20 * torch.eye(T))
    anneal_temperature(m, 100, 100, 1.0, 0.01)
    assert float(m.tau) == pytest.approx(0.01)
    x = torch.randn(3, T, D)
    torch.testing.assert_close(m(x), TokenMixing(T)(x), atol=1e-5, rtol=0)


def test_temperature_schedule_is_linear():
    m = UniMixing(2, 4, 4)
    assert anneal_temperature(m, 0, 10) == pytest.approx(1.0)
    assert anneal_temperature(m, 5, 10) == pytest.approx(0.525)
    assert anneal_temperature(m, 20, 10) == pytest.approx(0.05)
    assert float(m.tau) == pytest.approx(0.05)
    assert "tau" in m.state_dict()  # the serving temperature travels with the weights


def test_eval_matrices_are_reused_but_follow_parameter_and_tau_changes():
    torch.manual_seed(0)
    m = UniMixing(2, 8, 4, iters=5).eval()
    x = torch.randn(3, 2, 8)
    with torch.no_grad():
        y0 = m(x)
        assert m._cache is not None
        m.set_temperature(0.3)  # new tau: recomputed
        y1 = m(x)
        assert not torch.allclose(y0, y1)
        m.global_logits.add_(1.0)  # in-place parameter update: recomputed
        local, glob = m.matrices()
        torch.testing.assert_close(m(x), m._unflatten(m.mix_flat(m._flatten(x), local, glob)))


def test_ranker_set_progress_anneals_every_sinkhorn_temperature_linearly():
    """The trainer's schedule hook: tau goes tau_start -> tau_end linearly in the fraction."""
    from ranking.features import load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.mixing import UniMixing, UniMixingLite
    from ranking.model.ranker import build_model

    schema = load_schema("frappe")
    for arch in ("unimixer", "unimixer_lite"):
        cfg = ModelConfig.from_dict({"arch": arch, "dim": 16, "num_layers": 2, "unimixer":
                                     {"block_size": 16, "tau_start": 0.8, "tau_end": 0.1}})  # fmt: skip
        model = build_model(cfg, schema)
        mixers = [m for m in model.modules() if isinstance(m, UniMixing | UniMixingLite)]
        assert len(mixers) == 2
        for frac, want in ((0.0, 0.8), (0.5, 0.45), (1.0, 0.1)):
            model.set_progress(frac)
            assert all(abs(float(m.tau) - want) < 1e-6 for m in mixers), (arch, frac)
        # a buffer in the state dict: the artifact serves with the annealed value
        assert sum(k.endswith(".tau") for k in model.state_dict()) == 2
