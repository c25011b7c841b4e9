#!/usr/bin/env bash
# One-shot check of the inference and serving paths on a CUDA machine, from the repo root:
#   FAST_XLSTM_COMMIT=<commit> OUT=out bash scripts/gpu_serving_check.sh
# 1. installs wheels/*.whl if that folder exists (fastapi, uvicorn, openai, ... for machines without them);
# 2. runs the CUDA tests of the engine, the planned prefill, the server front and the server processes
#    (CUDA graphs, pinned read-back of launched decode steps under --async-scheduling);
# 3. runs the serving benchmark twice, synchronous and with --async-scheduling (throughput runs only),
#    into $OUT/serve-sync and $OUT/serve-async, and prints where the time went (step logs).
# Budget: about 8 minutes on an H100 (each step is time-limited; results written so far are kept).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  WSITE="${TMPDIR:-/tmp}/fast_xlstm_wheels"
  pip install -q --no-deps --no-index --target "$WSITE" wheels/*.whl >/dev/null 2>&1 || true
  export PYTHONPATH="$PWD/src:$WSITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== tests (CUDA)"
PYTHONPATH="$PYTHONPATH:$PWD/tests" timeout 240 python -m pytest -q -x -p no:cacheprovider \
  tests/ops/triton/test_planned.py tests/engine tests/test_gpu.py tests/server/test_async_engine.py \
  tests/server/test_state_caching.py 2>&1 | tail -5

for mode in sync async; do
  extra=""
  [ "$mode" = async ] && extra="--async-scheduling"
  echo "== serving benchmark ($mode)"
  timeout 170 python bench/serve_gpu.py --skip-prefix --server-args="$extra" --out "$OUT/serve-$mode" 2>&1 \
    | grep -v -i warn | tail -12
  if [ -f "$OUT/serve-$mode/steps-cache-on.jsonl" ]; then
    python bench/step_log_summary.py "$OUT/serve-$mode/steps-cache-on.jsonl" "$OUT"/serve-$mode/load-c*.json
  fi
done
