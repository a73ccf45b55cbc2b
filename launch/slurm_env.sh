# Sourced by the sbatch scripts, which run on the job's first node in the submit directory (the repository root):
# the run directory, the rendezvous address, and the requeue on preemption.

# One run directory per job, shared by all ranks. A requeued job keeps its id, so it finds its own checkpoints
# (trainer.resume=auto). A trainer.run_dir override on the command line wins.
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
for arg in "$@"; do
    if [[ $arg == trainer.run_dir=* ]]; then RUN_DIR=${arg#trainer.run_dir=}; fi
done
mkdir -p "$RUN_DIR"

# Rank 0 runs on the first node, where this script runs: a port free here is free for the rendezvous.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export MASTER_ADDR MASTER_PORT

# After SIGUSR1 (the --signal warning before the time limit, or scancel --signal=USR1) or SIGTERM the recipe
# finishes its step, checkpoints and exits with this code; the job then requeues itself.
export MOE_PREEMPT_EXIT_CODE=${MOE_PREEMPT_EXIT_CODE:-75}

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: run dir ${RUN_DIR}," \
     "master ${MASTER_ADDR}:${MASTER_PORT}"

requeue_if_preempted() {  # $1: srun's exit status
    if [[ $1 == "$MOE_PREEMPT_EXIT_CODE" ]]; then
        echo "job ${SLURM_JOB_ID}: preempted, checkpoint saved in ${RUN_DIR}/checkpoints; requeueing"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$1"
}

# Pre-flight check with moe-plan before the job spends GPU time: exit 1 (does not fit) and 2 (invalid config) stop
# the job; 3 (valid, not modeled: the autoep backend) goes on. Skipped without GPUs (CPU test clusters) and with
# MOE_SKIP_PLAN=1.
preflight_plan() {  # $1: nodes, $2: GPUs per node, then the Hydra overrides
    if [[ ${MOE_SKIP_PLAN:-0} == 1 ]] || ! command -v nvidia-smi >/dev/null; then return 0; fi
    local nodes=$1 gpus=$2
    shift 2
    python -m moe_recipe.plan --nodes "$nodes" --gpus-per-node "$gpus" --gpu auto "$@" || [[ $? == 3 ]] || exit 1
}

# The token store, once per job, before any rank starts: on this (the first) node, moe-prepare-data tokenizes the
# corpus with every core when the store that the overrides name (data.store, or the source's default store) does not
# exist yet; the ranks on every node then only read it. Exit 2 (bad data or config) stops the job.
prepare_data_if_missing() {  # the Hydra overrides
    python -m moe_recipe.prepare_data --if-missing "$@" || exit $?
}
