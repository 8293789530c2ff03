"""``mixrank bench kernels``: each Triton kernel against its roofline floor and eager PyTorch.

On CUDA, per op at production-like shapes: time (``triton.testing.do_bench``, median ms), bytes
moved and FLOPs (counted from the op's definition: every input read once, every output written
once), the roofline floor ``max(bytes / copy bandwidth, FLOPs / bf16 matmul peak)`` with both
measured in the same run (a big device copy, a big bf16 matmul), time over floor, and the
speed-up over the eager reference (``kernels.reference``). JSON lines, then a table.

On CPU it says it needs a GPU and exits 0. ``--interpret-smoke`` instead runs every op once,
forward and backward, at tiny shapes under Triton's interpreter on CPU (exercises the code path;
used by the tests; no timings).
"""

from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="run each op once at tiny shapes under TRITON_INTERPRET=1 on CPU (no timing)",
    )
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument(
        "--ops", default="all", help="comma-separated subset of op names (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="one shape per op")


# ---------------------------------------------------------------------------- shapes


def _cases(quick: bool):
    """(name, B, T, D, H, E, k) production-like shapes (RankMixer 100M / 1B, TokenMixer-Large)."""
    cases = [
        ("rankmixer-100M", 4096, 16, 768, 16, 4, 2),
        ("rankmixer-1B", 2048, 32, 1536, 32, 8, 2),
        ("tokenmixer-moe", 8192, 16, 256, 8, 16, 4),
        ("tokenmixer-moe-1:2", 4096, 32, 512, 16, 4, 2),
    ]
    return cases[:1] if quick else cases


# ---------------------------------------------------------------------------- GPU run


def _measure_peaks(torch, do_bench):
    n = 1 << 28  # 512 MiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b)
    peak = 2 * m**3 / (ms * 1e-3)
    return bw, peak


def _ops(torch, kernels, ref, case, dtype):
    """Yield (op, fn_triton, fn_ref, bytes, flops) for one shape."""
    _, B, T, D, H, E, k = case
    dev = os.environ.get("MIXRANK_BENCH_DEVICE", "cuda")  # cpu: a logic check under the interpreter
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(B, T, D, device=dev, dtype=dtype)
    w = torch.ones(D, device=dev, dtype=dtype)
    b = torch.zeros(D, device=dev, dtype=dtype)
    n_el = B * T * D
    yield (
        "token_mix",
        lambda: kernels.token_mix(x, H),
        lambda: ref.token_mix(x, H),
        2 * n_el * es,
        0,
    )
    yield (
        "mix_norm(layer,res)",
        lambda: kernels.mix_norm(x, T, w, b, residual=x, norm="layer"),
        lambda: ref.mix_norm(x, T, w, b, residual=x, norm="layer"),
        4 * n_el * es,
        8 * n_el,
    )
    N = B * T
    logits = torch.randn(N, E, device=dev, dtype=dtype)
    yield (
        "topk_gate",
        lambda: kernels.topk_gate(logits, k),
        lambda: ref.topk_gate(logits, k),
        N * E * es + N * k * (es + 8),
        0,
    )
    yield (
        "relu_gate",
        lambda: kernels.relu_gate(logits),
        lambda: ref.relu_gate(logits),
        N * E * (2 * es + 8) + N * es,
        0,
    )
    # per-token MoE: G = T * E groups, global ids t*E + e
    G = T * E
    Hd = max(16, 4 * D // E)
    weights, ids = ref.topk_gate(logits.float(), k)
    tok = torch.arange(N, device=dev) % T
    gids = tok[:, None] * E + ids
    yield (
        "moe_permute",
        lambda: kernels.moe_permute(gids, G),
        lambda: ref.moe_permute(gids, G),
        N * k * 8 * 3,
        0,
    )
    yield (  # top-k routing: M = N*k is known, no host sync
        "moe_permute(all_routed)",
        lambda: kernels.moe_permute(gids, G, True),
        lambda: ref.moe_permute(gids, G, True),
        N * k * 8 * 3,
        0,
    )
    routing = ref.moe_permute(gids, G)
    M = routing.M
    x2 = x.reshape(N, D)
    x_perm = x2[routing.row_index].contiguous()
    wu = torch.randn(G, D, Hd, device=dev, dtype=dtype) / D**0.5
    wg = torch.randn(G, D, Hd, device=dev, dtype=dtype) / D**0.5
    wd = torch.randn(G, Hd, D, device=dev, dtype=dtype) / Hd**0.5
    ffn_bytes = (2 * M * D + 3 * G * D * Hd) * es
    ffn_flops = 2 * M * D * Hd * 3
    yield (
        "grouped_ffn(swiglu)",
        lambda: kernels.grouped_ffn(x_perm, routing.offsets, wu, wd, w_gate=wg),
        lambda: ref.grouped_ffn(x_perm, routing.offsets, wu, wd, w_gate=wg),
        ffn_bytes,
        ffn_flops,
    )
    y_perm = torch.randn(M, D, device=dev, dtype=dtype)
    wts = weights.to(dtype)
    # FP8 serving GEMM (e4m3 rows and columns) against the same grouped GEMM in bf16: here the
    # "eager" column is that bf16 Triton GEMM, so speed-up = fp8 over bf16 and the error is
    # fp8's against bf16; the floor still uses the bf16 peak (FP8's is about twice it)
    if dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from kernels.triton_ops.grouped_ffn import grouped_linear

        wu8, su = ref.fp8_quantize_weight(wu.float())
        yield (
            "grouped_linear_fp8(vs bf16)",
            lambda: kernels.grouped_linear_fp8(x_perm, routing.offsets, wu8, su),
            lambda: grouped_linear(x_perm, routing.offsets, wu),
            M * D + G * D * Hd + M * Hd * es,
            2 * M * D * Hd,
        )
    yield (
        "moe_unpermute",
        lambda: kernels.moe_unpermute(y_perm, routing, wts),
        lambda: ref.moe_unpermute(y_perm, routing, wts),
        (M * D + N * D) * es + N * k * (8 + es),
        2 * M * D,
    )
    yield (
        "moe_ffn(swiglu)",
        lambda: kernels.moe_ffn(x2, wts, gids, wu, wd, w_gate=wg, all_routed=True),
        lambda: ref.moe_ffn(x2, wts, gids, wu, wd, w_gate=wg),
        ffn_bytes + 2 * N * D * es,
        ffn_flops,
    )
    # forward + backward (training): gradients of <out, cotangent> w.r.t. every input
    xl = x.detach().clone().requires_grad_()
    wl = (1 + 0.1 * torch.randn(D, device=dev, dtype=dtype)).requires_grad_()
    bl = torch.zeros(D, device=dev, dtype=dtype, requires_grad=True)

    def bwd(forward, cot, inputs):
        """(Triton, eager) callables: ``forward(ops)`` and the gradients of ``<out, cot>``."""
        return tuple(_grad_fn(torch, forward, ops, cot, inputs) for ops in (kernels, ref))

    yield (
        "mix_norm+bwd",
        *bwd(
            lambda m: m.mix_norm(xl, T, wl, bl, residual=xl, norm="layer")[1],
            torch.randn(B, T, D, device=dev, dtype=dtype),
            [xl, wl, bl],
        ),
        8 * n_el * es,
        24 * n_el,
    )
    xp = x_perm.detach().clone().requires_grad_()
    wul, wgl, wdl = (t.detach().clone().requires_grad_() for t in (wu, wg, wd))
    yield (
        "grouped_ffn+bwd",
        *bwd(
            lambda m: m.grouped_ffn(xp, routing.offsets, wul, wdl, w_gate=wgl),
            torch.randn(M, D, device=dev, dtype=dtype),
            [xp, wul, wgl, wdl],
        ),
        3 * ffn_bytes,
        3 * ffn_flops,
    )
    x2l = x2.detach().clone().requires_grad_()
    wtl = wts.detach().clone().requires_grad_()
    yield (
        "moe_ffn+bwd",
        *bwd(
            lambda m: m.moe_ffn(x2l, wtl, gids, wul, wdl, w_gate=wgl, all_routed=True),
            torch.randn(N, D, device=dev, dtype=dtype),
            [x2l, wtl, wul, wgl, wdl],
        ),
        3 * (ffn_bytes + 2 * N * D * es),
        3 * ffn_flops,
    )
    yield from _target_attention_ops(torch, kernels, ref, case, dtype, dev, bwd)


def _target_attention_ops(torch, kernels, ref, case, dtype, dev, bwd_pair):
    """Target attention rows: histories of L = 256 items, H = 4 heads of d = 32; in training
    every row has its own sequence, in serving 256 candidates share a request's sequence."""
    _, B, *_ = case
    L, H, d = 256, 4, 32
    es = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = torch.randint(L // 4, L + 1, (B,), generator=g).to(dev)
    q = torch.randn(B, H, d, device=dev, dtype=dtype)
    k = torch.randn(B, L, H, d, device=dev, dtype=dtype)
    v = torch.randn(B, L, H, d, device=dev, dtype=dtype)
    items = int(lengths.sum())
    kv_bytes = 2 * items * H * d * es
    flops = 4 * items * H * d
    yield (
        "target_attention(L=256)",
        lambda: kernels.target_attention(q, k, v, lengths),
        lambda: ref.target_attention(q, k, v, lengths),
        kv_bytes + 2 * B * H * d * es,
        flops,
    )
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    yield (
        "target_attention+bwd",
        *bwd_pair(
            lambda m: m.target_attention(ql, kl, vl, lengths),
            torch.randn(B, H, d, device=dev, dtype=dtype),
            [ql, kl, vl],
        ),
        3 * kv_bytes,
        3 * flops,
    )
    requests = max(1, B // 256)
    seq_of = torch.arange(B, device=dev) // 256 % requests
    ks, vs, ls = k[:requests], v[:requests], lengths[:requests]
    s_items = int(ls[seq_of].sum())
    yield (
        "target_attention(serving)",
        lambda: kernels.target_attention(q, ks, vs, ls, seq_of),
        lambda: ref.target_attention(q, ks, vs, ls, seq_of),
        2 * int(ls.sum()) * H * d * es + 2 * B * H * d * es,
        4 * s_items * H * d,
    )


def _grad_fn(torch, forward, module, cot, inputs):
    """A callable running ``forward(module)`` and the gradients of ``<out, cot>``; returns
    ``(out, *grads)`` so both backends' results can be compared."""

    def fn():
        with torch.enable_grad():
            out = forward(module)
            grads = torch.autograd.grad(out, inputs, cot)
        return (out.detach(), *grads)

    return fn


def _err(torch, a, b) -> float:
    """Largest relative error ``||a - b|| / ||b||`` over the tensors of two results (integer
    tensors: 0 when equal, else the fraction of elements that differ)."""
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            if a.shape != b.shape:
                return 1.0
            return float((a != b).float().mean()) if a.numel() else 0.0
        a64, b64 = a.double(), b.double()
        if not torch.isfinite(a64).all():
            return float("inf")
        return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
    if isinstance(a, (tuple, list)):
        return max((_err(torch, x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else 1.0


def _run_gpu(args) -> int:
    import torch
    from triton.testing import do_bench

    import kernels
    from kernels import reference as ref

    from .common import emit, machine_info, table

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    want = None if args.ops == "all" else set(args.ops.split(","))
    bw, peak = _measure_peaks(torch, do_bench)
    info = machine_info()
    emit({"bench": "kernels", **info, "copy_GBps": bw / 1e9, "bf16_matmul_TFLOPs": peak / 1e12})
    records = []
    with torch.no_grad():
        for case in _cases(args.quick):
            for op, fn, fn_ref, nbytes, flops in _ops(torch, kernels, ref, case, dtype):
                if want and op.split("(")[0].split("+")[0] not in want:
                    continue
                err = _err(torch, fn(), fn_ref())
                ms = do_bench(fn)
                ms_ref = do_bench(fn_ref)
                floor_ms = max(nbytes / bw, flops / peak) * 1e3
                rec = {
                    "op": op,
                    "shape": case[0],
                    "dtype": args.dtype,
                    "ms": ms,
                    "eager_ms": ms_ref,
                    "speedup": ms_ref / ms,
                    "MB": nbytes / 1e6,
                    "GFLOP": flops / 1e9,
                    "floor_ms": floor_ms,
                    "x_floor": ms / floor_ms,
                    "bound": "compute" if flops / peak > nbytes / bw else "memory",
                    "err_vs_eager": err,
                }
                emit(rec)
                records.append(rec)
    if not args.json_only:
        table(records)
    return 0


# ---------------------------------------------------------------------------- interpreter smoke


def _smoke() -> int:
    """Every op once, forward + backward, tiny shapes, Triton interpreter on CPU."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MIXRANK_KERNELS"] = "triton"
    if "triton" in sys.modules and type(sys.modules["triton.language"].max).__name__ != (
        "InterpretedFunction"
    ):
        print("--interpret-smoke: triton was imported before TRITON_INTERPRET=1", file=sys.stderr)
        return 1
    import torch

    import kernels
    from kernels import reference as ref

    torch.manual_seed(0)
    B, T, D, H, E, k, Hd = 2, 4, 16, 4, 4, 2, 16
    x = torch.randn(B, T, D, requires_grad=True)
    w = torch.ones(T * D // H, requires_grad=True)
    checks = {}
    y = kernels.token_mix(x, H)
    checks["token_mix"] = torch.equal(y, ref.token_mix(x, H))
    checks["token_revert"] = torch.equal(kernels.token_revert(y, T), x)
    z, n = kernels.mix_norm(x, H, w, residual=y.detach(), norm="rms")
    (n.sum() + z.sum()).backward()
    checks["mix_norm"] = torch.allclose(n, ref.mix_norm(x, H, w, residual=y.detach())[1], atol=1e-5)
    xf = torch.randn(B * T, D, requires_grad=True)
    logits = torch.randn(B * T, E, requires_grad=True)
    wts, ids = kernels.topk_gate(logits, k)
    _, rids, l1 = kernels.relu_gate(logits)
    checks["topk_gate"] = torch.equal(ids, ref.topk_gate(logits, k)[1])
    checks["relu_gate"] = torch.equal(rids, ref.relu_gate(logits)[1])
    gids = (torch.arange(B * T) % T)[:, None] * E + ids
    routing = kernels.moe_permute(gids, T * E)
    checks["moe_permute"] = torch.equal(routing.slot_of, ref.moe_permute(gids, T * E).slot_of)
    wu = torch.randn(T * E, D, Hd, requires_grad=True)
    wg = torch.randn(T * E, D, Hd, requires_grad=True)
    wd = torch.randn(T * E, Hd, D, requires_grad=True)
    out = kernels.moe_ffn(xf, wts, gids, wu, wd, w_gate=wg)
    (out.sum() + l1.sum()).backward()
    out_ref = ref.moe_ffn(xf, wts, gids, wu, wd, w_gate=wg)
    checks["moe_ffn"] = torch.allclose(out, out_ref, rtol=1e-4, atol=1e-4)
    q = torch.randn(B * T, 2, 8, requires_grad=True)
    kv = torch.randn(3, 5, 2, 8, requires_grad=True)
    lens, seq = torch.tensor([5, 0, 2]), torch.arange(B * T) % 3
    att = kernels.target_attention(q, kv, kv, lens, seq)
    att.sum().backward()
    checks["target_attention"] = torch.allclose(
        att, ref.target_attention(q, kv, kv, lens, seq), atol=1e-5
    )
    checks["grads"] = all(
        t.grad is not None and torch.isfinite(t.grad).all()
        for t in (x, w, xf, logits, wu, wg, wd, q, kv)
    )
    for name, ok in checks.items():
        print(f"{name:14s} {'ok' if ok else 'MISMATCH'}")
    return 0 if all(checks.values()) else 1


def run(args) -> int:
    if getattr(args, "interpret_smoke", False):
        return _smoke()
    import torch

    if not torch.cuda.is_available():
        print("bench kernels: needs a CUDA GPU (Triton kernels); none found, nothing measured.")
        return 0
    return _run_gpu(args)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__)
    p.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
