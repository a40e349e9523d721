#!/usr/bin/env bash
# Run the test suite, installing what is missing first (see scripts/env.sh for which Python it uses).
#
#   scripts/test.sh              # everything (what CI runs)
#   scripts/test.sh --fast       # skip the tests marked slow (DeepSpeed launches, multi-process runs)
#   scripts/test.sh [--fast] [pytest arguments ...]   e.g. scripts/test.sh tests/test_model.py -k rope
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/env.sh
source scripts/env.sh
llama_env
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Sleeping, not spinning, OpenMP threads: the tests start several processes on a few shared cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
ARGS=()
for arg in "$@"; do
    if [[ "$arg" == --fast ]]; then ARGS+=(-m "not slow"); else ARGS+=("$arg"); fi
done
# No test paths given: the whole tests/ folder.
if ! printf '%s\n' ${ARGS[@]+"${ARGS[@]}"} | grep -qE '^tests(/|$)|\.py(::|$)'; then
    ARGS+=(tests)
fi
exec "$PYTHON" -m pytest -q ${ARGS[@]+"${ARGS[@]}"}
