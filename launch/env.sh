# shellcheck shell=bash
# launch/env.sh: the process-group and threading environment every launcher uses.
# Sourced by launch/local.sh, deepspeed.sh, torchrun_multinode.sh, slurm_body.sh; never run directly.
#
# Every setting is a default only: a variable already in the caller's environment wins
# (`NCCL_DEBUG=INFO launch/local.sh 8 configs/x.yaml`). Nothing here is a hyperparameter.
#
#   PYTHON                     interpreter: $FW_ROOT/.venv/bin/python when present, else python3
#   FW_ENTRY                   what the launchers start: a module (default framework.train) or a .py path
#   FW_DRY_RUN=1               print the launch command (one argument per line) instead of running it
#   FW_IFNAME                  one network interface for both NCCL and gloo (fills the two below)
#   NCCL_SOCKET_IFNAME         NCCL's bootstrap/socket interface(s), e.g. ib0 or ^docker,lo (unset: NCCL picks)
#   GLOO_SOCKET_IFNAME         gloo's interface (CPU runs, and DeepSpeed's gloo side groups); exact names,
#                              comma separated (unset: the interface of the hostname's address)
#   NCCL_IB_DISABLE            1 disables InfiniBand/RoCE (only exported when you set it)
#   NCCL_DEBUG                 WARN (INFO shows the chosen transport and interfaces; use it once per cluster)
#   DEEPSPEED_TIMEOUT          minutes a collective may wait before the process group fails (DeepSpeed's
#                              knob; its own default is 10). Default here: 30 (first-step compiles,
#                              checkpoint writes to slow file systems).
#   TORCH_NCCL_BLOCKING_WAIT   unset. 1 makes a timed-out NCCL collective raise in the waiting call
#                              (with a stack trace) rather than torch's watchdog aborting the process;
#                              useful while debugging hangs, slower. TORCH_NCCL_ASYNC_ERROR_HANDLING
#                              (torch default 3) governs the watchdog. There is no TORCH_DIST_TIMEOUT:
#                              the timeout is DEEPSPEED_TIMEOUT (DeepSpeed initializes the group).
#   OMP_NUM_THREADS            CPU threads per process: CPU cores / processes on this node (at least 1),
#                              set by each launcher once it knows the process count
#   DS_ACCELERATOR             cpu on a machine without nvidia-smi (silences DeepSpeed's probe), else unset
#   PYTHONUNBUFFERED=1, TOKENIZERS_PARALLELISM=false

FW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FW_ROOT

# ---- interpreter and entry point --------------------------------------------------------------
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$FW_ROOT/.venv/bin/python" ]; then PYTHON="$FW_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
: "${FW_ENTRY:=framework.train}"
export FW_ENTRY
# the repo importable from any working directory (config paths and run_dir stay relative to the caller's)
export PYTHONPATH="$FW_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- interfaces -------------------------------------------------------------------------------
if [ -n "${FW_IFNAME:-}" ]; then
    : "${NCCL_SOCKET_IFNAME:=$FW_IFNAME}"
    : "${GLOO_SOCKET_IFNAME:=$FW_IFNAME}"
fi
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
[ -n "${GLOO_SOCKET_IFNAME:-}" ] && export GLOO_SOCKET_IFNAME
[ -n "${NCCL_IB_DISABLE:-}" ] && export NCCL_IB_DISABLE

# ---- NCCL / process group ---------------------------------------------------------------------
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"
[ -n "${TORCH_NCCL_BLOCKING_WAIT:-}" ] && export TORCH_NCCL_BLOCKING_WAIT
[ -n "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-}" ] && export TORCH_NCCL_ASYNC_ERROR_HANDLING

# ---- misc -------------------------------------------------------------------------------------
if [ -z "${DS_ACCELERATOR:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
fi
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# ---- helpers ----------------------------------------------------------------------------------
fw_die() { echo "$(basename "$0"): $*" >&2; exit 2; }

fw_is_uint() { [[ "${1:-}" =~ ^[0-9]+$ ]]; }

# fw_set_omp_threads NPROC_ON_THIS_NODE: OMP_NUM_THREADS = cores / processes (>= 1) unless set.
fw_set_omp_threads() {
    if [ -z "${OMP_NUM_THREADS:-}" ]; then
        local cores n="${1:-1}"
        cores="$(nproc 2>/dev/null || echo 1)"
        fw_is_uint "$n" && [ "$n" -gt 0 ] || n=1
        OMP_NUM_THREADS=$(( cores / n ))
        [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    fi
    export OMP_NUM_THREADS
}

# FW_ENTRY as arguments for a python-style launcher: (-m module) or (path.py)
fw_entry_args() {
    # shellcheck disable=SC2034  # read by the launchers
    if [[ "$FW_ENTRY" == *.py ]]; then FW_ENTRY_ARGS=("$FW_ENTRY"); else FW_ENTRY_ARGS=(-m "$FW_ENTRY"); fi
}

# fw_exec CMD...: run CMD in place of this shell (or print it under FW_DRY_RUN=1).
fw_exec() {
    if [ "${FW_DRY_RUN:-0}" = 1 ]; then printf '%s\n' "$@"; exit 0; fi
    echo "+ $*" >&2
    exec "$@"
}

# fw_run_forwarding CMD...: run CMD as a child, forward TERM/INT/HUP/USR1/USR2 to it, return its
# status. The signal names received are appended to FW_SIGNALS (space separated), so a caller can
# tell a preempted run from a finished one. (Background jobs ignore SIGINT: INT is sent as TERM.)
FW_SIGNALS=""
fw_run_forwarding() {
    if [ "${FW_DRY_RUN:-0}" = 1 ]; then printf '%s\n' "$@"; return 0; fi
    echo "+ $*" >&2
    local pid rc sig
    _FW_CHILD="" _FW_TRAPPED=0 _FW_PENDING=""
    for sig in TERM INT HUP USR1 USR2; do
        # shellcheck disable=SC2064
        trap "_fw_forward $sig" "$sig"
    done
    "$@" &
    pid=$!
    _FW_CHILD=$pid
    for sig in $_FW_PENDING; do _fw_forward "$sig"; done   # arrived before the child existed
    while :; do
        rc=0; wait "$pid" || rc=$?
        if [ "$_FW_TRAPPED" = 1 ]; then _FW_TRAPPED=0; continue; fi   # wait was cut short by a signal
        break
    done
    for sig in TERM INT HUP USR1 USR2; do trap - "$sig"; done
    return "$rc"
}
_fw_forward() {
    local sig=$1
    if [ -z "$_FW_CHILD" ]; then _FW_PENDING="$_FW_PENDING $sig"; return 0; fi
    _FW_TRAPPED=1
    FW_SIGNALS="${FW_SIGNALS:+$FW_SIGNALS }$sig"
    [ "$sig" = INT ] && sig=TERM
    echo "$(basename "$0"): got SIG$1, forwarding SIG$sig to $_FW_CHILD" >&2
    kill -s "$sig" "$_FW_CHILD" 2>/dev/null || true
}
