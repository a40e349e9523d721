"""Fine-tuning configuration: the pretraining TrainConfig (engine, optimizer, schedule, checkpoints, logging) plus
what instruction tuning adds (base model, instruction files, chat template, masking, packing).

Loaded exactly like the pretraining config (YAML/TOML file < key=value overrides, every key type-checked):

    python -m finetune.config --config config/finetune_debug.yaml [--get KEY] [key=value ...]

Of the inherited fields, `data_dir`, `model_preset` and `init_from_hf` do not apply (the model comes from
`model_path`) and setting one is an error naming it; `model` may only set runtime switches (RUNTIME_MODEL_FIELDS of
model/config.py); `seq_len` is the length of a packed row (or the longest padded sample); `tokenizer` defaults to
model_path/tokenizer.model; `train_only_embeddings` applies to finetuning_type full.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

from common import reflect
from common.errors import UserError
from finetune.templates import get_template
from model.config import RUNTIME_MODEL_FIELDS
from model.lora import LoRAConfig
from pretrain import config as pretrain_config
from pretrain.config import TrainConfig

FinetuningType = Literal["full", "lora"]
"""Which parameters train: all of them, or LoRA adapters on a frozen base (model/lora.py)."""
DataFormat = Literal["auto", "alpaca", "sharegpt", "openai"]
Truncation = Literal["truncate", "drop"]
BadRecords = Literal["skip", "error"]
TUNABLE_MODEL_FIELDS = tuple(f for f in RUNTIME_MODEL_FIELDS if f != "activation_checkpointing")
"""`model.*` keys a fine-tuning config may set: how the model runs, never its architecture (activation
checkpointing has its own top-level key, as in pretraining)."""


@dataclass(frozen=True)
@reflect.with_defaults(run_dir="runs/sample/sft", seq_len=256, max_steps=60, lr=1e-3, min_lr=1e-4, warmup_steps=5,
                       weight_decay=0.0, eval_interval=20, eval_batches=4, save_interval=30,
                       wandb_project="llama-finetune")
class FinetuneConfig(TrainConfig):
    """A fine-tuning run. The defaults are the debug run on the shipped instruction sample
    (config/finetune_debug.yaml spells them out)."""

    stage: ClassVar[str] = "fine-tuning"
    not_applicable: ClassVar[dict[str, str]] = {
        "data_dir": "the data are data_files (instruction files)",
        "model_preset": "the architecture comes from model_path",
        "init_from_hf": "set model_path to the model to tune",
    }

    # --- starting point ---
    model_path: str = "runs/sample/train"
    """The model to tune: a Hugging Face LLaMA folder or one of our training run directories."""
    model_tag: str | None = None
    """Checkpoint of a run directory model_path (default: its latest)."""
    finetuning_type: FinetuningType = "full"
    """Which parameters train: 'full' (all of them) or 'lora' (adapters on the frozen base, set in `lora`)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (finetuning_type lora): a section `lora: {r, alpha, dropout, target_modules, use_rslora}` or
    dotted keys (lora.r=16); the fields and defaults of model/lora.py's LoRAConfig, PEFT's meaning."""
    init_adapter: str | None = None
    """Hot start (finetuning_type lora): a PEFT adapter folder whose weights a NEW run starts from, with a fresh
    optimizer (an incremental round). Its r, alpha, target_modules, use_rslora must equal `lora`'s. Recorded in
    the run directory's finetune.json. Not a resume: re-running the same command resumes the run itself."""

    # --- data ---
    data_files: list[str] = field(default_factory=lambda: ["data/sft_sample/alpaca.jsonl",
                                                           "data/sft_sample/sharegpt.json"])
    """Instruction files (.json list or .jsonl, optionally .gz), mixed together and shuffled."""
    val_files: list[str] = field(default_factory=list)
    """Validation files; empty: hold out val_size records of data_files."""
    val_size: int = 16
    """Records of data_files held out for validation when val_files is empty (0: none)."""
    data_format: DataFormat = "auto"
    """'alpaca' (instruction/input/output, optional system and history), 'sharegpt' (conversations with
    from/value), 'openai' (messages with role/content), or 'auto': decided per record by its keys."""
    instruction_field: str = "instruction"
    """Alpaca-layout key of the instruction (e.g. 'question' for BELLE's eval set)."""
    input_field: str = "input"
    """Alpaca-layout key of the optional input, appended to the instruction after a blank line."""
    output_field: str = "output"
    """Alpaca-layout key of the reply (e.g. 'std_answer' for BELLE's eval set)."""
    system_field: str = "system"
    """Key of an optional system text (alpaca and sharegpt layouts)."""
    history_field: str = "history"
    """Alpaca-layout key of optional earlier turns: a list of [instruction, reply] pairs."""
    bad_records: BadRecords = "skip"
    """A record with missing fields, non-alternating roles or an empty reply: 'skip' (counted, the first few
    reported with file and line) or 'error' (stop at the first). Invalid JSON is always an error."""

    # --- tokenization ---
    template: str = "alpaca"
    """Chat template: alpaca, vicuna, chatml, llama-2 or plain (finetune/templates.py)."""
    cutoff_len: int | None = None
    """Most tokens of one sample (BOS to last EOS); None: seq_len + 1 (a sample of n tokens fills n - 1
    positions). Longer samples are handled by `truncation`."""
    truncation: Truncation = "truncate"
    """'truncate': keep the leading whole turns that fit; when even the first does not, cut its reply (which
    then has no EOS); a sample whose prompt alone fills cutoff_len is skipped. 'drop': skip every longer sample.
    Both are counted in the data report."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: loss on assistant replies and their EOS only)."""
    mask_history: bool = False
    """Train only on the last reply of a conversation (earlier replies are context)."""
    packing: bool = True
    """Pack several samples into each seq_len row with document masking; false pads each sample."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:  # an unknown name is a one-line error here, before anything runs
            get_template(self.template)
        except ValueError as e:  # finetune/templates.py's error names the template and the choices
            raise UserError(f"template: {e}") from None
        if not self.data_files:
            raise UserError("data_files is empty: give at least one instruction file")
        not_runtime = sorted(set(self.model) - set(TUNABLE_MODEL_FIELDS))
        if not_runtime:
            raise UserError(f"model.{not_runtime[0]}: the architecture comes from model_path; only "
                            f"{', '.join('model.' + f for f in TUNABLE_MODEL_FIELDS)} may be set")
        if self.cutoff_len is not None and not 2 <= self.cutoff_len <= self.seq_len + 1:
            raise UserError(f"cutoff_len must be in [2, seq_len + 1 = {self.seq_len + 1}], got {self.cutoff_len}")
        if self.init_adapter is not None and self.finetuning_type != "lora":
            raise UserError("init_adapter is a LoRA adapter to start from: it needs finetuning_type=lora")
        if self.train_only_embeddings and self.finetuning_type != "full":
            raise UserError("train_only_embeddings needs finetuning_type=full (LoRA adapters train instead of the "
                            "embeddings); set one of them")
        if self.val_size < 0:
            raise UserError(f"val_size must be >= 0, got {self.val_size}")

    @property
    def max_sample_len(self) -> int:
        return self.cutoff_len or self.seq_len + 1


def load_finetune_config(path: str | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    return pretrain_config.load_config(path, overrides, FinetuneConfig)  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    """Print the resolved fine-tuning config (or one key of it)."""
    pretrain_config.main(argv, FinetuneConfig)


if __name__ == "__main__":
    main(sys.argv[1:])
