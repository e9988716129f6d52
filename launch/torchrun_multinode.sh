#!/usr/bin/env bash
# Several nodes with torchrun: run this once on every node.
#
#   launch/torchrun_multinode.sh NNODES NODE_RANK MASTER_ADDR[:PORT] NPROC_PER_NODE CONFIG [key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       launch/torchrun_multinode.sh CONFIG [key=value ...]              (the same from the environment)
#
#   node 0:  launch/torchrun_multinode.sh 2 0 10.0.0.1:29500 8 configs/base.yaml
#   node 1:  launch/torchrun_multinode.sh 2 1 10.0.0.1:29500 8 configs/base.yaml
#
# MASTER_ADDR is node 0's address as the other nodes reach it; PORT (default $MASTER_PORT or 29500)
# must be free there. Rendezvous, from the environment:
#   RDZV=c10d (default)  torchrun's c10d rendezvous at MASTER_ADDR:PORT. Node 0 hosts the store
#                        (--rdzv_conf is_host=true: it does not rely on matching its hostname against
#                        MASTER_ADDR, which fails where hosts share a hostname, e.g. containers or
#                        network namespaces; RDZV_IS_HOST=auto leaves that guess to torch). Global
#                        ranks are assigned by the rendezvous: node order is not guaranteed.
#   RDZV=static          fixed --node_rank / --master_addr / --master_port; node N gets ranks
#                        N*NPROC_PER_NODE ... ; all nodes must start, there is no re-join.
#   LOCAL_ADDR           this node's address as the others reach it (torchrun --local_addr). Set it
#                        where the hostname does not resolve to that address (shared hostnames,
#                        several interfaces); with c10d the store's and the workers' addresses come
#                        from it.
#   RDZV_ID              job id shared by all nodes (c10d; default fw-PORT). RDZV_CONF: extra
#                        key=value[,key=value] for --rdzv_conf (e.g. join_timeout=1800).
#   TORCHRUN_ARGS        extra torchrun flags (e.g. "--max_restarts=3 --log_dir=logs/run1").
# Interfaces, timeouts, threads: launch/env.sh (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME / FW_IFNAME).
set -euo pipefail
# shellcheck source=launch/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

usage="usage: launch/torchrun_multinode.sh NNODES NODE_RANK MASTER_ADDR[:PORT] NPROC_PER_NODE CONFIG [key=value ...]
   or: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. [MASTER_PORT=..] NPROC_PER_NODE=.. launch/torchrun_multinode.sh CONFIG [key=value ...]"
if fw_is_uint "${1:-}"; then
    [ $# -ge 5 ] || fw_die "$usage"
    NNODES=$1 NODE_RANK=$2 ADDR=$3 NPROC_PER_NODE=$4 CONFIG=$5
    shift 5
else
    [ $# -ge 1 ] || fw_die "$usage"
    NNODES=${NNODES:-} NODE_RANK=${NODE_RANK:-} ADDR=${MASTER_ADDR:-} NPROC_PER_NODE=${NPROC_PER_NODE:-}
    CONFIG=$1
    shift
fi
# shellcheck disable=SC2015
fw_is_uint "$NNODES" && [ "$NNODES" -ge 1 ] || fw_die "NNODES must be a positive integer, got '$NNODES'
$usage"
# shellcheck disable=SC2015
fw_is_uint "$NODE_RANK" && [ "$NODE_RANK" -lt "$NNODES" ] || fw_die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
fw_is_uint "$NPROC_PER_NODE" || [[ "$NPROC_PER_NODE" =~ ^(gpu|auto)$ ]] || fw_die "NPROC_PER_NODE must be a count, gpu or auto, got '$NPROC_PER_NODE'"
[ -n "$ADDR" ] || fw_die "MASTER_ADDR is empty
$usage"
[ -f "$CONFIG" ] || fw_die "config file not found: $CONFIG"

# MASTER_ADDR[:PORT]; a bracketed IPv6 [::1]:29500 keeps its brackets for the endpoint
PORT=${MASTER_PORT:-29500}
if [[ "$ADDR" =~ ^(\[[^]]+\]|[^:]+):([0-9]+)$ ]]; then
    ADDR=${BASH_REMATCH[1]} PORT=${BASH_REMATCH[2]}
fi
RDZV=${RDZV:-c10d}
RDZV_IS_HOST=${RDZV_IS_HOST:-}

fw_set_omp_threads "$NPROC_PER_NODE"
fw_entry_args
ARGS=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
case "$RDZV" in
    c10d)
        conf=""
        if [ -z "$RDZV_IS_HOST" ]; then [ "$NODE_RANK" = 0 ] && RDZV_IS_HOST=true || RDZV_IS_HOST=false; fi
        [ "$RDZV_IS_HOST" != auto ] && conf="is_host=$RDZV_IS_HOST"
        [ -n "${RDZV_CONF:-}" ] && conf="${conf:+$conf,}$RDZV_CONF"
        ARGS+=(--rdzv_backend c10d --rdzv_endpoint "$ADDR:$PORT" --rdzv_id "${RDZV_ID:-fw-$PORT}")
        [ -n "$conf" ] && ARGS+=(--rdzv_conf "$conf")
        ;;
    static)
        ARGS+=(--rdzv_backend static --node_rank "$NODE_RANK" --master_addr "$ADDR" --master_port "$PORT")
        ;;
    *) fw_die "RDZV must be c10d or static, got '$RDZV'" ;;
esac
[ -n "${LOCAL_ADDR:-}" ] && ARGS+=(--local_addr "$LOCAL_ADDR")
# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
echo "torchrun_multinode: node $NODE_RANK/$NNODES, $NPROC_PER_NODE processes, $RDZV rendezvous at $ADDR:$PORT${LOCAL_ADDR:+, local address $LOCAL_ADDR}" >&2
fw_exec "$PYTHON" -m torch.distributed.run "${ARGS[@]}" "${EXTRA[@]}" "${FW_ENTRY_ARGS[@]}" \
    --config "$CONFIG" "$@"
