#!/usr/bin/env bash
# Pretrain end to end with DeepSpeed: tokenizer -> token shards -> training -> Hugging Face export.
#
#   scripts/train.sh                                    # the embedded default: debug model on data/sample, CPU OK
#   scripts/train.sh --config config/1b.yaml lr=2e-4    # your config, with key=value overrides
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/train.sh --config config/7b.yaml --hostfile my_hosts
#
# Options (each also readable from the environment variable in brackets):
#   --config FILE        training config, YAML or TOML [CONFIG, default config/debug.yaml]
#   --hostfile FILE      one line per node, "<host> slots=<processes>" [HOSTFILE, default config/hostfile]
#   --num_nodes N        use the first N hosts of the hostfile [NUM_NODES, default all]
#   --num_gpus N         processes per node, overriding the hostfile's slots [NUM_GPUS]
#   --node_rank I        this node's line in the hostfile, 0-based [NODE_RANK, default 0]
#   --master_addr ADDR   address of node 0, reachable from every node [MASTER_ADDR, default 127.0.0.1]
#   --master_port PORT   [MASTER_PORT, default a free port on one node, 29500 on several]
#   --ssh                start all nodes from node 0 over ssh/pdsh instead of running this script on every node
#   --corpus PATHS       raw text to prepare when data_dir holds no prepared data yet [CORPUS]; without it only the
#                        embedded default's data_dir (runs/sample/data) is prepared, from data/sample
#   --vocab_size N       vocabulary of the tokenizer trained on the corpus [VOCAB_SIZE, default 1024]
#   --no_export          skip the Hugging Face export at the end
# Everything else (key=value) overrides the training config; see pretrain/config.py for the keys.
#
# Without --ssh, every node runs this same script with its own --node_rank (that is DeepSpeed's --no_ssh mode, so
# no ssh is needed even on one box). Re-running the same command resumes from the latest checkpoint.
#
# Python: .venv in the repository (created, with torch pinned, on the first run), or the python3 that already has
# everything, or $LLAMA_PYTHON; see scripts/env.sh. Before launching, `python -m pretrain.preflight` checks the
# hostfile, the batch arithmetic for the world size, the data against the tokenizer and the port, so a mistake
# ends in one line instead of inside the launched ranks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other work, spinning threads
# made CPU training ~30x slower (benchmarks/train.md); on GPUs it changes nothing.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

CONFIG="${CONFIG:-config/debug.yaml}"
HOSTFILE="${HOSTFILE:-config/hostfile}"
NUM_NODES="${NUM_NODES:--1}"
NUM_GPUS="${NUM_GPUS:--1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-}"
CORPUS="${CORPUS:-}"
VOCAB_SIZE="${VOCAB_SIZE:-1024}"
SSH=0
EXPORT=1
OVERRIDES=()

die() { echo "error: $*" >&2; exit 2; }
# The embedded default: this config and data_dir; only it falls back to the shipped sample corpus.
DEFAULT_CONFIG=config/debug.yaml
DEFAULT_DATA_DIR=runs/sample/data
SAMPLE_CORPUS=data/sample
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --hostfile) HOSTFILE="${2:?--hostfile needs a file}"; shift 2 ;;
        --num_nodes) NUM_NODES="${2:?}"; shift 2 ;;
        --num_gpus) NUM_GPUS="${2:?}"; shift 2 ;;
        --node_rank) NODE_RANK="${2:?}"; shift 2 ;;
        --master_addr) MASTER_ADDR="${2:?}"; shift 2 ;;
        --master_port) MASTER_PORT="${2:?}"; shift 2 ;;
        --corpus) CORPUS="${2:?}"; shift 2 ;;
        --vocab_size) VOCAB_SIZE="${2:?}"; shift 2 ;;
        --ssh) SSH=1; shift ;;
        --no_export) EXPORT=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --*) die "unknown option $1 (see scripts/train.sh --help)" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unexpected argument '$1': options start with --, config overrides look like key=value" ;;
    esac
done
[[ -f "$CONFIG" ]] || die "$CONFIG: config file not found (--config)"

# shellcheck source=scripts/env.sh
source scripts/env.sh
llama_env || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -f "$HOSTFILE" ]] || die "$HOSTFILE: hostfile not found (--hostfile); write one line per node: '<host> slots=<n>'"

