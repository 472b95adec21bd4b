#!/usr/bin/env bash
# The deepspeed launcher with a hostfile, over ssh (pdsh by default): run ONCE, on the first
# host of the hostfile. DeepSpeed logs into every host (passwordless ssh needed, and pdsh
# installed for the default launcher), cds to this same folder there and starts the processes.
#
#   HOSTFILE=launch/multinode/hostfile NET_IF=ib0 \
#     bash launch/multinode/deepspeed_hostfile.sh --preset 410m \
#       --deepspeed_config ds_configs/ember_zero2_bf16.json --data /shared/texts --save /shared/ckpt
#
# HOSTFILE (default launch/multinode/hostfile): "<host> slots=<GPUs>" per line (hostfile.example).
# DS_LAUNCHER: pdsh (default), openmpi, mvapich, impi, slurm (DeepSpeed's --launcher).
# MASTER_ADDR defaults to the first host of the hostfile.
#
# Environment on the remote hosts: DeepSpeed forwards only variables named NCCL*, PYTHON*, UCX*,
# MV2*, MLFLOW* plus the lines of a ".deepspeed_env" file; this script writes the rest that
# matters (GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, EMBER_DATA_CACHE, TORCH_EXTENSIONS_DIR, ...) to
# runs/.deepspeed_env and points DeepSpeed at it (DS_ENV_FILE). Everything after the script name
# goes to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOSTFILE=${HOSTFILE:-launch/multinode/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (see launch/multinode/hostfile.example)" >&2; exit 2; }
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
fi
export MASTER_ADDR
# shellcheck disable=SC1091
. launch/multinode/env.sh

mkdir -p runs
ENV_FILE=runs/.deepspeed_env
: > "$ENV_FILE"
for v in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME OMP_NUM_THREADS EMBER_DATA_CACHE XDG_CACHE_HOME \
         TORCH_EXTENSIONS_DIR HF_HOME CUDA_DEVICE_MAX_CONNECTIONS; do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$ENV_FILE"; fi
done
export DS_ENV_FILE=$ENV_FILE
echo "[deepspeed_hostfile] hosts from $HOSTFILE, master $MASTER_ADDR:$MASTER_PORT, launcher ${DS_LAUNCHER:-pdsh}, env file $ENV_FILE" >&2
exec python -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py "$@"
