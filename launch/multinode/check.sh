#!/usr/bin/env bash
# Pre-flight check of a cluster before a multi-node launch: run it on the first host.
#
#   bash launch/multinode/check.sh [options] HOSTFILE
#
#   --save DIR      checkpoint folder: must be the same (shared) folder on every host, writable
#   --cache DIR     prepared-data cache (default $EMBER_DATA_CACHE when set): same test
#   --data PATH     a --data file / folder that every host must see (repeatable)
#   --net-if IF     network interface the collectives use (default $NET_IF, else
#                   $GLOO_SOCKET_IFNAME / $NCCL_SOCKET_IFNAME): must exist and not be down
#   --ssh-port N    ssh port (as DeepSpeed's --ssh_port)
#   --ssh-only      only ssh: reachable, host key known, passwordless (deepspeed_hostfile.sh runs
#                   this before launching)
#
# For every host of HOSTFILE ("<host> slots=<n>" lines, as DeepSpeed reads them) it checks, over
# ssh exactly as the launcher logs in (non-interactively): the host key is in known_hosts, the
# login needs no password, the repository is at this same path, its .venv has python with
# torch / deepspeed / megatron-core (same torch version as here), the --save / cache / data
# folders, the interface, and that MASTER_ADDR (default: the first host) resolves there.
# Prints one line per problem, "check: <host>: <what> [fix: <command>]", then a summary; exits 1
# if there is any problem, 2 on a usage error, 0 when all is well.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SAVE="" CACHE=${EMBER_DATA_CACHE:-} NETIF=${NET_IF:-${GLOO_SOCKET_IFNAME:-${NCCL_SOCKET_IFNAME:-}}}
SSH_PORT="" SSH_ONLY=0 HOSTFILE="" DATA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --save) SAVE=${2:?--save needs a folder}; shift 2 ;;
    --cache) CACHE=${2:?--cache needs a folder}; shift 2 ;;
    --data) DATA+=("${2:?--data needs a path}"); shift 2 ;;
    --net-if) NETIF=${2:?--net-if needs an interface name}; shift 2 ;;
    --ssh-port|--ssh_port) SSH_PORT=${2:?--ssh-port needs a port}; shift 2 ;;
    --ssh-only) SSH_ONLY=1; shift ;;
    -h|--help) usage ;;
    -*) echo "check: unknown option $1" >&2; usage ;;
    *) [ -z "$HOSTFILE" ] || { echo "check: one HOSTFILE only" >&2; usage; }; HOSTFILE=$1; shift ;;
  esac
done
[ -n "$HOSTFILE" ] || usage
[ -f "$HOSTFILE" ] || { echo "check: hostfile not found: $HOSTFILE (see launch/multinode/hostfile.example)"; exit 2; }

PROBLEMS=0
problem() { echo "check: $*"; PROBLEMS=$((PROBLEMS + 1)); }

# hosts, as DeepSpeed parses the hostfile ("<host> slots=<n>", # comments)
HOSTS=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  read -r host slots extra <<< "$line"
  [ -n "${host:-}" ] || continue
  if [[ ! "${slots:-}" =~ ^slots=[0-9]+$ ]] || [ -n "${extra:-}" ]; then
    problem "$HOSTFILE:$lineno: expected \"<host> slots=<n>\", got \"$line\""
    continue
  fi
  HOSTS+=("$host")
done < "$HOSTFILE"
[ ${#HOSTS[@]} -gt 0 ] || { problem "$HOSTFILE: no hosts"; exit 1; }
MASTER=${MASTER_ADDR:-${HOSTS[0]}}

SSH=(ssh -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR)
[ -z "$SSH_PORT" ] || SSH+=(-p "$SSH_PORT")
PORT_OPT=${SSH_PORT:+-p $SSH_PORT }
KNOWN_HOSTS="~/.ssh/known_hosts"

# Shared folders: a marker with a random token written here must be seen on every host.
TOKEN="$(hostname)-$$-$RANDOM$RANDOM"
SHARED=()
if [ "$SSH_ONLY" = 0 ]; then
  for d in "$SAVE" "$CACHE"; do
    [ -n "$d" ] || continue
    d=$(realpath -m "$d")
    if ! mkdir -p "$d" 2> /dev/null || ! echo "$TOKEN" > "$d/.ember-check-$TOKEN" 2> /dev/null; then
      problem "$(hostname) (here): cannot write to $d"
      continue
    fi
    SHARED+=("$d")
  done
fi
cleanup() { for d in "${SHARED[@]}"; do rm -f "$d/.ember-check-$TOKEN"; done; }
trap cleanup EXIT

TORCH_HERE=$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2> /dev/null || true)

# The checks run on each host (bash, arguments: root token netif master torch_version, then
# "--shared" dirs, then "--data" paths). Each problem is one line on stdout.
# shellcheck disable=SC2016
REMOTE='
root=$1 token=$2 netif=$3 master=$4 torch_here=$5; shift 5
if [ ! -f "$root/launch/train.py" ]; then
  echo "repository not found at $root (every host needs it at the same path: a shared filesystem)"
else
  py=$root/.venv/bin/python
  if [ ! -x "$py" ]; then
    echo "no virtual environment at $root/.venv (fix: run \". launch/setup_env.sh\" once, from a shared filesystem)"
  else
    out=$("$py" - "$torch_here" 2>&1 <<"PY"
import importlib.metadata as m, importlib.util as u, sys
missing = [n for n in ("torch", "deepspeed", "megatron.core") if u.find_spec(n.split(".")[0]) is None]
if missing:
    print("the .venv python cannot import " + ", ".join(missing))
elif sys.argv[1] and m.version("torch") != sys.argv[1]:
    print("torch " + m.version("torch") + " in the .venv here, " + sys.argv[1] + " on the first host")
PY
)
    [ $? -eq 0 ] || out="the .venv python does not run: $(printf "%s\n" "$out" | tail -n 1)"
    [ -z "$out" ] || echo "$out"
  fi
fi
mode=shared
for a in "$@"; do
  case "$a" in --shared) mode=shared; continue ;; --data) mode=data; continue ;; esac
  if [ "$mode" = data ]; then
    [ -e "$a" ] || echo "data path $a not found"
    continue
  fi
  if [ ! -d "$a" ]; then
    echo "folder $a not found (it must be on a filesystem every host shares)"
  elif [ "$(cat "$a/.ember-check-$token" 2> /dev/null)" != "$token" ]; then
    echo "folder $a is not the one the first host sees (not a shared filesystem: a marker written there is missing here)"
  elif ! ( : > "$a/.ember-check-$token-$(hostname)" ) 2> /dev/null; then
    echo "folder $a is not writable"
  else
    rm -f "$a/.ember-check-$token-$(hostname)"
  fi
