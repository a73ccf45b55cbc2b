#!/usr/bin/env bash
# Fill .whl/ with the wheels that the GPU machine's image lacks, for benchmarks/gpu_check.sh.
#   bash scripts/build_gpu_wheels.sh          # here, with network access to PyPI; then carry ".whl" to the device
#
# The device image (Python 3.12, torch, triton, tokenizers, safetensors, pyarrow, pandas, pytest, ...) has no
# DeepSpeed, Hydra, datasets or pydantic and cannot reach a registry. Every wheel is pinned to this checkout's
# .venv, so the GPU runs the versions the CPU tests ran. transformers and regex travel although the image has them:
# the image's transformers (5.17) is older than the venv's, and transformers checks regex's version at import.
# huggingface-hub stays the image's (1.33 satisfies transformers and datasets; the venv's 2.x needs more packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${WHEEL_DIR:-.whl}

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# Wheels with compiled code: the device's CPython 3.12 on x86-64 manylinux.
BINARY=(pydantic-core regex)
# Pure Python, published as wheels.
PURE=(hjson pydantic annotated-types typing-inspection typing-extensions hydra-core omegaconf datasets dill
      multiprocess transformers)

rm -rf "$DEST"
mkdir -p "$DEST"

# DeepSpeed publishes only an sdist; with DS_BUILD_OPS=0 the wheel holds Python and op sources, built JIT on use.
# No build isolation: its setup.py imports torch, which the venv has.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
# antlr4 4.9.x (what omegaconf 2.3 needs) is an sdist too.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

specs=()
for name in "${BINARY[@]}" "${PURE[@]}"; do
  specs+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${specs[@]}"

ls -l "$DEST"
du -sh "$DEST"
