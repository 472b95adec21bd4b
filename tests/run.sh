#!/usr/bin/env bash
# The project's test command: sets up the pinned environment, then runs the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup_env.sh
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q -ra tests "$@"
