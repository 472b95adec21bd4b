#!/usr/bin/env bash
# The deepspeed launcher with a hostfile, over ssh (pdsh by default): run ONCE, on the first
# host of the hostfile. DeepSpeed logs into every host (passwordless ssh, every host's key in
# ~/.ssh/known_hosts, pdsh installed for the default launcher), cds to this same folder there and
# starts the processes.
#
#   bash launch/multinode/deepspeed_hostfile.sh [LAUNCHER FLAGS --] TRAIN.PY FLAGS
#
#   HOSTFILE=launch/multinode/hostfile NET_IF=ib0 \
#     bash launch/multinode/deepspeed_hostfile.sh --include 'node-001:0,1@node-002:0,1' \
#       --ssh_port 2222 -- --preset 410m --deepspeed_config ds_configs/ember_zero2_bf16.json \
#       --data /shared/texts --save /shared/ckpt
#
# Flags before a "--" go to DeepSpeed's launcher (--include, --exclude, --num_nodes,
# --num_gpus, --ssh_port, --master_port, --master_addr, --launcher, --launcher_args, ...); the
# flags after it go to launch/train.py. Without a "--" every flag goes to launch/train.py.
# HOSTFILE (default launch/multinode/hostfile): "<host> slots=<GPUs>" per line (hostfile.example).
# DS_LAUNCHER: pdsh (default), openmpi, mvapich, impi, slurm (DeepSpeed's --launcher).
# MASTER_ADDR defaults to the first host used (of the hostfile, after --include / --exclude).
#
# Before launching, every host it will use (after --include / --exclude / --num_nodes) is
# tried over ssh the way pdsh logs in (check.sh --ssh-only): a host whose key is not in
# known_hosts, or that asks for a password, stops the launch with the fix to run (DeepSpeed
# itself would only say "not reachable", or hang). EMBER_SKIP_SSH_CHECK=1 skips this.
#
# Environment on the remote hosts: DeepSpeed forwards only variables named PYTHON*, UCX*, MV2*,
# MLFLOW* (and NCCL* only when it runs on CUDA: not on CPU nodes) plus the lines of a
# ".deepspeed_env" file. This script writes runs/.deepspeed_env and points DeepSpeed at it
# (DS_ENV_FILE): first the lines of your ~/.deepspeed_env and of ./.deepspeed_env (merged, as
# DeepSpeed reads them; comments and blank lines dropped), then, for every name those files do
# not set, GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, EMBER_DATA_CACHE, TORCH_EXTENSIONS_DIR, ... and
# every NCCL_* / GLOO_* / TORCH_* / EMBER_* variable of this shell.
set -euo pipefail
cd "$(dirname "$0")/../.."
HOSTFILE=${HOSTFILE:-launch/multinode/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (see launch/multinode/hostfile.example)" >&2; exit 2; }

# shellcheck disable=SC1091
. launch/multinode/env.sh
split_args "$@"          # [launcher flags] -- [train.py flags]
SSH_PORT="" NUM_NODES="" INCLUDE="" EXCLUDE=""
for ((i = 0; i < ${#LAUNCHER_ARGS[@]}; i++)); do
  a=${LAUNCHER_ARGS[i]}
  case "$a" in
    --ssh_port=*) SSH_PORT=${a#*=} ;;
    --ssh_port) SSH_PORT=${LAUNCHER_ARGS[i+1]:-} ;;
    --master_port=*) MASTER_PORT=${a#*=} ;;
    --master_port) MASTER_PORT=${LAUNCHER_ARGS[i+1]:-} ;;
    --master_addr=*) MASTER_ADDR=${a#*=} ;;
    --master_addr) MASTER_ADDR=${LAUNCHER_ARGS[i+1]:-} ;;
    --include=*|-i=*) INCLUDE=${a#*=} ;;
    --include|-i) INCLUDE=${LAUNCHER_ARGS[i+1]:-} ;;
    --exclude=*|-e=*) EXCLUDE=${a#*=} ;;
    --exclude|-e) EXCLUDE=${LAUNCHER_ARGS[i+1]:-} ;;
    --num_nodes=*) NUM_NODES=${a#*=} ;;
    --num_nodes) NUM_NODES=${LAUNCHER_ARGS[i+1]:-} ;;
    --launcher=*) DS_LAUNCHER=${a#*=} ;;
    --launcher) DS_LAUNCHER=${LAUNCHER_ARGS[i+1]:-} ;;
    --hostfile|--hostfile=*|-H)
      echo "set HOSTFILE=... instead of passing $a to deepspeed_hostfile.sh" >&2; exit 2 ;;
  esac
