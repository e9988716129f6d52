#!/usr/bin/env bash
# One node, NPROC processes (one per GPU; on a machine without a GPU, CPU processes on gloo).
#
#   launch/local.sh NPROC CONFIG [key=value ...]
#   launch/local.sh 8 configs/base.yaml engine.zero_stage=3        # 8 GPUs
#   launch/local.sh 2 configs/tiny.yaml run_dir=runs/t             # 2 CPU processes
#
# NPROC: a count, or torchrun's `gpu` / `auto`. torchrun --standalone runs its own rendezvous on a
# free local port, so several local jobs can share a machine. Environment: see launch/env.sh
# (PYTHON, FW_ENTRY, OMP_NUM_THREADS, NCCL_*, FW_DRY_RUN=1 to print the command).
# Extra torchrun flags: TORCHRUN_ARGS="--max_restarts=1 --log_dir=logs/x".
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

[ $# -ge 2 ] || fw_die "usage: launch/local.sh NPROC CONFIG [key=value ...]"
NPROC=$1 CONFIG=$2
shift 2
fw_is_uint "$NPROC" || [[ "$NPROC" =~ ^(gpu|auto|cpu)$ ]] || fw_die "NPROC must be a count, gpu or auto, got '$NPROC'"
[ -f "$CONFIG" ] || fw_die "config file not found: $CONFIG"

fw_set_omp_threads "$NPROC"
fw_entry_args
# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
fw_exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    "${EXTRA[@]}" "${FW_ENTRY_ARGS[@]}" --config "$CONFIG" "$@"
