#!/usr/bin/env bash
# Source this: creates (once) and activates the project's virtual environment in .venv with the
# pinned versions of constraints.txt. Re-installs only when setup.py or constraints.txt change.
# Override the location with EMBER_VENV, the interpreter with PYTHON.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${EMBER_VENV:-$_root/.venv}"
_py="${PYTHON:-python3}"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $_venv"
  "$_py" -m venv "$_venv" || return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
_stamp="$_venv/.ember_stamp"
# the .pth of the zero-code hook is generated from ember_ds/_autoload.py at install time
_want="$(cat "$_root/setup.py" "$_root/constraints.txt" "$_root/ember_ds/_autoload.py" | sha256sum | cut -c1-16)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
  echo "[setup] installing pinned dependencies (about a minute on a fresh machine)"
  # DS_BUILD_OPS=0: DeepSpeed builds no C++/CUDA ops ahead of time (JIT where needed).
  DS_BUILD_OPS=0 python -m pip install -q --disable-pip-version-check \
      -c "$_root/constraints.txt" -e "$_root[test,plots]" \
    && echo "$_want" > "$_stamp" || { echo "[setup] install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
# Cache JIT-built extensions inside the venv so a second run does not rebuild them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_venv/torch_extensions}"
unset _root _venv _py _stamp _want
