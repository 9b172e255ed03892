#!/usr/bin/env bash
# Multi-node GPU training: one process per node driving all of the node's GPUs, the same
# command on every node, joined through jax.distributed.
#
# By hand (node 0's address must be reachable from every node):
#   COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=0 tools/launch/gpu_multinode.sh --config run.yaml
#   COORDINATOR=10.0.0.1:8476 NUM_NODES=2 NODE_RANK=1 tools/launch/gpu_multinode.sh --config run.yaml
# Under SLURM, one task per node (the rank, count and coordinator come from SLURM):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 tools/launch/gpu_multinode.sh --config run.yaml
# Arguments are passed to `mllm-jax train` (e.g. --set checkpoint.directory=/shared/ckpt).
#
# Environment: COORDINATOR (host:port of node 0), NUM_NODES, NODE_RANK; PORT (SLURM,
# default 8476); MLLM_JAX (the command, default `mllm-jax`); DETERMINISTIC=1 adds
# --xla_gpu_deterministic_ops (bitwise-reproducible reductions, slower); DRY_RUN=1 prints
# what would run. The run's checkpoint directory must be on storage every node shares.
set -euo pipefail

if [[ -z "${NODE_RANK:-}" && -n "${SLURM_PROCID:-}" ]]; then
    # jax's own SLURM detection assumes one process per GPU and would show each process
    # a single GPU: with one task per node, give the settings explicitly instead.
    NODE_RANK="$SLURM_PROCID"
    NUM_NODES="${NUM_NODES:-$SLURM_NTASKS}"
    if [[ -z "${COORDINATOR:-}" ]]; then
        first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        COORDINATOR="$first:${PORT:-8476}"
    fi
fi

missing=()
for name in COORDINATOR NUM_NODES NODE_RANK; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
    echo "error: set ${missing[*]} (or run under SLURM); see the header of $0" >&2
    exit 2
fi

export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
export JAX_NUM_PROCESSES="$NUM_NODES"
export JAX_PROCESS_ID="$NODE_RANK"
export MLLM_JAX_DISTRIBUTED=on
if [[ "${DETERMINISTIC:-0}" == 1 ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi

read -r -a command <<<"${MLLM_JAX:-mllm-jax}"
command+=(train "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES" \
        "JAX_PROCESS_ID=$JAX_PROCESS_ID MLLM_JAX_DISTRIBUTED=on XLA_FLAGS=${XLA_FLAGS:-}"
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"
