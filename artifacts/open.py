"""The one way to open a model to run: `open_model`, used by every command that runs one.

It opens
- a Hugging Face folder (config.json + weights, one file or sharded) of a layout in model.hf_layouts: LLaMA,
  Baichuan-7B, XVERSE,
- a pretraining or full fine-tuning run directory (DeepSpeed checkpoints, `latest`; `tag` picks a checkpoint),
- a LoRA fine-tuning run directory (its base, named in finetune.json, with the checkpoint's adapter merged in),
- a quantized folder (any layout in artifacts.quantized.FORMATS, as saved),
then merges `adapter` folders (PEFT LoRA) into a float model and quantizes it on load when `quantize` is given.
Runtime settings (model.config.RUNTIME_MODEL_FIELDS: attention kernel, fused kernels, activation checkpointing)
go into the config before the model is built; nothing changes the config afterwards.

A folder a command cannot use is refused in one line that says what it is and what to pass instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.errors import MissingFileError, UserError
from common.tensors import DTYPES
from model import Transformer
from model.config import RUNTIME_MODEL_FIELDS
from model.lora import LoRAConfig, inject_lora, is_lora_name, load_lora_state_dict, merge_lora
from model.lora_peft import apply_adapter
from model.quant import DEFAULT_GROUP_SIZE, SCHEMES, check_scheme, quantize_model
from tokenizer import Tokenizer

from .devices import check_device, default_device, default_dtype
from .quant_formats import check_known_quantization
from .quantized import quantized_format
from .run_dir import consolidated_state_dict, is_run_dir, load_checkpoint_model, resolve_tag

FINETUNE_META = "finetune.json"
"""Written by finetune.train into its run directory: finetuning_type, model_path (the base), lora settings."""


def lora_run_meta(path: str | Path) -> dict[str, Any] | None:
    """finetune.json of a LoRA fine-tuning run directory, or None for any other folder."""
    file = Path(path) / FINETUNE_META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e}); is the run directory damaged?") from None
    return meta if meta.get("finetuning_type") == "lora" else None


def _not_a_model(path: Path) -> UserError:
    """The one-line refusal for a folder that holds no model, pointing at what it probably meant."""
    what = "pass a Hugging Face folder, a training run directory or a quantized folder"
    if (path / "adapter_config.json").is_file():
        return UserError(f"{path} is a PEFT LoRA adapter, not a model: pass its base model as --model and this "
                         "folder as --adapter")
    inside = sorted(p for p in path.iterdir() if p.is_dir() and ((p / "config.json").is_file() or is_run_dir(p)))
    if inside:
        return UserError(f"{path} holds no model itself (no config.json, no checkpoints); did you mean {inside[0]}? "
                         f"({what})")
    return UserError(f"{path}: neither a Hugging Face model folder (no config.json) nor a training run directory "
                     f"(no `latest` file or step_* checkpoints); {what}")


def _runtime(runtime: Mapping[str, Any] | None) -> dict[str, Any]:
    values = dict(runtime or {})
    unknown = sorted(set(values) - set(RUNTIME_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"runtime settings {unknown} are not runtime fields ({', '.join(RUNTIME_MODEL_FIELDS)})")
    return values


def _open_lora_run(path: Path, meta: dict[str, Any], tag: str | None, runtime: dict[str, Any]) -> Transformer:
    """The base of a LoRA run with the checkpoint's adapter merged in (fp32 arithmetic, CPU)."""
    base = meta.get("model_path")
    if not base or not Path(base).exists():
        # The adapter alone is not a model: point to the merged export, or to --adapter with the base moved.
        merged = path / "hf" / "merged"
        exported = "" if (merged / "config.json").is_file() else " (written by python -m finetune.export)"
        raise MissingFileError(
            f"{path} is a LoRA fine-tuning run whose base model {base!r} (finetune.json's model_path) is not there; "
            f"pass {merged} as --model{exported}, or the base where it is now as --model with --adapter "
            f"{path / 'hf' / 'adapter'}")
    model = _open_float(Path(base), meta.get("model_tag"), runtime)
    tag = resolve_tag(path, tag)
    state = {k: v for k, v in consolidated_state_dict(path, tag).items() if is_lora_name(k)}
    if not state:
        raise UserError(f"{path / tag}: this LoRA run's checkpoint holds no adapter tensors; pass another --tag")
    inject_lora(model, LoRAConfig(**meta["lora"]))
    load_lora_state_dict(model, state, source=str(path / tag))
    return merge_lora(model)


def _open_float(path: Path, tag: str | None, runtime: dict[str, Any]) -> Transformer:
    """fp32 CPU weights of a Hugging Face folder, a run directory or a LoRA run directory."""
    if not path.is_dir():
        if path.is_file():
            raise UserError(f"--model {path} is a file; pass the model folder that holds it")
        raise MissingFileError(f"{path}: model directory not found")
    if is_run_dir(path):
        meta = lora_run_meta(path)
        if meta is not None:
            return _open_lora_run(path, meta, tag, runtime)
        return load_checkpoint_model(path, tag=tag, config_overrides=runtime)
    if (path / "config.json").is_file():
        if tag is not None:
            raise UserError(f"{path}: --tag selects a checkpoint of a training run directory, not of a "
                            "Hugging Face folder")
        return Transformer.from_hf(path, **runtime)
    raise _not_a_model(path)


