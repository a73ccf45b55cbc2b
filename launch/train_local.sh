#!/bin/bash
# One machine through the deepspeed launcher: every GPU, or NUM_GPUS of them. Hydra overrides pass through:
#
#   launch/train_local.sh +experiment=tiny_ep2
#   NUM_GPUS=4 launch/train_local.sh parallel.ep_size=4 zero=stage2 logging=online
set -euo pipefail
cd "$(dirname "$0")/.."
port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
# Pre-flight memory and layout check (see launch/slurm_env.sh); MOE_SKIP_PLAN=1 skips it.
if [[ ${MOE_SKIP_PLAN:-0} != 1 ]] && command -v nvidia-smi >/dev/null; then
    python -m moe_recipe.plan --nodes 1 --gpus-per-node "${NUM_GPUS:-$(nvidia-smi -L | wc -l)}" --gpu auto "$@" \
        || [[ $? == 3 ]] || exit 1
fi
exec deepspeed ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "$port" recipes/train.py "$@"
