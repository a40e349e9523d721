#!/usr/bin/env bash
# Run a command in the environment scripts/train.sh and scripts/test.sh use: scripts/env.sh finds it the same way
# (and installs what is missing), and the repository is importable from any folder.
#
#   scripts/run.sh python -m inference.generate --model runs/sample/train/hf --prompt "今天早上，"
#   scripts/run.sh tensorboard --logdir runs/sample/train/tensorboard
#
# `python` (or `python3`) as the command is that environment's interpreter; any other command is looked up on the
# PATH with the environment's bin folder first. Paths in the arguments are relative to the folder you run it from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# == 0 ]]; then
    echo "error: no command given; e.g. scripts/run.sh python -m inference.chat --model DIR (see --help)" >&2
    exit 2
fi
if [[ "$1" == -h || "$1" == --help ]]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
fi
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
llama_env
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$1" == python || "$1" == python3 ]]; then
    shift
    exec "$PYTHON" "$@"
fi
exec "$@"
