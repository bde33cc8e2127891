#!/usr/bin/env bash
# Whole GPU validation in one command, on a machine with a CUDA GPU (no network needed):
#
#   bash benchmarks/gpu_validate.sh [RESULTS_DIR]
#
# Builds the C++/CUDA extension, runs the GPU tests, the op benchmarks (eager / torch.compile / fused at
# the SPEC §2 shapes), the end-to-end training steps, the 200-step parity check, the full test suite and
# the pytest-benchmark suites, in that order (most important first, longest last). Every step has a time
# limit cut to what is left of BUDGET_S (default 530 s, so the whole run fits in ~9 minutes) and writes
# its log as it goes; the bench steps rewrite their JSON after every case, so a step cut short still
# leaves its partial results. Everything lands in one folder (default
# benchmarks/results/<device>-<date>/): *.log, summary.txt, results.json/.md + speedup.png (merged),
# ops/ e2e/ parity/ (per-step results), pytest-benchmark.json, junit-*.xml.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-530}
START=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-16}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
export PYTHONUNBUFFERED=1

SLUG=$($PY - <<'EOF' 2>/dev/null || echo unknown
import torch
name = torch.cuda.get_device_name(0).lower().replace("nvidia", "") if torch.cuda.is_available() else "cpu"
slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
while "--" in slug:
    slug = slug.replace("--", "-")
print(slug or "cuda")
EOF
)
OUT=${1:-benchmarks/results/${SLUG}-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
echo "gpu_validate $(date -u +%FT%TZ) on $SLUG, budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" | tee "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD...: run CMD with a time limit (cut to the budget left), log to $OUT/NAME.log
step() {
  local name=$1 limit=$2 l rc t0
  shift 2
  l=$(left)
  (( limit > l )) && limit=$l
  if (( limit < 15 )); then
    echo "SKIPPED $name: no time left in the budget" | tee -a "$SUMMARY"
    return 0
  fi
  t0=$(date +%s)
  echo ">>> $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local verdict=ok
  (( rc == 124 || rc == 137 )) && verdict="TIMED OUT (partial results kept)"
  (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED"
  echo "<<< $name rc=$rc $(( $(date +%s) - t0 ))s $verdict" | tee -a "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return 0
}

step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(0))'; $PY -m pip list 2>/dev/null | grep -i -E 'torch|triton|timm|open.clip|pytest|matplotlib|ninja|pybind'"

# 1. the extension (CUDA sources where nvcc is found), editable install without the network
step build 200 $PY -m pip install --no-build-isolation --no-deps -e .
step extension_check 20 $PY -c "import rspeft_fast._native as n; print('cpu', n.has('cpu'), 'cuda', n.has('cuda'))"

# 2. GPU-only tests (bf16/fp16 accuracy at the SPEC shapes, ...)
step tests_gpu 90 $PY -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml"

# 3. op benchmarks: eager / torch.compile / fused at the SPEC shapes (results.json rewritten per case)
step bench_ops 200 $PY -m rspeft_fast bench --what ops --out "$OUT/ops"

# 4. end-to-end training steps (no adapter / eager / fused)
step bench_e2e 100 $PY -m rspeft_fast bench --what e2e --out "$OUT/e2e"

# 5. parity: 200 fine-tuning steps, fused vs eager (and the bf16 noise from an fp32 run)
step parity 75 $PY -m rspeft_fast bench --parity --out "$OUT/parity"

# one table + one chart for everything measured so far
step merge 30 $PY -m rspeft_fast bench --merge "$OUT/ops" "$OUT/e2e" "$OUT/parity" --out "$OUT"

# 6. the full test suite on the GPU
step tests_full 120 $PY -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/junit-full.xml"

# 7. pytest-benchmark suites (side-by-side tables per case and mode), longest, last
step pytest_benchmarks 600 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-group-by=group \
  --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name --benchmark-json="$OUT/pytest-benchmark.json"

echo "done in $(( $(date +%s) - START ))s; results in $OUT" | tee -a "$SUMMARY"
