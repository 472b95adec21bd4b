#!/usr/bin/env bash
# The deepspeed launcher without ssh: run THIS SAME COMMAND on every node (each with its own
# NODE_RANK); each node starts its own processes (the hostfile's slots for that node) and they
# meet at MASTER_ADDR:MASTER_PORT. For clusters where nodes cannot ssh to each other (containers,
# Kubernetes, most clouds' managed jobs).
#
#   # on node 0                                    # on node 1
#   export MASTER_ADDR=10.0.0.1                    export MASTER_ADDR=10.0.0.1
#   NODE_RANK=0 HOSTFILE=launch/multinode/hostfile \
#     bash launch/multinode/deepspeed_no_ssh.sh --preset 410m --tp 2 \
#       --deepspeed_config ds_configs/ember_zero1_bf16.json --data /shared/texts --save /shared/ckpt
#                                                  (node 1: NODE_RANK=1, same flags)
#
# HOSTFILE (default launch/multinode/hostfile): one line per node, "<name> slots=<processes>", in
# node-rank order (see hostfile.example); the names only label the nodes here.
#   deepspeed_no_ssh.sh [LAUNCHER FLAGS --] TRAIN.PY FLAGS
# flags before a "--" go to DeepSpeed's launcher (--include, --exclude, --num_gpus, ...), the
# rest to launch/train.py; without a "--" everything goes to launch/train.py. Environment: env.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
. launch/multinode/env.sh
HOSTFILE=${HOSTFILE:-launch/multinode/hostfile}
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address (reachable from every node)}"
: "${NODE_RANK:?set NODE_RANK to this node's line in $HOSTFILE, counting from 0}"
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (see launch/multinode/hostfile.example)" >&2; exit 2; }
echo "[deepspeed_no_ssh] node $NODE_RANK of $HOSTFILE, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
split_args "$@"
exec python -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${LAUNCHER_ARGS[@]}" \
  launch/train.py "${TRAIN_ARGS[@]}"
