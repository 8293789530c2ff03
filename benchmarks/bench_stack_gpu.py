"""``mixrank bench stack``: the mixer stacks on a CUDA GPU, Triton kernels against eager PyTorch.

For each config (the papers' shapes by default) at ``--batch`` rows of random tokens
``[B, T, D]`` in bf16 (weights converted with ``.to(bfloat16)``), it measures with
``triton.testing.do_bench`` (median ms):

- ``fwd``: eval-mode forward (no grad);
- ``train``: train-mode forward + backward of ``<out, cotangent>``;

once with ``MIXRANK_KERNELS=triton`` and once with ``MIXRANK_KERNELS=torch`` (the reference ops,
eager), samples/s, achieved FLOP/s from the analytic stack FLOPs (``ranking.model.flops.
stack_flops``; training = 3x forward), the fraction of the bf16 matmul peak measured in the same
run (8192^3), and the relative error ``||triton - torch|| / ||torch||`` of the outputs and of
the input gradient. The stack alone: the tokenizer (TorchRec EBC, not installed on the GPU
machine) and the task heads are left out.

Then, for the RankMixer / TokenMixer-Large configs, the serving lowerings of the stack
(``inference_rows``): ``ranking.inference.lower_stack`` in bf16 (the blocks' Triton forward)
and in fp8 (token-major blocks whose per-token GEMMs, or the MoE experts' grouped GEMMs, are
``kernels.grouped_linear_fp8``: e4m3 operands, per-row and per-column scales, bf16 around them), each also replayed from a CUDA graph (``+graphs``,
``ranking.lowered.CudaGraphs``), timed side by side on the same tokens, with fp8's speed-up over
bf16, the graphs' speed-up over eager launches, and each one's relative error against the fp32
forward of the same weights.

CPU: says it needs a GPU and exits 0. Run: ``python -m benchmarks.bench_stack_gpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from benchmarks.common import emit, machine_info, table

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
DEFAULT_CONFIGS = [
    "rankmixer_medium",
    "rankmixer_100m",
    "rankmixer_1b",
    "rankmixer_100m+moe",
    "tokenmixer_large_500m",
    "tokenmixer_large_500m+moe",
    "unimixer_67m",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="preset names or YAML paths; NAME+moe enables the arch's sparse MoE (E=4, top-2)",
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument(
        "--no-inference", action="store_true", help="skip the bf16 / fp8 serving lowerings"
    )
    parser.add_argument(
        "--inference-only", action="store_true", help="only the bf16 / fp8 serving lowerings"
    )


def _config(name: str):
    from ranking.features import load_schema
    from ranking.model.config import ModelConfig
    from ranking.model.flops import token_layout

    base, _, variant = name.partition("+")
    path = Path(base) if base.endswith(".yaml") else MODELS_DIR / f"{base}.yaml"
    cfg, schema_ref = ModelConfig.from_yaml(path)
    schema = load_schema(schema_ref, relative_to=path)
    if variant == "moe":
        cfg.moe = dataclasses.replace(cfg.moe, enabled=True, num_experts=4, top_k=2)
    elif variant:
        raise ValueError(f"{name}: unknown variant {variant!r} (expected +moe)")
    cfg.num_tokens = token_layout(cfg, schema).num_tokens
    cfg.resolve(cfg.num_tokens)
    return cfg, schema


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_config(name: str, args, peak: float) -> list[dict]:
    import torch
    from triton.testing import do_bench

    from ranking.model.blocks import build_stack
    from ranking.model.flops import stack_flops

    cfg, schema = _config(name)
    T, D, B = cfg.num_tokens, cfg.dim, args.batch
    torch.manual_seed(0)
    stack = build_stack(cfg, T).to("cuda", torch.bfloat16)
    params = sum(p.numel() for p in stack.parameters())
    flops = stack_flops(cfg, schema) * B
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    cot = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    records, outs = [], {}
    for backend in ("triton", "torch"):
        os.environ["MIXRANK_KERNELS"] = backend
        stack.eval()
        with torch.no_grad():
            ms_fwd = do_bench(lambda: stack(x))
            y = stack(x).x.float()
        stack.train()
        xg = x.detach().clone().requires_grad_()

        def step(xg=xg):
            out = stack(xg)
            loss = (out.x.float() * cot.float()).sum() + out.aux
            grads = torch.autograd.grad(loss, [xg, *stack.parameters()], allow_unused=True)
            return grads[0]

        ms_train = None if args.no_train else do_bench(step)
        gx = None if args.no_train else step().float()
        outs[backend] = (y, gx)
        for mode, ms, mult in (("fwd", ms_fwd, 1), ("train", ms_train, 3)):
            if ms is None:
                continue
            rec = {
                "config": name,
                "T": T,
                "D": D,
                "params_M": params / 1e6,
                "batch": B,
                "kernels": backend,
                "mode": mode,
                "ms": ms,
                "samples_per_s": B / (ms * 1e-3),
                "TFLOPs": mult * flops / (ms * 1e-3) / 1e12,
                "frac_of_peak": mult * flops / (ms * 1e-3) / peak,
            }
            records.append(rec)
    err_y = _rel(outs["triton"][0], outs["torch"][0])
    err_g = None if args.no_train else _rel(outs["triton"][1], outs["torch"][1])
    by = {(r["kernels"], r["mode"]): r for r in records}
    for r in records:
        r["err_out"] = err_y
        r["err_dx"] = err_g
        if r["kernels"] == "triton":
            r["speedup_vs_torch"] = by[("torch", r["mode"])]["ms"] / r["ms"]
    for r in records:
        emit(r)
    return records


def inference_rows(name: str, stack, x, timer, flops: float, peak: float) -> list[dict]:
    """bf16 and fp8 serving lowerings of ``stack`` (fp32 weights, eval) on tokens ``x [B, T, D]``
    (fp32, on the stack's device): ``timer(fn) -> ms``. Records with ms, TFLOP/s, the fraction
    of ``peak``, ``fp8_vs_bf16`` and each one's relative error against the fp32 stack.
    RankMixer / TokenMixer-Large stacks, dense or MoE (fp8: the experts' GEMMs)."""
    import torch

    from ranking.inference import lower_stack
    from ranking.lowered import CudaGraphs

    dev = x.device
    bf16 = torch.bfloat16 if dev.type == "cuda" else torch.float32  # the CPU: a logic check
    with torch.no_grad():
        ref = stack.eval()(x).x.double()
        lowered = {
            "bf16": lower_stack(stack, bf16, dev),
            "fp8": lower_stack(stack, bf16, dev, fp8=True),
        }
        fns = {dt: (lambda t, low=low: low(t).x) for dt, low in lowered.items()}
        for dt in list(lowered):  # the same, replayed from a CUDA graph (padded, off the GPU)
            fns[f"{dt}+graphs"] = CudaGraphs(
                fns[dt], max_rows=x.shape[0], capture=dev.type == "cuda", what=f"{name} {dt}"
            )
        xb = x.to(bf16)
        records = []
        for dt, fn in fns.items():
            ms = timer(lambda fn=fn: fn(xb))
            y = fn(xb).double()
            low = lowered[dt.split("+")[0]]
            records.append(
                {
                    "config": name,
                    "batch": x.shape[0],
                    "lowering": dt,
                    "blocks": sorted({type(b).__name__ for b in getattr(low, "blocks", [])}),
                    "ms": ms,
                    "samples_per_s": x.shape[0] / (ms * 1e-3),
                    "TFLOPs": flops / (ms * 1e-3) / 1e12,
                    "frac_of_peak": flops / (ms * 1e-3) / peak,
                    "err_vs_fp32": float((y - ref).norm() / ref.norm().clamp_min(1e-30)),
                    "graph_failed": getattr(fn, "failed", None),
                }
            )
    by = {r["lowering"]: r for r in records}
    for dt in ("fp8", "fp8+graphs"):
        by[dt]["fp8_vs_bf16"] = by["bf16"]["ms"] / by[dt]["ms"]
    for dt in ("bf16+graphs", "fp8+graphs"):
        by[dt]["graphs_speedup"] = by[dt.split("+")[0]]["ms"] / by[dt]["ms"]
    return records


def bench_inference(name: str, args, peak: float) -> list[dict]:
    import torch
    from triton.testing import do_bench

    from ranking.model.blocks import build_stack
    from ranking.model.flops import stack_flops

    cfg, schema = _config(name)
    torch.manual_seed(0)
    stack = build_stack(cfg, cfg.num_tokens).to("cuda")
    x = torch.randn(args.batch, cfg.num_tokens, cfg.dim, device="cuda")
    os.environ["MIXRANK_KERNELS"] = "triton"
    records = inference_rows(name, stack, x, do_bench, stack_flops(cfg, schema) * args.batch, peak)
    for r in records:
        emit({"bench": "stack_inference", **r})
    return records


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench stack: needs a CUDA GPU; none found, nothing measured.")
        return 0
    from triton.testing import do_bench

    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    peak = 2 * m**3 / (do_bench(lambda: a @ b) * 1e-3)
    emit({"bench": "stack", **machine_info(), "bf16_matmul_TFLOPs": peak / 1e12})
    records = []
    for name in args.configs if not args.inference_only else []:
        try:
            records += bench_config(name, args, peak)
            torch.cuda.empty_cache()
        except Exception as e:  # one broken config must not hide the others' numbers
            emit({"config": name, "error": f"{type(e).__name__}: {e}"})
    cols = [
        "config",
        "kernels",
        "mode",
        "ms",
        "samples_per_s",
        "TFLOPs",
        "frac_of_peak",
        "speedup_vs_torch",
        "err_out",
        "err_dx",
    ]
    if not getattr(args, "json_only", False):
        table(records, cols)
    inference = []
    for name in args.configs if not args.no_inference else []:
        if name.startswith("unimixer"):
            continue  # fp8 lowers RankMixer / TokenMixer-Large blocks and MoE experts
        try:
            inference += bench_inference(name, args, peak)
            torch.cuda.empty_cache()
        except Exception as e:
            emit({"config": name, "lowering": "fp8", "error": f"{type(e).__name__}: {e}"})
    if inference and not getattr(args, "json_only", False):
        table(
            inference,
            [
                "config",
                "lowering",
                "ms",
                "TFLOPs",
                "frac_of_peak",
                "fp8_vs_bf16",
                "graphs_speedup",
                "err_vs_fp32",
                "graph_failed",
            ],
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stack_gpu", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
