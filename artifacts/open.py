"""Open a model to run: a Hugging Face LLaMA folder or one of our training run directories (with its tokenizer)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from common.tensors import DTYPES
from model import Transformer
from model.lora import merge_lora
from model.lora_peft import apply_adapter
from tokenizer import Tokenizer

from .run_dir import is_run_dir, load_checkpoint_model


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


def load_model(path: str | Path, device: str, dtype: str, tag: str | None = None,
               adapter: str | Path | Sequence[str | Path] | None = None, merge_adapter: bool = True) -> Transformer:
    """The model at `path` (fp32 weights cast to `dtype`), on `device`, in eval mode.

    `adapter`: one PEFT LoRA adapter folder (or several, applied in order) on top of the base. They are merged
    into the weights in fp32 before the cast (as fast as the base at run time); with merge_adapter=False a single
    adapter stays a separate branch (exactly PEFT's computation, a little slower).
    """
    path = Path(path)
    check_device(device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    if is_run_dir(path):
        model = load_checkpoint_model(path, tag=tag)
    elif (path / "config.json").is_file():
        if tag is not None:
            raise ValueError(f"{path}: --tag selects a checkpoint of a training run directory, not of a "
                             "Hugging Face folder")
        model = Transformer.from_hf(path)
    else:
        raise ValueError(f"{path}: neither a Hugging Face model folder (no config.json) nor a training run "
                         "directory (no `latest` file or step_* checkpoints)")
    adapters = [] if adapter is None else [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    for n, folder in enumerate(adapters):
        apply_adapter(model, folder)
        if merge_adapter or n < len(adapters) - 1:
            merge_lora(model)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def load_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None, model: Transformer) -> Tokenizer:
    """`tokenizer_path`, else the tokenizer.model beside the model; it must fit the model's vocabulary."""
    path = Path(tokenizer_path) if tokenizer_path else Path(model_path) / "tokenizer.model"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SentencePiece tokenizer; pass --tokenizer PATH/tokenizer.model")
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocabulary "
                         f"has only {model.config.vocab_size}: they do not belong together")
    return tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # bf16 halves memory and is the training precision on GPUs; CPUs are faster and exact in fp32.
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"
