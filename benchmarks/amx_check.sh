#!/usr/bin/env bash
# For a session whose host has AMX (Sapphire Rapids or later; `grep -o 'amx_[a-z0-9]*'
# /proc/cpuinfo | sort -u`), after `make setup`: the AMX kernels' tests on the real
# instructions (bf16's fused blocks, int8's AMX-INT8 GEMM against its emulation and the other
# routes), then int8 against bf16 with both on AMX, and int8 on AMX tiles against int8 on the
# VNNI tiles (MIXRANK_INT8_AMX=0), all paired in one process per run. Logs go to $OUT
# (default amx_out); about 15 minutes on 2 cores. Numbers go to docs/BENCHMARKS.md, "AMX-INT8
# tiles, and which int8 block runs".
set -u
OUT=${OUT:-amx_out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
{
  date -u
  grep -m1 "model name" /proc/cpuinfo
  grep -o -w 'amx_[a-z0-9]*\|avx512_vnni\|avx512_bf16' /proc/cpuinfo | sort | uniq -c
  $PY -c "import kernels.cpu as kc; from kernels.cpu import vnni
print('bf16 AMX ops:', kc.ops() is not None, kc.reason())
print('int8 ops:', vnni.ops() is not None, vnni.reason(), '| GEMM backend:', vnni.backend() if vnni.ops() else None, vnni.amx_reason())"
} 2>&1 | tee "$OUT/env.txt"

# the int8 GEMMs must be on AMX tiles, or the run measures the VNNI tiles twice
$PY -c "from kernels.cpu import vnni; assert vnni.backend() == 'amx', vnni.amx_reason()" \
  || echo "WARNING: int8 GEMMs are not on AMX tiles (see env.txt)"

echo "== tests on the real AMX instructions =="
$PY -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py tests/test_int8_vnni.py \
  tests/test_int8.py 2>&1 | tee "$OUT/tests.log" | tail -5

CONFIGS="rankmixer_medium tokenmixer_large_medium rankmixer_100m tokenmixer_large_500m dlrm_medium"
ARGS="--batch 1024 --iters 5 --warmup 1 --regime-seconds 0 --int8-ab-reps 20"
echo "== int8 (AMX tiles) against bf16 (AMX fused blocks) and fp32 =="
$PY -m ranking.cli bench model --configs $CONFIGS $ARGS --dtypes fp32 bf16 int8 \
  --compile-epilogues 2>&1 | tee "$OUT/model_amx.log" | tail -25
echo "== int8 on the VNNI tiles (MIXRANK_INT8_AMX=0) against bf16 =="
MIXRANK_INT8_AMX=0 $PY -m ranking.cli bench model --configs $CONFIGS $ARGS --dtypes bf16 int8 \
  --compile-epilogues 2>&1 | tee "$OUT/model_vnni.log" | tail -25
