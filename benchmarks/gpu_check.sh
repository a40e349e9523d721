#!/usr/bin/env bash
# One-shot GPU validation and speed check (issue 16), sized for ~8 minutes on one H100/H200 with no internet.
#
#   bash benchmarks/gpu_check.sh OUT_DIR                 # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh /tmp/o  # dry run on a CPU: tiny shapes, same steps and files
#
# Steps (each under its own timeout; a failing step is logged and the next one runs):
#   1. install the wheels in .whl/ (DeepSpeed and its missing dependencies) into /tmp/site; versions, nvidia-smi
#   2. token shards from data/sample; the debug model's fp32 DeepSpeed run on the CPU starts in the background
#   3. GPU tests: tests/test_gpu.py (attention kernels vs eager fp32 with document masking, loss, compile, export)
#   4. the same debug run in bf16 on the GPU: loss curves compared (with the CPU run and the committed
#      benchmarks/gpu_reference_loss.json); the bf16 checkpoint exported to HF, logits compared under transformers
#   5. benchmarks/bench_model.py --preset 1b --seq_len 4096 --dtype bf16: ours, ours+compile, transformers (sdpa),
#      ours and transformers with cuDNN attention, ours with FlexAttention
#   6. pretrain/train.py on the 1B config: ZeRO-1 bf16, activation checkpointing off and on (tokens/s, MFU)
#   7. optional variants while time is left (bench at batch 2, quantized linears, the inference engine in bf16,
#      training with FlexAttention, train.py compile=true)
# Output: OUT_DIR/summary.md (the table), OUT_DIR/gpu_check.log (everything printed), OUT_DIR/logs.tar.gz (each
# step's log, metrics.jsonl of each run, JSON figures), OUT_DIR/results.json.
set -u
OUT="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DRY="${GPU_CHECK_DRY:-0}"
PYTHON="${PYTHON:-python3}"
# Seconds: optional variants start only while BUDGET is not used up; every step's timeout is cut so that the whole
# script ends by HARD. A dry run on a small shared CPU is slower than the GPU run, so it gets more.
if [[ "$DRY" == 1 ]]; then BUDGET="${GPU_CHECK_BUDGET:-1100}" HARD="${GPU_CHECK_HARD:-1200}"
else BUDGET="${GPU_CHECK_BUDGET:-420}" HARD="${GPU_CHECK_HARD:-480}"; fi
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check}"
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$SECONDS

