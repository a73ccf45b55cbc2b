#!/bin/bash
# One machine through the deepspeed launcher: every GPU, or NUM_GPUS of them. Hydra overrides pass through:
#
#   launch/train_local.sh +experiment=tiny_ep2
#   NUM_GPUS=4 launch/train_local.sh parallel.ep_size=4 zero=stage2 logging=online
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${VIRTUAL_ENV:-} && -x .venv/bin/deepspeed ]]; then PATH=$PWD/.venv/bin:$PATH; fi  # scripts/setup_venv.sh's
port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
# Pre-flight memory and layout check (see launch/slurm_env.sh); MOE_SKIP_PLAN=1 skips it.
if [[ ${MOE_SKIP_PLAN:-0} != 1 ]] && command -v nvidia-smi >/dev/null; then
    python -m moe_recipe.plan --nodes 1 --gpus-per-node "${NUM_GPUS:-$(nvidia-smi -L | wc -l)}" --gpu auto "$@" \
        || [[ $? == 3 ]] || exit 1
fi

# Ctrl-C goes to the ranks only: they finish the step, checkpoint and exit 0 (a second Ctrl-C stops them at once).
# Left to DeepSpeed's launcher, Ctrl-C would also make it SIGTERM every rank, SIGKILL them 30 s later (a checkpoint
# still being written is lost) and exit 1 with a traceback. So the launcher runs in a session of its own, out of
# the terminal's reach, and this script hands the signal to the processes of that session that are ranks.
setsid deepspeed ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "$port" recipes/train.py "$@" &
launcher=$!  # not a process group leader, so setsid did not fork: the session's id is this pid
to_ranks() { pkill "-$1" --session "$launcher" --full -- '--local_rank=' || true; }
trap 'to_ranks INT' INT
trap 'to_ranks TERM' TERM HUP
while true; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # gone: that was its exit status; else a trapped signal ended the wait
done
exit "$status"
