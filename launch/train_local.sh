#!/bin/bash
# One machine through the deepspeed launcher: every GPU, or NUM_GPUS of them. Hydra overrides pass through:
#
#   launch/train_local.sh +experiment=tiny_ep2
#   NUM_GPUS=4 launch/train_local.sh parallel.ep_size=4 zero=stage2 logging=online
set -euo pipefail
cd "$(dirname "$0")/.."
port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
exec deepspeed ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "$port" recipes/train.py "$@"
