#!/usr/bin/env bash
# One call on a lent GPU machine (see docs/BENCHMARKS.md, "GPU"): the Triton kernel tests compiled
# on CUDA (FP8 and the one-pass moe_permute included), then `bench kernels`, `bench stack` and
# its serving lowerings (bf16 / fp8, eager / CUDA graphs); about 580 s with the defaults. Uses the machine's own torch + triton (no
# torchrec there: the tokenizer is left out). Logs go to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

echo "== kernel tests (compiled, CUDA) =="
# one config per kernel (no autotuning): these runs check results, and compile time dominates
MIXRANK_TRITON_AUTOTUNE=0 MIXRANK_TEST_DEVICE=cuda timeout "${TEST_S:-200}" $PY -m pytest -q \
  -p no:cacheprovider --durations=5 ${TEST_ARGS:-} tests/test_kernels_ops.py 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests rc=${PIPESTATUS[0]}"

echo "== bench kernels =="
timeout "${KERNELS_S:-140}" $PY -m benchmarks.bench_kernels --json-only ${KERNELS_ARGS:-} 2>&1 | tee "$OUT/kernels.jsonl" | tail -3
echo "kernels rc=${PIPESTATUS[0]}"

echo "== bench stack =="
timeout "${STACK_S:-150}" $PY -m benchmarks.bench_stack_gpu --no-inference ${STACK_ARGS:-} 2>&1 | tee "$OUT/stack.log" | tail -20
echo "stack rc=${PIPESTATUS[0]}"

echo "== bench stack: serving lowerings (bf16 / fp8, eager / CUDA graphs) =="
timeout "${INFER_S:-90}" $PY -m benchmarks.bench_stack_gpu --inference-only --configs ${INFER_CONFIGS:-rankmixer_100m tokenmixer_large_500m tokenmixer_large_500m+moe rankmixer_1b} 2>&1 | tee "$OUT/inference.log" | tail -20
echo "inference rc=${PIPESTATUS[0]}"

# the kernels table last, compactly (the reply carries the end of the output)
$PY - "$OUT/kernels.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"op"' in l]
for r in rows:
    print(f"{r['shape'][:14]:14s} {r['op'][:20]:20s} {r['ms']:8.3f}ms eager {r['eager_ms']:8.3f} "
          f"x{r['speedup']:5.2f} floor x{r['x_floor']:5.2f} err {r['err_vs_eager']:.1e}")
PYEOF