finish() {
    "$PYTHON" benchmarks/gpu_report.py summary --work "$WORK" --out "$OUT/summary.md" > /dev/null 2>&1 ||
        echo "summary failed"
    cp "$OUT/summary.md" "$WORK/" 2>/dev/null
    # metrics and logs only: checkpoints and exported weights stay behind
    (cd "$WORK" && tar czf "$OUT/logs.tar.gz" --exclude='*/step_*' --exclude='*/hf' --exclude='*/data' \
        --exclude='*/tok' --exclude=./site_dry --exclude='*/tensorboard' --exclude='*.pt' --exclude='*.safetensors' \
        . 2>/dev/null)
    "$PYTHON" - "$WORK" "$OUT/results.json" <<'EOF' 2>/dev/null
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
res = {p.name: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
steps = work / "steps.tsv"
res["steps"] = [line.split("\t") for line in steps.read_text().splitlines()] if steps.exists() else []
Path(sys.argv[2]).write_text(json.dumps(res, indent=1))
EOF
    echo
    sed -n '/^## Steps/,$p' "$OUT/summary.md" 2>/dev/null | grep -v '^| install' | cut -c1-400  # the tool shows the end
    echo "== done in $((SECONDS - START)) s; summary: $OUT/summary.md"
}
trap finish EXIT

# step NAME TIMEOUT CMD...: run CMD under timeout, log to $WORK/NAME.log and the console, record exit and time.
step() {
    local name="$1" limit="$2"; shift 2
    local rem=$((HARD - (SECONDS - START) - 10))  # leave ~10 s for the summary
    if (( rem < 20 )); then skip "$name" "hard time limit (${HARD}s) reached"; return 0; fi
    (( limit > rem )) && limit=$rem
    echo
    echo "== [$((SECONDS - START)) s] $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    local cmd="$*"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "${cmd//$'\n'/ }" >> "$WORK/steps.tsv"
    [[ $rc == 0 ]] || echo "== $name FAILED (exit $rc), going on"
    return 0
}
skip() { printf '%s\tskip\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"; echo "== skipped $1: $2"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# --------------------------------------------------------------------------------------------------------------
# 1. Environment
if [[ "$DRY" == 1 ]]; then
    DEV=cpu
    # The wheels are cp312; check that they install into a throwaway target with a 3.12 interpreter if one is here.
    PY312="${PY312:-$(command -v python3.12 || true)}"
    if ls .whl/*.whl > /dev/null 2>&1 && [[ -n "$PY312" ]] && "$PY312" -V > /dev/null 2>&1; then
        step install 120 "$PY312" -m pip install -q --no-index --no-deps --no-compile --upgrade \
            --target "$WORK/site_dry" .whl/*.whl
    else
        skip install "dry run: no .whl/ or no python3.12"
    fi
    export PYTHONPATH="$ROOT"
else
    DEV=cuda
    if ls .whl/*.whl > /dev/null 2>&1; then
        step install 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
            .whl/*.whl
    else
        skip install "no .whl/ folder: carry it (see benchmarks/gpu.md)"
    fi
    export PYTHONPATH="/tmp/site:$ROOT"
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname), $(nproc) CPUs, dry run: $DRY"
    "$PYTHON" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs,",
          "capability", f"{p.major}.{p.minor}")
for name in ("transformers", "deepspeed", "pydantic", "triton", "flash_attn", "xformers", "sentencepiece"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report anything, this is a probe
        print(name, "NOT AVAILABLE:", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
EOF
    echo "flash-attn: PyPI has only an sdist (needs nvcc and ~1 h to build); xformers 0.0.35 wheels are built for"
    echo "  torch 2.10.0+cu128 (libcudart.so.12), not this torch: attention runs on torch's own SDPA (flash/cuDNN)."
    command -v nvidia-smi > /dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
} 2>&1 | tee "$WORK/env.txt"
command -v nvidia-smi > /dev/null && nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1

# --------------------------------------------------------------------------------------------------------------
# 2. Token shards; the fp32 CPU run of the debug model starts in the background (compared in step 4)
DATA="$WORK/data"
# The tests' recipe: a 1024-token SentencePiece tokenizer trained on data/sample, then token shards.
step data 120 "$PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from fixtures_train import prepare_sample_data; print(prepare_sample_data(Path('$WORK')))"
DEBUG_STEPS=60; [[ "$DRY" == 1 ]] && DEBUG_STEPS=6
DEBUG_ARGS=(--config config/debug.yaml "data_dir=$DATA" "max_steps=$DEBUG_STEPS" log_interval=1 eval_interval=0
            save_interval=0 seq_len=128 micro_batch_size=4 global_batch_size=8 warmup_steps=10
            tensorboard=false wandb_mode=disabled)
dist_env() { echo "RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$1"; }
# The fp32 CPU run goes in the background while the GPU runs its bf16 twin.
(env $(dist_env 29611) CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=4 \
    timeout 240 "$PYTHON" -m pretrain.train "${DEBUG_ARGS[@]}" "run_dir=$WORK/train_debug_fp32_cpu" precision=fp32 \
    > "$WORK/train_debug_fp32_cpu.log" 2>&1; echo $? > "$WORK/train_debug_fp32_cpu.rc") &
CPU_RUN=$!

# --------------------------------------------------------------------------------------------------------------
# 3. GPU tests (while the fp32 CPU run goes on)
if [[ "$DRY" == 1 ]]; then
    GPU_TEST_DEVICE=cpu step tests 300 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py \
        -k "document_masking and sdpa or export_parity"
else
    step tests 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
fi
grep -E "passed|failed|error|SKIPPED" "$WORK/tests.log" > "$WORK/pytest_summary.txt" 2>/dev/null

# --------------------------------------------------------------------------------------------------------------
# 4. bf16 GPU twin of the debug run, loss curves compared; its checkpoint exported, logits compared
if [[ "$DRY" == 1 ]]; then DBG_ENV=CUDA_VISIBLE_DEVICES= DBG_PREC=fp32; else DBG_ENV=GPU_CHECK=1 DBG_PREC=bf16; fi
step train_debug_bf16 180 env $(dist_env 29612) "$DBG_ENV" "$PYTHON" -m pretrain.train "${DEBUG_ARGS[@]}" \
    "run_dir=$WORK/train_debug_bf16" "precision=$DBG_PREC"
wait $CPU_RUN
printf '%s\t%s\t%s\t%s\n' train_debug_fp32_cpu "$(cat "$WORK/train_debug_fp32_cpu.rc" 2>/dev/null || echo '?')" \
    "-" "pretrain.train ${DEBUG_ARGS[*]} precision=fp32 (CPU, background)" >> "$WORK/steps.tsv"
tail -n 3 "$WORK/train_debug_fp32_cpu.log"
step curves_cpu 60 "$PYTHON" benchmarks/gpu_report.py curves --run "$WORK/train_debug_bf16" \
    --ref "$WORK/train_debug_fp32_cpu" --json "$WORK/curves_device_cpu_fp32.json"
if [[ -f benchmarks/gpu_reference_loss.json ]]; then
    step curves_ref 60 "$PYTHON" benchmarks/gpu_report.py curves --run "$WORK/train_debug_bf16" \
        --ref benchmarks/gpu_reference_loss.json --data "$DATA" --json "$WORK/curves_committed_fp32.json"
fi
step export 120 "$PYTHON" -m pretrain.export --checkpoint_dir "$WORK/train_debug_bf16" \
    --output_dir "$WORK/train_debug_bf16/hf" --overwrite
step export_parity 120 "$PYTHON" benchmarks/gpu_report.py export_parity --run "$WORK/train_debug_bf16" \
    --hf "$WORK/train_debug_bf16/hf" --device "$DEV" --json "$WORK/export_parity.json"

# --------------------------------------------------------------------------------------------------------------
# 5. Model benchmark: ours (eager, compiled) against transformers' LlamaForCausalLM (sdpa), same GPU, same run
if [[ "$DRY" == 1 ]]; then
    BENCH=(--preset debug --seq_len 64 --dtype bf16 --device cpu --warmup 1 --steps 2)
else
    BENCH=(--preset 1b --seq_len 4096 --dtype bf16 --device cuda --warmup 3 --steps 8)
fi
# ours and transformers also with sdpa restricted to cuDNN attention (uncompiled), in the same process
# --breakdown: 2 profiled steps per variant, kernel time split into GEMM / attention / other, longest kernels
step bench_1b_b1 300 "$PYTHON" benchmarks/bench_model.py "${BENCH[@]}" --batch 1 --compile --cudnn_variants \
    --flex_variant --breakdown --json "$WORK/bench_1b_b1.json"

# --------------------------------------------------------------------------------------------------------------
# 6. DeepSpeed training throughput on the 1B config (one process: no launcher, no ssh)
if [[ "$DRY" == 1 ]]; then
    TRAIN_1B=(--config config/1b.yaml "data_dir=$DATA" model_preset=debug seq_len=64 micro_batch_size=2
              global_batch_size=4 max_steps=4 log_interval=2)
else
    # vocab pinned to the preset's 64000 (the sample tokenizer's 1024 ids fit); 4 micro batches of 2 x 4096 per
    # step: eager activations of 4 x 4096 tokens (~135 KB per token and layer) would not leave room on an 80 GB H100
    TRAIN_1B=(--config config/1b.yaml "data_dir=$DATA" model.vocab_size=64000 micro_batch_size=2
              global_batch_size=8 max_steps=12 log_interval=4)
fi
TRAIN_1B+=(eval_interval=0 save_interval=0 save_final=false warmup_steps=2 tensorboard=false wandb_mode=disabled
           zero_stage=1 precision=$([[ "$DRY" == 1 ]] && echo fp32 || echo bf16))
step train_1b_zero1 240 env $(dist_env 29613) "$PYTHON" -m pretrain.train "${TRAIN_1B[@]}" \
    "run_dir=$WORK/train_1b_zero1" activation_checkpointing=false
step train_1b_zero1_ckpt 240 env $(dist_env 29614) "$PYTHON" -m pretrain.train "${TRAIN_1B[@]}" \
    "run_dir=$WORK/train_1b_zero1_ckpt" activation_checkpointing=true

# --------------------------------------------------------------------------------------------------------------
# 7. Optional variants, while time is left
# Batch 2, ours compiled (the loss outside the graph) against transformers: the 50% MFU candidate, first.
if (( $(left) > 120 )); then
    step bench_1b_b2 200 "$PYTHON" benchmarks/bench_model.py "${BENCH[@]}" --batch 2 --compile \
        --json "$WORK/bench_1b_b2.json"
else
    skip bench_1b_b2 "time budget used up"
fi
# INT8/INT4 weight-only quantized linears on the GPU (inference/quantize.py): kernels, error, memory, decode speed
if (( $(left) > 60 )) && [[ "$DRY" != 1 ]] && [[ -f benchmarks/quantization/gpu_check.py ]]; then
    step quant_gpu 60 "$PYTHON" benchmarks/quantization/gpu_check.py
fi
# The inference engine's batched decoding in bf16 against transformers' generate (benchmarks/inference.md)
if (( $(left) > 60 )); then
    if [[ "$DRY" == 1 ]]; then INFER=(--device cpu --dtype float32 --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2
                                      --new_tokens 8 --reps 1)
    else INFER=(--device cuda --dtype bfloat16 --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 8 --new_tokens 64
                --reps 2); fi
    step infer_gpu 90 "$PYTHON" benchmarks/bench_inference.py decode --tokenizer "$DATA" --batches 1 8 "${INFER[@]}"
else
    skip infer_gpu "time budget used up"
fi
# FlexAttention: document masking as a block-sparse kernel instead of sdpa with a dense mask (no flash-attn here)
if (( $(left) > 60 )) && [[ "$DRY" != 1 ]]; then
    step train_1b_zero1_flex 150 env $(dist_env 29616) "$PYTHON" -m pretrain.train "${TRAIN_1B[@]}" \
        "run_dir=$WORK/train_1b_zero1_flex" activation_checkpointing=false model.attn_impl=flex
else
    skip train_1b_zero1_flex "time budget used up, or a dry run (FlexAttention has no CPU backward)"
fi
if (( $(left) > 100 )); then
    step train_1b_zero1_compile 200 env $(dist_env 29615) "$PYTHON" -m pretrain.train "${TRAIN_1B[@]}" \
        "run_dir=$WORK/train_1b_zero1_compile" activation_checkpointing=false compile=true
else
    skip train_1b_zero1_compile "time budget used up"
fi
