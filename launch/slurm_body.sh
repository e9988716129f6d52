#!/usr/bin/env bash
# The body of launch/slurm.sbatch: runs inside an allocation (or under a simulated SLURM
# environment in tests/test_launch.py).
#
#   launch/slurm_body.sh CONFIG [key=value ...]
#
# 1. MASTER_ADDR = the first host of the allocation (`scontrol show hostnames $SLURM_JOB_NODELIST`),
#    MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 (distinct jobs sharing a node do not collide);
#    both exported (your own values win).
# 2. `srun` starts one task per GPU (SLURM_NTASKS in all); each task is `python -m framework.train`
#    and derives RANK / WORLD_SIZE / LOCAL_RANK from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
#    (framework.dist.setup_env). OMP_NUM_THREADS defaults to SLURM_CPUS_PER_TASK.
#    SRUN_ARGS adds srun flags (e.g. "--gpu-bind=none --cpu-bind=cores").
# 3. Preemption: SIGUSR1 (sbatch --signal=B:USR1@120) or SIGTERM reaching this script is forwarded
#    to srun, which passes it to the tasks; the trainer checkpoints and exits 0. After SIGUSR1 and a
#    clean exit the script runs `scontrol requeue $SLURM_JOB_ID` (FW_REQUEUE=0 disables) and the
#    requeued job resumes from the checkpoint (checkpoint.resume=auto is prepended to the overrides).
#    SIGTERM (scancel, or SLURM's own preemption, which requeues by itself when configured) is
#    forwarded but never requeues. A non-zero exit is never requeued: a crash does not loop.
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

[ $# -ge 1 ] || fw_die "usage: launch/slurm_body.sh CONFIG [key=value ...]   (inside a SLURM allocation)"
CONFIG=$1
shift
[ -f "$CONFIG" ] || fw_die "config file not found: $CONFIG"
: "${SLURM_JOB_ID:?not inside a SLURM job (SLURM_JOB_ID unset): submit launch/slurm.sbatch with sbatch}"
NODELIST=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
[ -n "$NODELIST" ] || fw_die "SLURM_JOB_NODELIST is unset"

if [ -z "${MASTER_ADDR:-}" ]; then
    # no `| head -n1`: under pipefail, head closing the pipe early can kill scontrol with SIGPIPE
    # (more likely the longer the node list) and the job would exit here, silently, with 141
    HOSTS=$(scontrol show hostnames "$NODELIST")
    MASTER_ADDR=${HOSTS%%$'\n'*}
fi
[ -n "$MASTER_ADDR" ] || fw_die "no master address: 'scontrol show hostnames $NODELIST' printed nothing"
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "slurm_body: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), ${SLURM_NNODES:-?} nodes, ${SLURM_NTASKS:-?} tasks, master $MASTER_ADDR:$MASTER_PORT" >&2
fw_entry_args
# shellcheck disable=SC2206
SRUN=(srun --kill-on-bad-exit=1 ${SRUN_ARGS:-})
rc=0
fw_run_forwarding "${SRUN[@]}" "$PYTHON" -u "${FW_ENTRY_ARGS[@]}" --config "$CONFIG" \
    checkpoint.resume=auto "$@" || rc=$?

case " $FW_SIGNALS " in
    *" USR1 "*)
        if [ "$rc" = 0 ] && [ "${FW_REQUEUE:-1}" = 1 ]; then
            echo "slurm_body: preempted (SIGUSR1), checkpointed: scontrol requeue $SLURM_JOB_ID" >&2
            scontrol requeue "$SLURM_JOB_ID"
        else
            echo "slurm_body: preempted (SIGUSR1) but the trainer exited $rc: not requeueing" >&2
        fi
        ;;
esac
exit "$rc"
