#!/usr/bin/env bash
# Create .venv with the project installed (editable) and its test extras. Safe to re-run.
#   bash scripts/setup_venv.sh
# Without an NVIDIA GPU it installs the CPU build torch==2.13.0 first: a bare `torch` requirement would pull a
# multi-GB CUDA build. With a GPU, set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") or leave the default `torch`.
# TRANSFORMERS_SPEC (default transformers==5.23.0, what CI runs) picks another supported transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-torch}
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# pyproject allows transformers 5.23 to 5.25; CI runs the lower bound (see README, Tests).
.venv/bin/python -m pip install -q -e ".[test]" "${TRANSFORMERS_SPEC:-transformers==5.23.0}"
# On CPU, DeepSpeed JIT-builds its shared-memory comm op (~2 minutes on 2 cores) when a run first starts; build it
# here, the way training loads it (moe_recipe.engine.check_op_build_lock: under the recipe's lock, which tells a build
# a killed process left from a live one). It lands in $TORCH_EXTENSIONS_DIR (default: .venv/torch_extensions, one
# build per environment): a run with another TORCH_EXTENSIONS_DIR builds it again, saying so. GPU runs do not use it.
.venv/bin/python -c "from moe_recipe.engine import check_op_build_lock; check_op_build_lock()"
.venv/bin/python -c "import torch, deepspeed, transformers; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
