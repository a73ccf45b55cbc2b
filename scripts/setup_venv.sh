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
# On CPU, DeepSpeed JIT-builds its shared-memory comm op (~1 minute) when a run first starts; build it here, so that
# training never compiles (a run killed during that build would leave torch's lock file behind). GPU runs do not use it.
.venv/bin/python - <<'PY'
from deepspeed.accelerator import get_accelerator

accelerator = get_accelerator()
if accelerator.device_name() == "cpu":
    accelerator.create_op_builder("ShareMemCommBuilder").load(verbose=False)
PY
.venv/bin/python -c "import torch, deepspeed, transformers; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')"
