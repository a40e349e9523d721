"""What scripts/finetune.sh checks before it starts the DeepSpeed launcher, so that a mistake ends in one line.

    python -m finetune.preflight --config config/finetune_debug.yaml --hostfile config/hostfile [key=value ...]

The checks pretraining's preflight makes (hostfile syntax, batch arithmetic for the world size, the port; see
pretrain/preflight.py), on the fine-tuning config, plus the fine-tuning inputs: model_path is a Hugging Face folder
or a training run directory (or the embedded default's pretraining run, which scripts/finetune.sh makes when it is
missing), the instruction files exist, and a LoRA hot start's init_adapter is an adapter folder. Prints `KEY=value`
lines: WORLD_SIZE, NUM_HOSTS, MASTER_PORT, RUN_DIR, MAX_STEPS, MODEL_PATH, MODEL_MISSING (1: the embedded default's
model is still to be pretrained), FINETUNING_TYPE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from common import cli
from common.errors import MissingFileError
from finetune.config import FinetuneConfig, load_finetune_config
from pretrain.preflight import preflight


def model_ready(path: str | Path) -> bool:
    """A Hugging Face folder (config.json) or one of our training run directories (latest)."""
    return (Path(path) / "config.json").is_file() or (Path(path) / "latest").is_file()


def check_finetuning(cfg: FinetuneConfig) -> dict[str, str]:  # type: ignore[override]
    missing = not model_ready(cfg.model_path)
    if missing and cfg.model_path != FinetuneConfig.model_path:
        raise MissingFileError(f"model_path {cfg.model_path}: neither a Hugging Face folder (config.json) nor a "
                               "training run directory (latest); set model_path to the model to tune")
    for name in (*cfg.data_files, *cfg.val_files):
        if not Path(name).is_file():
            raise MissingFileError(f"{name}: instruction file not found (data_files / val_files)")
    if cfg.init_adapter is not None and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        raise MissingFileError(f"init_adapter {cfg.init_adapter}: no adapter_config.json; give a PEFT adapter "
                               "folder (a LoRA run's export writes one: <run_dir>/hf/adapter)")
    return {"MODEL_PATH": cfg.model_path, "MODEL_MISSING": str(int(missing)),
            "FINETUNING_TYPE": cfg.finetuning_type}


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> None:
    preflight(argv, "python -m finetune.preflight", __doc__, load_finetune_config, check_finetuning)


if __name__ == "__main__":
    main()
