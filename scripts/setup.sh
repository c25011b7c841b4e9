#!/usr/bin/env bash
# Creates .venv (if missing) and installs fast-xlstm into it.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus test dependencies and the reference packages (xlstm, transformers)
# TORCH_SPEC overrides the torch requirement (default: a CUDA build where nvidia-smi works, else torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    spec=${TORCH_SPEC:-"torch>=2.6"}
  else
    spec=${TORCH_SPEC:-"torch==2.13.0"}
  fi
  echo "[setup] installing $spec"
  "${PIP[@]}" install "$spec" 2> >(grep -v "is ignored" >&2)
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
echo "[setup] installing fast-xlstm$extra"
"${PIP[@]}" install -e ".$extra" 2> >(grep -v "is ignored" >&2)
if [ -n "$extra" ] && ! .venv/bin/python -c "import triton" >/dev/null 2>&1; then
  # CPU machines run the Triton kernels' tests in the interpreter; GPU installs get triton with torch.
  echo "[setup] installing triton 3.6.0 for the interpreter tests"
  "${PIP[@]}" install "triton==3.6.0" 2> >(grep -v "is ignored" >&2)
fi
echo "[setup] done: $(.venv/bin/python -c 'import torch, fast_xlstm; print("fast_xlstm", fast_xlstm.__version__, "torch", torch.__version__)')"