done
DS_LAUNCHER=${DS_LAUNCHER:-pdsh}
# the hosts DeepSpeed will use: --include / --exclude ("host[:slots]@host..."; an excluded host
# with slots named stays) and --num_nodes (the first N) applied to the hostfile
active=()
while read -r h; do
  if [ -n "$INCLUDE" ] && [[ "@$INCLUDE@" != *"@$h@"* && "@$INCLUDE" != *"@$h:"* ]]; then continue; fi
  if [ -n "$EXCLUDE" ] && [[ "@$EXCLUDE@" == *"@$h@"* ]]; then continue; fi
  active+=("$h")
done < <(awk '!/^[[:space:]]*#/ && NF {print $1}' "$HOSTFILE")
if [ -n "$NUM_NODES" ] && [ "$NUM_NODES" -ge 0 ] 2> /dev/null; then active=("${active[@]:0:NUM_NODES}"); fi
[ ${#active[@]} -gt 0 ] || { echo "no host of $HOSTFILE is left after --include / --exclude / --num_nodes" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-${active[0]}}
export MASTER_ADDR MASTER_PORT

if [ -z "${EMBER_SKIP_SSH_CHECK:-}" ] && [ "$DS_LAUNCHER" = pdsh ]; then
  mkdir -p runs
  check_hosts=$(mktemp "$PWD/runs/.hostfile-check.XXXXXX")
  printf '%s slots=1\n' "${active[@]}" > "$check_hosts"
  if ! bash launch/multinode/check.sh --ssh-only ${SSH_PORT:+--ssh-port "$SSH_PORT"} "$check_hosts" >&2; then
    rm -f "$check_hosts"
    echo "[deepspeed_hostfile] ssh to the hosts above fails: fix it (the commands are given) or set EMBER_SKIP_SSH_CHECK=1" >&2
    exit 2
  fi
  rm -f "$check_hosts"
fi

# the env file: the user's ~/.deepspeed_env and ./.deepspeed_env lines first, then ours
mkdir -p runs
ENV_FILE=$PWD/runs/.deepspeed_env     # an absolute name: DeepSpeed reads this one file
tmp_env=$(mktemp "$PWD/runs/.deepspeed_env.XXXXXX")
declare -A DEFINED=()
for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do
  [ -f "$f" ] || continue
  [ "$(realpath "$f")" != "$ENV_FILE" ] || continue
  while IFS= read -r line || [ -n "$line" ]; do
    if [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)= ]]; then
      echo "$line" >> "$tmp_env"
      DEFINED[${BASH_REMATCH[1]}]=1
    elif [[ -n "${line//[[:space:]]/}" && ! "$line" =~ ^[[:space:]]*# ]]; then
      echo "[deepspeed_hostfile] $f: ignored line \"$line\" (expected NAME=VALUE)" >&2
    fi
  done < "$f"
done
names=(GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME OMP_NUM_THREADS EMBER_DATA_CACHE XDG_CACHE_HOME
       TORCH_EXTENSIONS_DIR HF_HOME CUDA_DEVICE_MAX_CONNECTIONS)
while IFS= read -r v; do names+=("$v"); done < <(compgen -e | grep -E '^(NCCL|GLOO|TORCH|EMBER)_' || true)
for v in "${names[@]}"; do
  [ -z "${DEFINED[$v]:-}" ] || continue
  [ "$v" != EMBER_NO_SETUP ] && [ "$v" != EMBER_SKIP_SSH_CHECK ] || continue
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$tmp_env"; DEFINED[$v]=1; fi
done
mv "$tmp_env" "$ENV_FILE"
export DS_ENV_FILE=$ENV_FILE
# pdsh hands the command line to each host's shell as one string: quote the train.py flags so a
# JSON value such as --model 'leviathan={"modes":32}' reaches train.py unchanged (DeepSpeed
# passes them unquoted). Only when DeepSpeed goes multi-node (more than one host used); on one
# host it starts train.py without a shell.
if [ "$DS_LAUNCHER" = pdsh ] && [ ${#active[@]} -gt 1 ]; then
  quoted=()
  for a in "${TRAIN_ARGS[@]}"; do quoted+=("$(printf '%q' "$a")"); done
  TRAIN_ARGS=("${quoted[@]}")
fi
echo "[deepspeed_hostfile] hosts from $HOSTFILE, master $MASTER_ADDR:$MASTER_PORT, launcher $DS_LAUNCHER, env file $ENV_FILE (${#DEFINED[@]} variables), launcher flags: ${LAUNCHER_ARGS[*]:-none}" >&2
exec python -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${LAUNCHER_ARGS[@]}" \
  launch/train.py "${TRAIN_ARGS[@]}"
