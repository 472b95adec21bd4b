#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for bench/gpu_check.sh, fetched here into .whl/ (ignored
# by git) so that they travel with the working tree:
#
#   bash bench/gpu_wheels.sh              # here, once, with network (about 8 MB)
#   bash bench/gpu_check.sh               # there: installs .whl/*.whl into /tmp/site first
#
# The lent machines' image (Python 3.12, torch, triton, transformers, sentencepiece, ...) has
# neither DeepSpeed nor megatron-core, nor DeepSpeed's hjson and pydantic, and cannot reach a
# package index. DeepSpeed ships as source only: its wheel is built here without compiling any
# op (DS_BUILD_OPS=0, pure Python; DeepSpeed builds what it needs on the GPU machine at run
# time). The rest are PyPI's binary wheels for CPython 3.12 on x86-64 Linux, pinned to the
# versions this project's constraints file and CI use. PYTHON_VERSION overrides 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
pin() {  # the version constraints.txt pins, else the one installed here
  local v
  v=$(grep -i "^$1==" constraints.txt | head -1 | cut -d= -f3)
  [ -n "$v" ] || v=$(python -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: no version known for $1" >&2; exit 2; }
  echo "$1==$v"
}
if [ -z "${EMBER_NO_SETUP:-}" ] && [ -f launch/setup_env.sh ]; then
  # shellcheck disable=SC1091
  . launch/setup_env.sh > /dev/null   # the project's venv: torch for DeepSpeed's setup.py
fi
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" \
  "$(pin megatron-core)" "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" \
  "$(pin annotated-types)" "$(pin typing-inspection)"
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)"
ls -l "$DEST"
du -sh "$DEST"