done
if [ -n "$netif" ]; then
  if [ ! -e "/sys/class/net/$netif" ]; then
    echo "network interface $netif not found (interfaces here: $(ls /sys/class/net | tr "\n" " "))"
  elif [ "$(cat "/sys/class/net/$netif/operstate" 2> /dev/null)" = down ]; then
    echo "network interface $netif is down"
  fi
fi
if ! getent hosts "$master" > /dev/null 2>&1 && ! [[ "$master" =~ ^[0-9.]+$ ]]; then
  echo "MASTER_ADDR $master does not resolve here"
fi
'

check_host() {
  local host=$1 err rc out
  err=$("${SSH[@]}" "$host" true 2>&1 < /dev/null)
  rc=$?
  if [ $rc -ne 0 ]; then
    case "$err" in
      *"REMOTE HOST IDENTIFICATION HAS CHANGED"*|*"Host key for"*"has changed"*)
        echo "$host: ssh host key changed since it was recorded in $KNOWN_HOSTS (fix, once you trust the new key: ssh-keygen -R $host && ssh-keyscan ${PORT_OPT}-H $host >> $KNOWN_HOSTS)" ;;
      *"Host key verification failed"*|*"No "*"host key is known"*)
        echo "$host: ssh host key not in $KNOWN_HOSTS: ssh (and DeepSpeed, pdsh) cannot log in non-interactively (fix: ssh-keyscan ${PORT_OPT}-H $host >> $KNOWN_HOSTS)" ;;
      *"Permission denied"*)
        echo "$host: ssh needs a password or key it does not have: passwordless ssh is not set up (fix: ssh-copy-id ${PORT_OPT}$host)" ;;
      *"Could not resolve hostname"*)
        echo "$host: host name does not resolve" ;;
      *)
        err=$(printf '%s\n' "$err" | grep -v '^\s*$' | tail -n 1)
        echo "$host: cannot ssh to it (exit $rc: ${err:-no message})" ;;
    esac
    return
  fi
  [ "$SSH_ONLY" = 1 ] && return
  local args=("$ROOT" "$TOKEN" "$NETIF" "$MASTER" "$TORCH_HERE" --shared "${SHARED[@]}" --data "${DATA[@]}")
  out=$("${SSH[@]}" "$host" "bash -s -- $(printf '%q ' "${args[@]}")" <<< "$REMOTE" 2>&1)
  rc=$?
  printf '%s\n' "$out" | grep -v '^\s*$' | sed "s|^|$host: |"
  [ $rc -eq 0 ] || echo "$host: the remote checks failed (exit $rc)"
}

# every host at once (up to 32 in flight), reported in hostfile order
TMP=$(mktemp -d)
trap 'cleanup; rm -rf "$TMP"' EXIT
i=0
for host in "${HOSTS[@]}"; do
  check_host "$host" > "$TMP/$i" &
  i=$((i + 1))
  while [ "$(jobs -rp | wc -l)" -ge 32 ]; do wait -n; done
done
wait
for ((j = 0; j < i; j++)); do
  while IFS= read -r line; do problem "$line"; done < "$TMP/$j"
done
if [ "$PROBLEMS" -gt 0 ]; then
  echo "check: $PROBLEMS problem(s); ${#HOSTS[@]} host(s) in $HOSTFILE"
  exit 1
fi
what=$([ "$SSH_ONLY" = 1 ] && echo "ssh" || echo "ssh, repository, .venv${SHARED:+, shared folders}${NETIF:+, interface $NETIF}")
echo "check: ${#HOSTS[@]} host(s) OK ($what)"