def open_model(path: str | Path, device: str | None = None, dtype: str | None = None, tag: str | None = None,
               adapter: str | Path | Sequence[str | Path] | None = None, merge_adapter: bool = True,
               quantize: str | None = None, group_size: int | None = None, quantize_head: bool = False,
               runtime: Mapping[str, Any] | None = None, needs_float: str | None = None) -> Transformer:
    """The model at `path` on `device` in `dtype` (defaults: cuda and bf16 when there is a GPU, else cpu and fp32),
    in eval mode. See the module docstring for the folders it opens.

    adapter: one PEFT LoRA adapter folder (or several, applied in order) on top of a float model. They are merged
    into the weights in fp32 before the cast (as fast as the base at run time); with merge_adapter=False a single
    adapter stays a separate branch (exactly PEFT's computation, a little slower).
    quantize: int8 / int4 weight-only quantization on load (group_size, quantize_head: see model/quant.py).
    runtime: values of RUNTIME_MODEL_FIELDS the model is built with.
    needs_float: set by a command that needs the full float weights (the command's name, for the message): a
    quantized folder is then refused.
    """
    path = Path(path)
    device = device or default_device()
    check_device(device)
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    values = _runtime(runtime)
    fmt = quantized_format(path)
    if fmt is None:
        check_known_quantization(path)  # quantized by a tool none of FORMATS reads: one line, not random weights
    if fmt is not None:
        what = fmt.describe(path)
        if needs_float:
            raise UserError(f"{path} is {what}; {needs_float} needs the float weights: pass the float model it was "
                            "quantized from")
        if adapter is not None:
            raise UserError(f"{path} is {what}, whose weights are already quantized: merge --adapter {adapter} into "
                            "the float model first (python -m finetune.merge), then quantize")
        if tag is not None:
            raise UserError(f"{path} is {what}; --tag selects a checkpoint of a training run directory")
        model = fmt.load(path, device, dtype, values)
        scheme = getattr(getattr(model, "quantization", None), "scheme", None)
        if quantize is not None and quantize != scheme:
            raise UserError(f"{path} is {what}, already quantized to {scheme}; --quantize {quantize} needs the "
                            "original float model")
        return model
    adapters = [] if adapter is None else [adapter] if isinstance(adapter, (str, Path)) else list(adapter)
    if quantize is not None:
        check_scheme(quantize)
        if adapters and not merge_adapter:
            raise ValueError("quantize needs the adapter merged into the weights (merge_adapter=True)")
    model = _open_float(path, tag, values)
    for n, folder in enumerate(adapters):
        apply_adapter(model, folder)
        if merge_adapter or n < len(adapters) - 1:
            merge_lora(model)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    if quantize is not None:
        quantize_model(model, quantize, group_size, quantize_head)
    return model


def load_tokenizer(model_path: str | Path, tokenizer_path: str | Path | None, model: Transformer) -> Tokenizer:
    """`tokenizer_path`, else the tokenizer.model beside the model (for a LoRA run directory without one: its
    base's); it must fit the model's vocabulary."""
    path = Path(tokenizer_path) if tokenizer_path else Path(model_path) / "tokenizer.model"
    meta = None if tokenizer_path else lora_run_meta(model_path)
    if not path.exists() and meta is not None and meta.get("model_path"):
        path = Path(meta["model_path"]) / "tokenizer.model"
    if not path.exists() and (path.parent / "tokenizer.json").is_file():
        # XVERSE-style folders ship only a Hugging Face tokenizer.json; the commands use SentencePiece.
        raise MissingFileError(f"{path.parent} has only a Hugging Face tokenizer.json, no SentencePiece "
                               "tokenizer.model (which these commands use); pass --tokenizer PATH/tokenizer.model")
    if not path.exists():
        raise MissingFileError(f"{path}: no SentencePiece tokenizer; pass --tokenizer PATH/tokenizer.model")
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocabulary "
                        f"has only {model.config.vocab_size}: they do not belong together")
    return tokenizer


def add_quantize_args(p: argparse.ArgumentParser, on_load: bool = True) -> None:
    """The quantization flags, declared once: --group_size and --quantize_head, and with on_load (every command
    that runs a model) --quantize. python -m inference.quantize takes --scheme instead of --quantize."""
    if on_load:
        p.add_argument("--quantize", choices=SCHEMES, default=None,
                       help="quantize the model's linear layers on load (weight-only; a folder written by "
                            "python -m inference.quantize is used as saved)")
    p.add_argument("--group_size", type=int, default=None,
                   help=f"int4 group size; default {DEFAULT_GROUP_SIZE}, smaller where it does not divide a "
                        "layer's in_features")
    p.add_argument("--quantize_head", action="store_true", help="quantize the output head too")
