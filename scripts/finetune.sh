#!/usr/bin/env bash
# Instruction fine-tuning end to end with DeepSpeed: (pretraining if needed) -> fine-tuning -> Hugging Face export.
#
#   scripts/finetune.sh                                        # the embedded default: the debug model that
#                                                              # scripts/train.sh pretrains, on data/sft_sample
#   scripts/finetune.sh --config config/finetune_lora_debug.yaml   # the same with LoRA: adapter + merged folder
#   scripts/finetune.sh --config config/finetune_7b.yaml lr=1e-5 template=vicuna
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/finetune.sh --config config/finetune_7b.yaml --hostfile my_hosts
#
# The options are scripts/train.sh's shared ones (scripts/launch.sh; listed by --help); key=value overrides the
# fine-tuning config, see finetune/config.py for the keys.
#
# When model_path is the embedded pretraining run (runs/sample/train) and it has no checkpoint yet,
# scripts/train.sh runs first. Re-running the same command resumes from the latest checkpoint.
set -euo pipefail

DEFAULT_CONFIG=config/finetune_debug.yaml
PREFLIGHT=finetune.preflight
# shellcheck source=scripts/launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch_parse "$@"
launch_preflight
RUN_DIR="$(value RUN_DIR)"
MODEL_PATH="$(value MODEL_PATH)"
FINETUNING_TYPE="$(value FINETUNING_TYPE)"

# 1. The model to tune. The embedded default starts from the sample pretraining run: make it when it is missing
# (preflight refused a missing model_path other than that one).
if [[ "$(value MODEL_MISSING)" == 1 ]]; then
    if [[ "$NODE_RANK" != 0 ]]; then
        echo "node $NODE_RANK: waiting for node 0 to pretrain $MODEL_PATH ..."
        until [[ -f "$MODEL_PATH/latest" ]]; do sleep 10; done
    else
        echo "== $MODEL_PATH has no model yet: pretraining it first (scripts/train.sh)"
        # Its own port: the one chosen above stays free for the fine-tuning ranks.
        MASTER_PORT="" scripts/train.sh --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --no_export
    fi
    launch_preflight  # again, now that the model exists: a port that is still free
fi

# 2. Fine-tuning (scripts/launch.sh: the launcher, Ctrl-C, exit status; only node 0 goes on).
launch_stage fine-tuning finetune/train.py "$RUN_DIR"

# 3. Hugging Face export of the final checkpoint, chat template included; a LoRA run also writes its PEFT adapter
# (hf/adapter) beside the merged model (hf/merged).
HF_DIR="$RUN_DIR/hf"
if [[ "$EXPORT" == 1 ]]; then
    echo "== exporting to $HF_DIR"
    "$PYTHON" -m finetune.export --model "$RUN_DIR" --output_dir "$HF_DIR" --overwrite
fi

# 4. Where everything is.
launch_loss_summary "$RUN_DIR"
cat <<EOF
base model:  $MODEL_PATH
run dir:     $RUN_DIR  (checkpoints $(cat "$RUN_DIR/latest"), run_config.yaml, chat_template.jinja, tokenizer.model)
metrics:     $RUN_DIR/metrics.jsonl, loss curve $RUN_DIR/loss_curve.png
tensorboard: tensorboard --logdir $RUN_DIR/tensorboard
EOF
if [[ "$EXPORT" == 1 ]]; then
    MODEL_DIR="$HF_DIR"
    if [[ "$FINETUNING_TYPE" == lora ]]; then
        MODEL_DIR="$HF_DIR/merged"
        BASE_HF="$(sed -n 's/.*"base_model_name_or_path": "\(.*\)".*/\1/p' "$HF_DIR/adapter/adapter_config.json")"
        echo "adapter:     $HF_DIR/adapter  (PEFT format; its base: $BASE_HF)"
    fi
    echo "HF model:    $MODEL_DIR  (chat_template in tokenizer_config.json; tokenizer.apply_chat_template works)"
    echo "answers:     python -m finetune.generate --model $MODEL_DIR --input data/sft_sample/prompts.json" \
         "--output $RUN_DIR/answers.jsonl"
fi
exit 0
