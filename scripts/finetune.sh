#!/usr/bin/env bash
# Instruction fine-tuning end to end with DeepSpeed: (pretraining if needed) -> fine-tuning -> Hugging Face export.
#
#   scripts/finetune.sh                                        # the embedded default: the debug model that
#                                                              # scripts/train.sh pretrains, on data/sft_sample
#   scripts/finetune.sh --config config/finetune_7b.yaml lr=1e-5 template=vicuna
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/finetune.sh --config config/finetune_7b.yaml --hostfile my_hosts
#
# Options (each also readable from the environment variable in brackets); the same as scripts/train.sh's:
#   --config FILE        fine-tuning config, YAML or TOML [CONFIG, default config/finetune_debug.yaml]
#   --hostfile FILE      one line per node, "<host> slots=<processes>" [HOSTFILE, default config/hostfile]
#   --num_nodes N        use the first N hosts of the hostfile [NUM_NODES, default all]
#   --num_gpus N         processes per node, overriding the hostfile's slots [NUM_GPUS]
#   --node_rank I        this node's line in the hostfile, 0-based [NODE_RANK, default 0]
#   --master_addr ADDR   address of node 0, reachable from every node [MASTER_ADDR, default 127.0.0.1]
#   --master_port PORT   [MASTER_PORT, default 29500]
#   --ssh                start all nodes from node 0 over ssh/pdsh instead of running this script on every node
#   --no_export          skip the Hugging Face export at the end
# Everything else (key=value) overrides the fine-tuning config; see finetune/config.py for the keys.
#
# When model_path is the embedded pretraining run (runs/sample/train) and it has no checkpoint yet,
# scripts/train.sh runs first. Re-running the same command resumes from the latest checkpoint.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # see scripts/train.sh
PYTHON="${PYTHON:-python}"

CONFIG="${CONFIG:-config/finetune_debug.yaml}"
HOSTFILE="${HOSTFILE:-config/hostfile}"
NUM_NODES="${NUM_NODES:--1}"
NUM_GPUS="${NUM_GPUS:--1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
SSH=0
EXPORT=1
OVERRIDES=()

die() { echo "error: $*" >&2; exit 2; }
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
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --*) die "unknown option $1 (see scripts/finetune.sh --help)" ;;
        *=*) OVERRIDES+=("$1"); shift ;;
        *) die "unexpected argument '$1': options start with --, config overrides look like key=value" ;;
    esac
done
[[ -f "$CONFIG" ]] || die "$CONFIG: config file not found (--config)"
[[ -f "$HOSTFILE" ]] || die "$HOSTFILE: hostfile not found (--hostfile); write one line per node: '<host> slots=<n>'"

# Resolve (and validate) the config once, exactly as finetune/train.py will see it.
get() { "$PYTHON" -m finetune.config --config "$CONFIG" --get "$1" ${OVERRIDES[@]+"${OVERRIDES[@]}"}; }
RUN_DIR="$(get run_dir)" || exit 2
MODEL_PATH="$(get model_path)"
MAX_STEPS="$(get max_steps)"

# 1. The model to tune. The embedded default starts from the sample pretraining run: make it when it is missing.
if [[ ! -f "$MODEL_PATH/latest" && ! -f "$MODEL_PATH/config.json" ]]; then
    if [[ "$MODEL_PATH" == "runs/sample/train" ]]; then
        if [[ "$NODE_RANK" != 0 ]]; then
            echo "node $NODE_RANK: waiting for node 0 to pretrain $MODEL_PATH ..."
            until [[ -f "$MODEL_PATH/latest" ]]; do sleep 10; done
        else
            echo "== $MODEL_PATH has no model yet: pretraining it first (scripts/train.sh)"
            scripts/train.sh --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
                --no_export
        fi
    else
        die "$MODEL_PATH: neither a Hugging Face folder (config.json) nor a training run directory (latest); set model_path"
    fi
fi

# 2. Fine-tuning. The same launcher as pretraining; with --no_ssh each node starts its own ranks.
LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[[ "$NUM_NODES" != -1 ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
[[ "$NUM_GPUS" != -1 ]] && LAUNCH+=(--num_gpus "$NUM_GPUS")
[[ "$SSH" == 0 ]] && LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
echo "== fine-tuning: ${LAUNCH[*]} finetune/train.py --config $CONFIG ${OVERRIDES[*]+${OVERRIDES[*]}}"
if ! "${LAUNCH[@]}" finetune/train.py --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}; then
    echo "fine-tuning did not finish; fix what the log says (if anything) and run the same command again to resume" >&2
    exit 1
fi

[[ "$NODE_RANK" == 0 ]] || exit 0
if [[ "$(cat "$RUN_DIR/latest" 2>/dev/null)" != "$(printf 'step_%06d' "$MAX_STEPS")" ]]; then
    echo "fine-tuning stopped before step $MAX_STEPS; run the same command again to resume"
    exit 1
fi

# 3. Hugging Face export of the final checkpoint, chat template included.
HF_DIR="$RUN_DIR/hf"
if [[ "$EXPORT" == 1 ]]; then
    echo "== exporting to $HF_DIR"
    "$PYTHON" -m finetune.export --run_dir "$RUN_DIR" --output_dir "$HF_DIR" --overwrite
fi

# 4. Where everything is.
"$PYTHON" - "$RUN_DIR" <<'PY'
import sys
from pretrain.metrics import read_metrics
rows = read_metrics(sys.argv[1])
train = [r for r in rows if r.get("loss") is not None]
val = [r for r in rows if "val_loss" in r]
if train:
    print(f"train loss: {train[0]['loss']:.3f} at step {train[0]['step']} -> {train[-1]['loss']:.3f} at step {train[-1]['step']}")
if val:
    print(f"validation loss: {val[0]['val_loss']:.3f} at step {val[0]['step']} -> {val[-1]['val_loss']:.3f} at step {val[-1]['step']}")
PY
cat <<EOF
base model:  $MODEL_PATH
run dir:     $RUN_DIR  (checkpoints $(cat "$RUN_DIR/latest"), run_config.yaml, chat_template.jinja, tokenizer.model)
metrics:     $RUN_DIR/metrics.jsonl, loss curve $RUN_DIR/loss_curve.png
tensorboard: tensorboard --logdir $RUN_DIR/tensorboard
EOF
if [[ "$EXPORT" == 1 ]]; then
    echo "HF model:    $HF_DIR  (chat_template in tokenizer_config.json; tokenizer.apply_chat_template works)"
    echo "answers:     python -m finetune.generate --model $HF_DIR --input data/sft_sample/prompts.json --output $RUN_DIR/answers.jsonl"
fi
exit 0