# What can be checked before launching (the config as train.py will see it, the hostfile, batch arithmetic for the
# world size, data vs tokenizer, the port) is checked here, in one line each, instead of inside the ranks after the
# launcher's start-up. It also prints the resolved config values this script needs.
preflight() {
    local args=(--config "$CONFIG" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS"
                --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    [[ -n "$MASTER_PORT" ]] && args+=(--master_port "$MASTER_PORT")
    "$PYTHON" -m pretrain.preflight "${args[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}
value() { sed -n "s/^$1=//p" <<< "$CHECKED"; }
CHECKED="$(preflight)" || exit 2
DATA_DIR="$(value DATA_DIR)"
RUN_DIR="$(value RUN_DIR)"
TOKENIZER="$(value TOKENIZER)"
MAX_STEPS="$(value MAX_STEPS)"
PREPARED_NOW=0

# 1-2. Tokenizer and token shards, only when the data directory is not prepared yet (node 0 does it).
if [[ ! -f "$DATA_DIR/manifest.json" ]]; then
    if [[ "$NODE_RANK" != 0 ]]; then
        echo "node $NODE_RANK: waiting for node 0 to prepare $DATA_DIR ..."
        until [[ -f "$DATA_DIR/manifest.json" ]]; do sleep 10; done
        PREPARED_NOW=1
    else
        if [[ -z "$CORPUS" ]]; then
            if [[ "$CONFIG" == "$DEFAULT_CONFIG" && "$DATA_DIR" == "$DEFAULT_DATA_DIR" ]]; then
                CORPUS="$SAMPLE_CORPUS"
            else
                die "$DATA_DIR holds no prepared data (no manifest.json): is data_dir right? Prepare it with" \
                    "python -m pretrain.prepare_data --output_dir $DATA_DIR ..., or pass --corpus PATHS to have" \
                    "this script prepare it"
            fi
        fi
        if [[ -z "$TOKENIZER" ]]; then
            TOKENIZER="$(dirname "$DATA_DIR")/tokenizer/tokenizer.model"
            if [[ ! -f "$TOKENIZER" ]]; then
                echo "== training a $VOCAB_SIZE-token tokenizer on $CORPUS"
                # shellcheck disable=SC2086  # CORPUS may list several paths
                "$PYTHON" -m tokenizer.train --input $CORPUS --output_dir "$(dirname "$TOKENIZER")" \
                    --vocab_size "$VOCAB_SIZE" --quiet
            fi
        fi
        PREPARED_NOW=1
        echo "== preparing token shards from $CORPUS into $DATA_DIR"
        # shellcheck disable=SC2086
        "$PYTHON" -m pretrain.prepare_data --tokenizer "$TOKENIZER" --input $CORPUS --output_dir "$DATA_DIR" \
            --val_fraction 0.02
    fi
fi

# Data made just now: check it against the tokenizer too. The port is the one preflight chose (or checked).
if [[ "$PREPARED_NOW" == 1 ]]; then CHECKED="$(preflight)" || exit 2; fi
MASTER_PORT="$(value MASTER_PORT)"

# 3. Pretraining. Node 0 resolves MASTER_ADDR for the others; with --no_ssh each node starts its own ranks.
# The launcher logs warnings and errors only (LAUNCHER_LOG_LEVEL=info shows its commands and environment).
LAUNCH=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR"
        --master_port "$MASTER_PORT" --log_level "${LAUNCHER_LOG_LEVEL:-warning}")
[[ "$NUM_NODES" != -1 ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
[[ "$NUM_GPUS" != -1 ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")
[[ "$SSH" == 0 ]] && LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
echo "== pretraining: deepspeed ${LAUNCH[*]:3} pretrain/train.py --config $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
# Ctrl-C: the ranks catch it, finish their step, save and exit. The launcher processes ignore it (else each prints
# a KeyboardInterrupt traceback), and ranks inherit that until pretrain/train.py installs its own handler, so a
# Ctrl-C during start-up ends them through the launcher's SIGTERM without a traceback.
status=0
INTERRUPTED=0
LATEST_BEFORE="$(cat "$RUN_DIR/latest" 2>/dev/null || true)"
trap 'INTERRUPTED=1' INT
( trap '' INT; exec "${LAUNCH[@]}" pretrain/train.py --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ) || status=$?
trap - INT
if [[ "$INTERRUPTED" == 1 ]]; then
    # A stop always saves, and the ranks say so; an unchanged `latest` means they were still starting up.
    if [[ "$(cat "$RUN_DIR/latest" 2>/dev/null || true)" == "$LATEST_BEFORE" ]]; then
        echo "interrupted (SIGINT) while the ranks were starting: nothing new to save; run the same command to" \
             "start again" >&2
    fi
    exit 130
elif [[ "$status" == 2 ]]; then  # pretrain/train.py's USER_ERROR: bad config or data, or a diverged run
    echo "error: training stopped on the 'error:' line above; fix that first (the same command would stop the" \
         "same way)" >&2
    exit 2
elif [[ "$status" != 0 ]]; then
    echo "training did not finish (exit status $status); once the cause above is dealt with, run the same command" \
         "again to resume from the latest checkpoint" >&2
    exit 1
fi

[[ "$NODE_RANK" == 0 ]] || exit 0
if [[ "$(cat "$RUN_DIR/latest" 2>/dev/null)" != "$(printf 'step_%06d' "$MAX_STEPS")" ]]; then
    echo "training stopped before step $MAX_STEPS; run the same command again to resume"
    exit 1
fi

# 4. Hugging Face export of the final checkpoint.
HF_DIR="$RUN_DIR/hf"
if [[ "$EXPORT" == 1 ]]; then
    echo "== exporting to $HF_DIR"
    "$PYTHON" -m pretrain.export --model "$RUN_DIR" --output_dir "$HF_DIR" --overwrite
fi

# 5. Where everything is.
"$PYTHON" - "$RUN_DIR" <<'EOF'
import sys
from pretrain.metrics import read_metrics
rows = read_metrics(sys.argv[1])
train = [r for r in rows if r.get("loss") is not None]
val = [r for r in rows if "val_loss" in r]
if train:
    print(f"train loss: {train[0]['loss']:.3f} at step {train[0]['step']} -> {train[-1]['loss']:.3f} at step {train[-1]['step']}")
if val:
    print(f"validation loss: {val[0]['val_loss']:.3f} at step {val[0]['step']} -> {val[-1]['val_loss']:.3f} at step {val[-1]['step']}")
EOF
cat <<EOF
data:        $DATA_DIR
run dir:     $RUN_DIR  (checkpoints $(cat "$RUN_DIR/latest"), run_config.yaml, model_config.json, tokenizer.model)
metrics:     $RUN_DIR/metrics.jsonl, loss curve $RUN_DIR/loss_curve.png
tensorboard: tensorboard --logdir $RUN_DIR/tensorboard
EOF
[[ "$EXPORT" == 1 ]] && echo "HF model:    $HF_DIR  (transformers.AutoModelForCausalLM.from_pretrained(\"$HF_DIR\"))"
exit 0
