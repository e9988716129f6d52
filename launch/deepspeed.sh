#!/usr/bin/env bash
# DeepSpeed's launcher over a hostfile: run once, on the first node; it starts the other nodes over
# passwordless ssh (pdsh by default).
#
#   launch/deepspeed.sh [LAUNCHER FLAGS] HOSTFILE CONFIG [key=value ...]
#   launch/deepspeed.sh hostfile configs/base.yaml engine.zero_stage=3
#   launch/deepspeed.sh --include "node1:0,1@node2" --master_port 29600 hostfile configs/base.yaml
#   DS_NUM_GPUS=4 launch/deepspeed.sh hostfile configs/base.yaml
#
# HOSTFILE: MPI style, one `HOST slots=N` line per node (N processes there; # comments allowed).
#   A hostfile with a single host (e.g. `localhost slots=2`) runs on this machine without ssh:
#   --no_ssh_check and --master_addr 127.0.0.1 are added (on CPU: N gloo processes).
# Launcher flags (before HOSTFILE; or from the environment, the flag winning):
#   --include SPEC    DS_INCLUDE     only these hosts/slots: "host1@host2:0,2"
#   --exclude SPEC    DS_EXCLUDE     all but these
#   --num_gpus N      DS_NUM_GPUS    the first N slots of each host (not with include/exclude)
#   --num_nodes N     DS_NUM_NODES   the first N hosts (not with include/exclude)
#   --master_addr A   MASTER_ADDR    node 0's address (multi-node default: `ssh HOST hostname -I` of the first)
#   --master_port P   MASTER_PORT    default 29500
#   --launcher L      DS_LAUNCHER    pdsh (default), openmpi, mvapich, slurm, ...
#   --FLAG=VALUE and --no_ssh_check, --no_ssh, --force_multi are passed to deepspeed unchanged;
#   DS_ARGS="..." adds more.
# Environment on the other nodes: DeepSpeed's runner sends its own list (PYTHON*, NCCL*, UCX*, ...)
#   plus the lines of a `.deepspeed_env` file. This script writes that file (KEY=VALUE lines; path
#   $DS_ENV_FILE, default a temporary file removed on exit) from the current environment: every
#   NCCL_*, GLOO_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_*, HF_*, TRANSFORMERS_*, FW_* variable, and
#   OMP_NUM_THREADS, DEEPSPEED_TIMEOUT, DS_ACCELERATOR, PYTHONPATH, PYTHONUNBUFFERED,
#   TOKENIZERS_PARALLELISM, CUDA_DEVICE_MAX_CONNECTIONS, plus names listed in DS_ENV_EXTRA; then the
#   lines of ~/.deepspeed_env and ./.deepspeed_env (which win). Values containing quotes, `$`,
#   backslashes or newlines are skipped with a warning (the runner cannot quote them).
# The processes get --local_rank=N (framework.config.parse_cli accepts it) and RANK, WORLD_SIZE,
# LOCAL_RANK, CROSS_RANK, MASTER_ADDR, MASTER_PORT. DeepSpeed must be installed on every node, in
# the same path, and the repository must be at the same path (the runner cds to the current one).
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage="usage: launch/deepspeed.sh [--include SPEC|--exclude SPEC|--num_gpus N|--num_nodes N|--master_addr A|--master_port P|--launcher L|--FLAG=VALUE ...] HOSTFILE CONFIG [key=value ...]"
INCLUDE=${DS_INCLUDE:-} EXCLUDE=${DS_EXCLUDE:-} NUM_GPUS=${DS_NUM_GPUS:-} NUM_NODES=${DS_NUM_NODES:-}
M_ADDR=${MASTER_ADDR:-} M_PORT=${MASTER_PORT:-} LAUNCHER=${DS_LAUNCHER:-}
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --include|--exclude|--num_gpus|--num_nodes|--master_addr|--master_port|--launcher)
            [ $# -ge 2 ] || fw_die "$1 needs a value"
            case "$1" in
                --include) INCLUDE=$2 ;; --exclude) EXCLUDE=$2 ;; --num_gpus) NUM_GPUS=$2 ;;
                --num_nodes) NUM_NODES=$2 ;; --master_addr) M_ADDR=$2 ;; --master_port) M_PORT=$2 ;;
                --launcher) LAUNCHER=$2 ;;
            esac
            shift 2 ;;
        --include=*) INCLUDE=${1#*=}; shift ;;
        --exclude=*) EXCLUDE=${1#*=}; shift ;;
        --num_gpus=*) NUM_GPUS=${1#*=}; shift ;;
        --num_nodes=*) NUM_NODES=${1#*=}; shift ;;
        --master_addr=*) M_ADDR=${1#*=}; shift ;;
        --master_port=*) M_PORT=${1#*=}; shift ;;
        --launcher=*) LAUNCHER=${1#*=}; shift ;;
        --no_ssh_check|--no_ssh|--force_multi|--no_local_rank|--bind_cores_to_rank) PASS+=("$1"); shift ;;
        --*=*) PASS+=("$1"); shift ;;
        --) shift; break ;;
        -*) fw_die "unknown flag $1 (write --flag=value to pass it to deepspeed)
