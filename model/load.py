"""Open any model folder the project produces or reads: a Hugging Face LLaMA folder or a training run."""
from __future__ import annotations

from pathlib import Path

import torch

from .model import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_training_run(path: Path) -> bool:
    return (path / "latest").exists() or any(path.glob("step_*"))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32",
                    **overrides):
    """(model in eval mode, Tokenizer) from a Hugging Face folder or one of our training run directories."""
    from tokenizer import Tokenizer

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if (path / "config.json").exists():
        model = Transformer.from_hf(path, **overrides)
    elif is_training_run(path):
        from pretrain.export import load_checkpoint_model

        model = load_checkpoint_model(path)
        for key, value in overrides.items():
            setattr(model.config, key, value)
    else:
        raise FileNotFoundError(f"{path}: neither a Hugging Face folder (config.json) nor a training run (latest)")
    if not (path / "tokenizer.model").exists():
        raise FileNotFoundError(f"{path}: no tokenizer.model beside the weights; copy the tokenizer into the folder")
    return model.to(device=device, dtype=DTYPES[dtype]).eval(), Tokenizer(path / "tokenizer.model")
