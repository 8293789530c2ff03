"""#20's in-process A/B: the pre-redesign inference path (commit 0f9d064: ``bf16_dense`` and the
blocks' own token-major ``forward_tm``, switched by flags on the Ranker) against
``optimize_for_inference``, on the same weights, alternating call by call (the order flips every
pair). Prints the median ms per dense-part call of each and the paired new/old ratio.

Needs the old code importable as ``ranking_old``: a copy of 0f9d064's ``ranking/`` package with
its imports renamed, e.g.::

    git worktree add --detach /tmp/before 0f9d064
    mkdir /tmp/oldpkg && cp -r /tmp/before/ranking /tmp/oldpkg/ranking_old
    grep -rl "ranking\\." /tmp/oldpkg/ranking_old --include=*.py | xargs sed -i \
        's/\bfrom ranking\\./from ranking_old./g; s/\bimport ranking\\./import ranking_old./g'
    MIXRANK_SCHEMA_DIR=/tmp/before/configs/schemas OLD=/tmp/oldpkg BEFORE=/tmp/before \
        python -m benchmarks.redesign_ab

A one-off for docs/BENCHMARKS.md ("Session 12: the redesign, before and after"); not part of
``mixrank bench``.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.environ.get("OLD", "/tmp/oldpkg"))
BEFORE = os.environ.get("BEFORE", "/tmp/before")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (preset, dtype, rows, calls): bf16 runs at 1 GFLOP/s on an AVX2 host, hence few rows there
CASES = [
    ("rankmixer_small", "bf16", 1024, 40),
    ("rankmixer_small", "fp32", 1024, 60),
    ("tokenmixer_large_small", "bf16", 1024, 30),
    ("tokenmixer_large_small", "fp32", 1024, 60),
    ("unimixer_small", "bf16", 1024, 40),
    ("unimixer_lite_small", "bf16", 1024, 40),
    ("rankmixer_medium", "fp32", 512, 20),
    ("tokenmixer_large_medium", "fp32", 512, 10),
    ("rankmixer_medium", "bf16", 64, 20),
    ("tokenmixer_large_medium", "bf16", 64, 10),
]


def pair(preset: str, dtype: str, rows: int, calls: int) -> str:
    from ranking_old.model.config import load_experiment as old_load
    from ranking_old.model.ranker import bf16_dense
    from ranking_old.model.ranker import build_model as old_build

    from ranking.inference import optimize_for_inference
    from ranking.model.ranker import build_model
    from ranking.model.synthetic import random_batch
    from ranking.train.config import load_experiment

    old_cfg, old_schema = old_load(f"{BEFORE}/configs/models/{preset}.yaml")
    exp = load_experiment(f"{HERE}/configs/models/{preset}.yaml", require_data=False)
    torch.manual_seed(0)
    new = build_model(exp.model, exp.schema).eval()
    old = old_build(old_cfg, old_schema).eval()
    old.load_state_dict(new.state_dict())
    o = bf16_dense(old) if dtype == "bf16" else old
    n = optimize_for_inference(new, dtype=dtype, **exp.inference.options())
    batch = random_batch(exp.schema, rows)
    with torch.no_grad():
        want, got = o(batch).logits, n(batch).logits
        tol = 1e-2 if dtype == "bf16" else 1e-5
        assert torch.allclose(want, got, atol=tol), float((want - got).abs().max())
        tokens = new.tokenizer(batch.dense, batch.sparse)
        if dtype == "bf16":
            tokens = tokens.to(torch.bfloat16)
        step = o.micro_batch if 0 < o.micro_batch < rows else rows

        def run_old():
            return [o._stack(tokens[i : i + step], None) for i in range(0, rows, step)]

        def run_new():
            return n.chunks(tokens)

        for f in (run_old, run_new, run_old, run_new):
            f()
        t_old, t_new = [], []
        for i in range(calls):
            order = [(run_old, t_old), (run_new, t_new)]
            for f, ts in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
    mo, mn = statistics.median(t_old) * 1e3, statistics.median(t_new) * 1e3
    r = sorted(b / a for a, b in zip(t_old, t_new))
    q = [r[len(r) // 4], r[len(r) // 2], r[3 * len(r) // 4]]
    return (
        f"{preset:24s} {dtype} rows {rows}: old {mo:9.2f} ms  new {mn:9.2f} ms  "
        f"paired new/old p25/p50/p75 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}"
    )


def main() -> int:
    torch.set_num_threads(2)
    for case in CASES:
        print(pair(*case), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
