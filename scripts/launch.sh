# Sourced by scripts/train.sh and scripts/finetune.sh: what launching a training stage has in common.
#
# Options shared by both scripts (each also readable from the environment variable in brackets):
#   --config FILE        the stage's config, YAML or TOML [CONFIG, default: the script's embedded default]
#   --hostfile FILE      one line per node, "<host> slots=<processes>" [HOSTFILE, default config/hostfile]
#   --num_nodes N        use the first N hosts of the hostfile [NUM_NODES, default all]
#   --num_gpus N         processes per node, overriding the hostfile's slots [NUM_GPUS]
#   --node_rank I        this node's line in the hostfile, 0-based [NODE_RANK, default 0]
#   --master_addr ADDR   address of node 0, reachable from every node [MASTER_ADDR, default 127.0.0.1]
#   --master_port PORT   [MASTER_PORT, default a free port on one node, 29500 on several]
#   --ssh                start all nodes from node 0 over ssh/pdsh instead of running the script on every node
#   --no_export          skip the Hugging Face export at the end
# Everything else (key=value) overrides the config.
#
# Without --ssh, every node runs the same script with its own --node_rank (DeepSpeed's --no_ssh mode, so no ssh is
# needed even on one box). Re-running the same command resumes from the latest checkpoint.
#
# Python: .venv in the repository (created, with torch pinned, on the first run), or the python3 that already has
# everything, or $LLAMA_PYTHON; see scripts/env.sh. Before launching, the stage's preflight module checks the
# hostfile, the batch arithmetic for the world size, the stage's inputs and the port, so a mistake ends in one line
# instead of inside the launched ranks.
#
# A script sets, before calling launch_parse "$@":
#   DEFAULT_CONFIG      its embedded default config
#   PREFLIGHT           the python module that checks the config before launching (pretrain.preflight, ...)
# and may define script_option: called with the remaining arguments for an option this file does not know; it sets
# CONSUMED to the number of arguments it took (0: not its option either).
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"  # the calling script, before the cd
cd "$ROOT"
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other work, spinning threads
# made CPU training ~30x slower (benchmarks/train.md); on GPUs it changes nothing.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

HOSTFILE="${HOSTFILE:-config/hostfile}"
NUM_NODES="${NUM_NODES:--1}"
NUM_GPUS="${NUM_GPUS:--1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-}"
SSH=0
EXPORT=1
OVERRIDES=()
CHECKED=""

die() { echo "error: $*" >&2; exit 2; }

launch_help() {  # the calling script's header, then the shared options above
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT"
    echo
    awk '/^# shellcheck/ { exit } /^#/ { sub(/^# ?/, ""); print }' "$ROOT/scripts/launch.sh" | sed -n '/^Options/,/^$/p'
}

launch_parse() {
    CONFIG="${CONFIG:-$DEFAULT_CONFIG}"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
            --hostfile) HOSTFILE="${2:?--hostfile needs a file}"; shift 2 ;;
            --num_nodes) NUM_NODES="${2:?}"; shift 2 ;;
            --num_gpus) NUM_GPUS="${2:?}"; shift 2 ;;
            --node_rank) NODE_RANK="${2:?}"; shift 2 ;;
            --master_addr) MASTER_ADDR="${2:?}"; shift 2 ;;
            --master_port) MASTER_PORT="${2:?}"; shift 2 ;;
            --ssh) SSH=1; shift ;;
            --no_export) EXPORT=0; shift ;;
            -h|--help) launch_help; exit 0 ;;
            --*)
                CONSUMED=0
                if declare -F script_option >/dev/null; then script_option "$@"; fi
                [[ "$CONSUMED" -gt 0 ]] || die "unknown option $1 (see $0 --help)"
                shift "$CONSUMED" ;;
            *=*) OVERRIDES+=("$1"); shift ;;
            *) die "unexpected argument '$1': options start with --, config overrides look like key=value" ;;
        esac
    done
    [[ -f "$CONFIG" ]] || die "$CONFIG: config file not found (--config)"

    # shellcheck source=scripts/env.sh
    source scripts/env.sh
    llama_env || exit 1
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    [[ -f "$HOSTFILE" ]] || die "$HOSTFILE: hostfile not found (--hostfile); write one line per node:" \
                                "'<host> slots=<n>'"
}

