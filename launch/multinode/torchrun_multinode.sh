#!/usr/bin/env bash
# torchrun on several nodes: run THIS SAME COMMAND on every node, with its own NODE_RANK.
# torchrun's static rendezvous meets at MASTER_ADDR:MASTER_PORT (node 0 listens there).
#
#   # on node 0                                  # on node 1
#   export MASTER_ADDR=10.0.0.1 NNODES=2         export MASTER_ADDR=10.0.0.1 NNODES=2
#   NODE_RANK=0 bash launch/multinode/torchrun_multinode.sh --preset 60m \
#       --deepspeed_config ds_configs/ember_zero1_bf16.json --data /shared/texts \
#       --save /shared/ckpt/60m --resume                         (node 1: NODE_RANK=1, same flags)
#
#   torchrun_multinode.sh [TORCHRUN FLAGS --] TRAIN.PY FLAGS
# flags before a "--" go to torchrun (--max-restarts, --rdzv-conf, --log-dir, ...), the rest to
# launch/train.py; without a "--" everything goes to launch/train.py. Environment: see env.sh
# (MASTER_ADDR, MASTER_PORT, NET_IF -> NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, NPROC_PER_NODE).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
. launch/multinode/env.sh
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address (reachable from every node)}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index, 0 .. NNODES-1}"
echo "[torchrun_multinode] node $NODE_RANK/$NNODES, $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
split_args "$@"
exec python -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "${LAUNCHER_ARGS[@]}" launch/train.py "${TRAIN_ARGS[@]}"
