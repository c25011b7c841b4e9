#!/usr/bin/env bash
# One-shot check of the Triton mLSTM kernels on a CUDA machine, from the repo root:
#   bash scripts/gpu_kernel_check.sh            (results under $OUT, default ./out)
# 1. installs wheels/*.whl if that folder exists (mlstm_kernels, einops, ... for the comparison; no internet);
# 2. runs the GPU tests at the 7B head shapes: pytest -m gpu tests/ops/triton -q (all of them: one tolerance miss does not hide the rest);
# 3. runs bench/kernels.py (ours vs mlstm_kernels 2.0.6) into $OUT/kernels.json (+ .png) and prints tables.
# Budget: tests <= 4.5 min, bench gets the rest of ~8 min (each step is time-limited; the bench keeps partial results).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

echo "== environment"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
PY

if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  # Into a private folder on PYTHONPATH: no internet, and no pip refusal on an externally managed Python.
  WSITE="${TMPDIR:-/tmp}/fast_xlstm_wheels"
  echo "== installing wheels/*.whl (no deps, no index) into $WSITE"
  if python3 -m pip install --no-deps --no-index -q --upgrade --target "$WSITE" wheels/*.whl 2>&1 | tail -3; then
    export PYTHONPATH="$PYTHONPATH:$WSITE"
  else
    echo "wheel install failed (continuing without them)"
  fi
fi

echo "== GPU tests (7B head shapes)"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 270 python3 -m pytest -m gpu tests/ops/triton -q -p no:cacheprovider --durations=8 \
      --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
  TEST_RC=${PIPESTATUS[0]}
else
  echo "pytest is not installed here: add pytest, pluggy, iniconfig (and packaging) wheels to wheels/" | tee "$OUT/gpu_tests.log"
  TEST_RC=127
fi

echo "== benchmark"
LEFT=$(( 470 - ($(date +%s) - T0) ))
[ "$LEFT" -lt 60 ] && LEFT=60
timeout $(( LEFT + 20 )) python3 bench/kernels.py --out "$OUT/kernels.json" --budget-s "$LEFT" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo
echo "================ summary ================"
echo "gpu tests: exit $TEST_RC: $(grep -Eo '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$OUT/gpu_tests.log" | tr '\n' ' ')"
grep -E "^(FAILED|ERROR) " "$OUT/gpu_tests.log" | head -5
echo "bench: exit $BENCH_RC; $OUT/kernels.json"
[ -f "$OUT/kernels.json" ] && python3 bench/kernels.py --summary "$OUT/kernels.json"
echo "total $(( $(date +%s) - T0 )) s"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