# What can be checked before launching (the config as the ranks will see it, the hostfile, batch arithmetic for the
# world size, the stage's inputs, the port) is checked here, in one line each, instead of inside the ranks after the
# launcher's start-up. The module prints KEY=value lines (read with `value KEY`), MASTER_PORT among them.
launch_preflight() {
    local args=(--config "$CONFIG" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS"
                --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    [[ -n "$MASTER_PORT" ]] && args+=(--master_port "$MASTER_PORT")
    CHECKED="$("$PYTHON" -m "$PREFLIGHT" "${args[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"})" || exit 2
}
value() { sed -n "s/^$1=//p" <<< "$CHECKED"; }

# Launch SCRIPT (pretrain/train.py, finetune/train.py) on every rank and turn its end into this script's exit:
# 0 finished or stopped cleanly, 2 a user error (the same command would stop the same way), 1 resumable, 130 Ctrl-C.
# Node 0 resolves MASTER_ADDR for the others; with --no_ssh each node starts its own ranks. The launcher logs
# warnings and errors only (LAUNCHER_LOG_LEVEL=info shows its commands and environment).
launch_stage() {
    local stage="$1" script="$2" run_dir="$3" port
    port="$(value MASTER_PORT)"
    local launch=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR"
                  --master_port "$port" --log_level "${LAUNCHER_LOG_LEVEL:-warning}")
    [[ "$NUM_NODES" != -1 ]] && launch+=(--num_nodes "$NUM_NODES")
    [[ "$NUM_GPUS" != -1 ]] && launch+=(--num_gpus "$NUM_GPUS")
    [[ "$SSH" == 0 ]] && launch+=(--no_ssh --node_rank "$NODE_RANK")
    echo "== $stage: deepspeed ${launch[*]:3} $script --config $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
    # Ctrl-C: the ranks catch it, finish their step, save and exit. The launcher processes ignore it (else each
    # prints a KeyboardInterrupt traceback), and ranks inherit that until the training script installs its own
    # handler, so a Ctrl-C during start-up ends them through the launcher's SIGTERM without a traceback.
    local status=0 interrupted=0 latest_before error_file
    latest_before="$(cat "$run_dir/latest" 2>/dev/null || true)"
    # A rank that stops on a user error writes its `error: ...` line here too (pretrain/train.py launched_main), so
    # that line can be the last one printed, after the launcher's own report of the rank's exit status.
    error_file="$(mktemp "${TMPDIR:-/tmp}/llama-error.XXXXXX")"
    export LLAMA_ERROR_FILE="$error_file"
    trap 'interrupted=1' INT
    ( trap '' INT; exec "${launch[@]}" "$script" --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ) || status=$?
    trap - INT
    local error_line=""
    error_line="$(head -n 1 "$error_file" 2>/dev/null || true)"
    rm -f "$error_file"
    if [[ "$interrupted" == 1 ]]; then
        # A stop always saves, and the ranks say so; an unchanged `latest` means they were still starting up.
        if [[ "$(cat "$run_dir/latest" 2>/dev/null || true)" == "$latest_before" ]]; then
            echo "interrupted (SIGINT) while the ranks were starting: nothing new to save; run the same command to" \
                 "start again" >&2
        fi
        exit 130
    elif [[ "$status" == 2 ]]; then  # the training script's USER_ERROR: bad config or data, or a diverged run
        if [[ -n "$error_line" ]]; then
            echo "$stage stopped on a mistake in its input; fix it first (the same command would stop the same" \
                 "way):" >&2
            echo "$error_line" >&2
        else
            echo "error: $stage stopped on the 'error:' line above; fix that first (the same command would stop" \
                 "the same way)" >&2
        fi
        exit 2
    elif [[ "$status" != 0 ]]; then
        echo "$stage did not finish (exit status $status); once the cause above is dealt with, run the same" \
             "command again to resume from the latest checkpoint" >&2
        exit 1
    fi
    # Only node 0 goes on (export, summary); a run stopped early by a signal saved and says how to go on.
    [[ "$NODE_RANK" == 0 ]] || exit 0
    if [[ "$(cat "$run_dir/latest" 2>/dev/null)" != "$(printf 'step_%06d' "$(value MAX_STEPS)")" ]]; then
        echo "$stage stopped before step $(value MAX_STEPS); run the same command again to resume"
        exit 1
    fi
}

launch_loss_summary() {  # first and last train / validation loss of the run directory $1
    "$PYTHON" - "$1" <<'EOF'
import sys
from pretrain.metrics import read_metrics
rows = read_metrics(sys.argv[1])
train = [r for r in rows if r.get("loss") is not None]
val = [r for r in rows if "val_loss" in r]
if train:
    print(f"train loss: {train[0]['loss']:.3f} at step {train[0]['step']} -> {train[-1]['loss']:.3f} at step "
          f"{train[-1]['step']}")
if val:
    print(f"validation loss: {val[0]['val_loss']:.3f} at step {val[0]['step']} -> {val[-1]['val_loss']:.3f} at "
          f"step {val[-1]['step']}")
EOF
}