$usage" ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || fw_die "$usage"
HOSTFILE=$1 CONFIG=$2
shift 2
[ -f "$HOSTFILE" ] || fw_die "hostfile not found: $HOSTFILE"
[ -f "$CONFIG" ] || fw_die "config file not found: $CONFIG"
if [ -n "$INCLUDE$EXCLUDE" ] && [ -n "$NUM_GPUS$NUM_NODES" ]; then
    fw_die "--include/--exclude cannot be combined with --num_gpus/--num_nodes (DeepSpeed's rule)"
fi

# ---- the hostfile: hosts and slots -------------------------------------------------------------
HOSTS=() SLOTS=()
while read -r host rest; do
    case "$host" in ''|\#*) continue ;; esac
    [[ "$rest" =~ slots=([0-9]+) ]] || fw_die "$HOSTFILE: '$host $rest': expected 'HOST slots=N'"
    HOSTS+=("$host") SLOTS+=("${BASH_REMATCH[1]}")
done < "$HOSTFILE"
[ "${#HOSTS[@]}" -ge 1 ] || fw_die "$HOSTFILE lists no hosts"
SINGLE=0
if [ "$(printf '%s\n' "${HOSTS[@]}" | sort -u | wc -l)" = 1 ]; then SINGLE=1; fi
NPROC_HERE=${SLOTS[0]}
[ -n "$NUM_GPUS" ] && [ "$NUM_GPUS" -lt "$NPROC_HERE" ] && NPROC_HERE=$NUM_GPUS

ARGS=(--hostfile "$HOSTFILE")
[ -n "$INCLUDE" ] && ARGS+=(--include "$INCLUDE")
[ -n "$EXCLUDE" ] && ARGS+=(--exclude "$EXCLUDE")
[ -n "$NUM_GPUS" ] && ARGS+=(--num_gpus "$NUM_GPUS")
[ -n "$NUM_NODES" ] && ARGS+=(--num_nodes "$NUM_NODES")
[ -n "$LAUNCHER" ] && ARGS+=(--launcher "$LAUNCHER")
if [ "$SINGLE" = 1 ]; then
    # one host: DeepSpeed launches locally, but would still ssh to it first; nothing to ssh to
    M_ADDR=${M_ADDR:-127.0.0.1}
    case " ${PASS[*]} " in *" --no_ssh_check "*|*" --no_ssh "*) ;; *) PASS+=(--no_ssh_check) ;; esac
fi
[ -n "$M_ADDR" ] && ARGS+=(--master_addr "$M_ADDR")
[ -n "$M_PORT" ] && ARGS+=(--master_port "$M_PORT")
ARGS+=("${PASS[@]}")
# shellcheck disable=SC2206
ARGS+=(${DS_ARGS:-})
fw_set_omp_threads "$NPROC_HERE"

# ---- .deepspeed_env for the other nodes ------------------------------------------------------------
if [ -z "${DS_ENV_FILE:-}" ]; then
    DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/fw-deepspeed_env.XXXXXX")
    trap 'rm -f "$DS_ENV_FILE"' EXIT
fi
case "$DS_ENV_FILE" in /*) ;; *) DS_ENV_FILE="$PWD/$DS_ENV_FILE" ;; esac
export DS_ENV_FILE   # the runner joins it to ~ and . : an absolute path is used as is
{
    extra_re=""
    for name in ${DS_ENV_EXTRA:-}; do extra_re="$extra_re|$name"; done
    while IFS= read -r name; do
        value=${!name}
        if [[ "$value" == *[\"\$\`\\]* || "$value" == *$'\n'* ]]; then
            echo "deepspeed.sh: not exporting $name to other nodes: its value needs quoting" >&2
            continue
        fi
        [ "$name" = FW_DRY_RUN ] && continue
        printf '%s=%s\n' "$name" "$value"
    done < <(compgen -e | grep -E "^(NCCL_|GLOO_|TORCH_NCCL_|TORCH_DISTRIBUTED_|HF_|TRANSFORMERS_|FW_)|^(OMP_NUM_THREADS|DEEPSPEED_TIMEOUT|DS_ACCELERATOR|PYTHONPATH|PYTHONUNBUFFERED|TOKENIZERS_PARALLELISM|CUDA_DEVICE_MAX_CONNECTIONS$extra_re)$" | sort)
    # shellcheck disable=SC2015
    for f in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
        [ -f "$f" ] && [ "$(readlink -f "$f")" != "$(readlink -f "$DS_ENV_FILE")" ] && grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$f" || true
    done
} > "$DS_ENV_FILE.tmp"
mv "$DS_ENV_FILE.tmp" "$DS_ENV_FILE"

fw_entry_args
if [ "${FW_ENTRY_ARGS[0]}" = -m ]; then ENTRY=(--module "${FW_ENTRY_ARGS[1]}"); else ENTRY=("${FW_ENTRY_ARGS[0]}"); fi
DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner)
if [ "${FW_DRY_RUN:-0}" = 1 ]; then echo "# DS_ENV_FILE=$DS_ENV_FILE"; sed 's/^/# /' "$DS_ENV_FILE"; fi
rc=0
fw_run_forwarding "${DEEPSPEED[@]}" "${ARGS[@]}" "${ENTRY[@]}" --config "$CONFIG" "$@" || rc=$?
exit "$rc"
