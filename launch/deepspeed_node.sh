#!/bin/bash
# One srun task per node: the deepspeed launcher for this node's ranks (Slurm already runs us on every node, so
# --no_ssh; SLURM_NODEID says which hostfile line we are). Usage: deepspeed_node.sh HOSTFILE SCRIPT [ARGS...]
#
# Slurm delivers a signal to every process of the step, the launchers included. They must ignore SIGUSR1 (Python
# would die of it) and let only the trainers act on it; the trainers inherit the ignore until they install their
# own handler, so a warning that comes during start-up is dropped instead of killing a rank.
set -euo pipefail
hostfile=$1
shift
trap '' USR1
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
