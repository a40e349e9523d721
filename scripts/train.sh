#!/usr/bin/env bash
# Pretrain end to end with DeepSpeed: tokenizer -> token shards -> training -> Hugging Face export.
#
#   scripts/train.sh                                    # the embedded default: debug model on data/sample, CPU OK
#   scripts/train.sh --config config/1b.yaml lr=2e-4    # your config, with key=value overrides
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/train.sh --config config/7b.yaml --hostfile my_hosts
#
# Options of this script (the shared ones, --config --hostfile --num_nodes --num_gpus --node_rank --master_addr
# --master_port --ssh --no_export, are in scripts/launch.sh and listed by --help):
#   --corpus PATHS       raw text to prepare when data_dir holds no prepared data yet [CORPUS]; without it only the
#                        embedded default's data_dir (runs/sample/data) is prepared, from data/sample
#   --vocab_size N       vocabulary of the tokenizer trained on the corpus [VOCAB_SIZE, default 1024]
# Everything else (key=value) overrides the training config; see pretrain/config.py for the keys.
set -euo pipefail

# The embedded default: this config and data_dir; only it falls back to the shipped sample corpus.
DEFAULT_CONFIG=config/debug.yaml
DEFAULT_DATA_DIR=runs/sample/data
SAMPLE_CORPUS=data/sample
PREFLIGHT=pretrain.preflight
CORPUS="${CORPUS:-}"
VOCAB_SIZE="${VOCAB_SIZE:-1024}"
script_option() {
    case "$1" in
        --corpus) CORPUS="${2:?--corpus needs paths}"; CONSUMED=2 ;;
        --vocab_size) VOCAB_SIZE="${2:?}"; CONSUMED=2 ;;
    esac
}
# shellcheck source=scripts/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch_parse "$@"
launch_preflight
DATA_DIR="$(value DATA_DIR)"
RUN_DIR="$(value RUN_DIR)"
TOKENIZER="$(value TOKENIZER)"
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

# Data made just now: check it against the tokenizer too (and choose the port again).
if [[ "$PREPARED_NOW" == 1 ]]; then launch_preflight; fi

# 3. Pretraining (scripts/launch.sh: the launcher, Ctrl-C, exit status; only node 0 goes on).
launch_stage pretraining pretrain/train.py "$RUN_DIR"

# 4. Hugging Face export of the final checkpoint.
HF_DIR="$RUN_DIR/hf"
if [[ "$EXPORT" == 1 ]]; then
    echo "== exporting to $HF_DIR"
    "$PYTHON" -m pretrain.export --model "$RUN_DIR" --output_dir "$HF_DIR" --overwrite
fi

# 5. Where everything is.
launch_loss_summary "$RUN_DIR"
cat <<EOF
data:        $DATA_DIR
run dir:     $RUN_DIR  (checkpoints $(cat "$RUN_DIR/latest"), run_config.yaml, model_config.json, tokenizer.model)
metrics:     $RUN_DIR/metrics.jsonl, loss curve $RUN_DIR/loss_curve.png
tensorboard: tensorboard --logdir $RUN_DIR/tensorboard
EOF
[[ "$EXPORT" == 1 ]] && echo "HF model:    $HF_DIR  (transformers.AutoModelForCausalLM.from_pretrained(\"$HF_DIR\"))"
exit 0
