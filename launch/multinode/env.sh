#!/usr/bin/env bash
# Sourced by the multi-node scripts in this folder (from the repository root): the environment
# every node needs. Override any of these before calling a script.
#
#   MASTER_ADDR          address of node 0 that every node can reach (required, except where a
#                        script derives it: SLURM from the node list, the hostfile launcher from
#                        the first host)
#   MASTER_PORT          a free TCP port on node 0 (default 29500)
#   NET_IF               network interface for the collectives (e.g. eth0, ib0, bond0); sets
#                        NCCL_SOCKET_IFNAME (GPU, NCCL) and GLOO_SOCKET_IFNAME (CPU, gloo) when
#                        those are not set themselves; unset: the libraries pick one (they can
#                        pick docker0 / lo on some machines: set it when ranks hang at start-up)
#   NPROC_PER_NODE       processes per node (default: the node's GPU count, else 1)
#   OMP_NUM_THREADS      CPU threads per process (default: cores / processes on a CPU node, 1 on GPU)
#   EMBER_DATA_CACHE     prepared-data cache; on a shared filesystem every node reuses one copy
#   EMBER_NO_SETUP=1     use the active Python environment instead of launch/setup_env.sh
#
# Every node must see the repository (same path), the .venv inside it and the --data / --save
# folders: a shared filesystem (NFS, Lustre, ...) is the expected set-up.
if [ -z "${EMBER_NO_SETUP:-}" ]; then
  # shellcheck disable=SC1091
  . launch/setup_env.sh
fi
export MASTER_PORT=${MASTER_PORT:-29500}
if [ -n "${NET_IF:-}" ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NET_IF}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IF}
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
  else
    NPROC_PER_NODE=1
  fi
fi
export NPROC_PER_NODE
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    OMP_NUM_THREADS=1
  else
    OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))
  fi
fi
export OMP_NUM_THREADS PYTHONUNBUFFERED=1

# split_args "$@": flags before a "--" go to the launcher (LAUNCHER_ARGS), those after it to
# launch/train.py (TRAIN_ARGS); without a "--" everything goes to launch/train.py.
split_args() {
  LAUNCHER_ARGS=() TRAIN_ARGS=("$@")
  local i
  for ((i = 1; i <= $#; i++)); do
    if [ "${!i}" = "--" ]; then
      LAUNCHER_ARGS=("${@:1:i-1}")
      TRAIN_ARGS=("${@:i+1}")
      return
    fi
  done
}
