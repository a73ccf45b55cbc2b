#!/bin/bash
# One srun task per GPU: DeepSpeed reads RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT, not SLURM_*, so
# translate them, then run the command. Usage: srun launch/srun_rank.sh python -u recipes/train.py [OVERRIDES...]
#
# Outside slurm_srun.sbatch (e.g. under the submitit launcher) the master is the job's first node and the port
# comes from the job id, so every task agrees without talking to the others.
set -euo pipefail
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
trap '' USR1  # dropped until the trainer installs its handler (see deepspeed_node.sh)
exec "$@"
