"""Quantized model folders: the format inference.quantize writes, and the table the model opener dispatches on.

Our folder (save_quantized / load_quantized) holds config.json (the Hugging Face LLaMA config of the original),
quantization_config.json (model.quant.QuantizationConfig: scheme, group sizes, layers), model.safetensors (int
codes, scales, zeros and the unquantized tensors under our own parameter names, INT4 in the portable layout) and the
tokenizer files.

The compressed-tensors pack-quantized layout (artifacts/quant_formats.py: what transformers and vLLM load) is the
second entry of FORMATS. Another layout (e.g. a GPTQ folder, recognised by config.json's `quantization_config`)
plugs in by adding one QuantizedFormat to FORMATS: `detect(path)` says whether a folder is in
that format, `describe(path)` names it in one phrase (for refusals), `load(path, device, dtype)` returns the
Transformer ready to run. artifacts.open.open_model then opens it for every command.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import MissingFileError, UserError
from common.io import atomic_dir, write_json
from common.tensors import DTYPES
from model import ModelConfig, Transformer
from model.hf import config_from_hf, config_to_hf
from model.quant import (FORMAT_VERSION, Int4Linear, Int8Linear, QuantizationConfig, check_scheme, pack_for_kernels,
                         set_module)
from tokenizer import Tokenizer

from .devices import check_device, default_dtype
from .quant_formats import is_compressed_tensors_dir, load_compressed_tensors, native_marker

QUANT_CONFIG = "quantization_config.json"
WEIGHTS = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")


def is_quantized_dir(path: str | Path) -> bool:
    """A folder written by save_quantized (python -m inference.quantize)."""
    return (Path(path) / QUANT_CONFIG).is_file()


def copy_tokenizer_files(source: Path, tokenizer_path: Path, out: Path) -> None:
    """The source folder's tokenizer files (tokenizer_config.json keeps a chat template), else ones made from
    tokenizer.model."""
    copied = False
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied = True
    if not (out / "tokenizer.model").exists():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    if not copied or not (out / "tokenizer.json").exists():
        from tokenizer.hf import save_hf_tokenizer

        try:
            save_hf_tokenizer(tokenizer_path, out)
        except ValueError:
            pass  # a SentencePiece model transformers cannot mirror: tokenizer.model alone still serves us


def save_quantized(model: Transformer, out_dir: str | Path, source: str | Path, tokenizer_path: str | Path,
                   dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write a quantized folder (see the module docstring) atomically. `source` is the original model's folder
    (its tokenizer files are copied); `dtype` is recorded as the original's float dtype."""
    qconfig: QuantizationConfig | None = getattr(model, "quantization", None)
    if qconfig is None:
        raise ValueError("save_quantized needs a model returned by quantize_model")
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.detach().to("cpu").contiguous()
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear) and m.layout != "portable":
            raise ValueError(f"layer {name} was already converted to a {m.layout} layout (packed for the kernel); "
                             "quantize with quantize_model(..., pack=False) to save")
    if model.config.tie_embeddings and "output" not in qconfig.layers:
        del state["output.weight"]  # the same tensor as the embedding: safetensors stores it once
    metadata = {"format": "pt", "quantization": json.dumps(asdict(qconfig))}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata=metadata)
        tok = Tokenizer(tokenizer_path)
        hf_config = config_to_hf(model.config, dtype, tok.bos_id if tok.bos_id >= 0 else None,
                                 tok.eos_id if tok.eos_id >= 0 else None, tok.pad_id if tok.pad_id >= 0 else None)
        # A quantization_config transformers refuses (it would otherwise load this folder as random weights).
        write_json(tmp / "config.json", {**hf_config, "quantization_config": native_marker(qconfig.scheme)})
        write_json(tmp / QUANT_CONFIG, asdict(qconfig))
        copy_tokenizer_files(Path(source), Path(tokenizer_path), tmp)
    return Path(out_dir)


def read_quantization_config(path: str | Path) -> QuantizationConfig:
    file = Path(path) / QUANT_CONFIG
    try:
        values = json.loads(file.read_text())
        qconfig = QuantizationConfig(**values)
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{file}: not a valid quantization config ({e}); write the folder again with python -m "
                        "inference.quantize") from None
    check_scheme(qconfig.scheme)
    if qconfig.format_version != FORMAT_VERSION:
        raise UserError(f"{file}: format_version {qconfig.format_version}, this code reads {FORMAT_VERSION}")
    return qconfig


def load_quantized(path: str | Path, device: str = "cpu", dtype: str | None = None,
                   config_overrides: dict | None = None) -> Transformer:
    """A quantized folder -> Transformer with Int8Linear/Int4Linear layers, on `device`, eval mode.

    The model is built on the meta device and the saved tensors are assigned into it, so no float copy of the
    quantized weights is ever made. `dtype` is the activation dtype (default: bf16 on GPU, fp32 on CPU).
    """
    path = Path(path)
    dev = check_device(device)
    if not path.is_dir():
        raise MissingFileError(f"{path}: model directory not found")
    qconfig = read_quantization_config(path)
    if not (path / WEIGHTS).is_file():
        raise MissingFileError(f"{path}: no {WEIGHTS}; a quantized folder is written by python -m "
                               "inference.quantize")
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path}: no config.json; a quantized folder is written by python -m inference.quantize")
    config: ModelConfig = config_from_hf(json.loads((path / "config.json").read_text()), **(config_overrides or {}))
    with torch.device("meta"):
        model = Transformer(config)
    for name in qconfig.layers:
        linear = model.get_submodule(name)
        is_head = name == "output"
        q = (Int8Linear(linear.in_features, linear.out_features, is_head, device="meta") if qconfig.scheme == "int8"
             else Int4Linear(linear.in_features, linear.out_features, qconfig.group_sizes[name], is_head,
                             device="meta"))
        set_module(model, name, q)
    float_dtype = DTYPES[dtype or default_dtype(device)]
    state = {}
    with safe_open(str(path / WEIGHTS), framework="pt", device=str(dev)) as f:
        for k in f.keys():
            v = f.get_tensor(k)
            if v.is_floating_point() and not k.endswith((".scales", ".zeros")):
                v = v.to(float_dtype)
            if v.data_ptr() % 64:
                # safetensors hands out views at the file's byte offsets; torch's CPU int8 kernel needs the
                # 64-byte alignment of a fresh allocation (it crashed on an unaligned weight)
                v = v.clone()
            state[k] = v
    tied = config.tie_embeddings and "output" not in qconfig.layers
    try:
        model.load_state_dict(state, strict=not tied, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path / WEIGHTS}: tensors do not fit config.json and {QUANT_CONFIG} ({e})") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.quantization = qconfig
    # INT4 codes go into the kernel layout now, once, for the activation dtype the model runs in.
    return pack_for_kernels(model, float_dtype).eval()


def describe_quantized(path: str | Path) -> str:
    """One phrase for messages: what kind of quantized folder this is."""
    try:
        q = read_quantization_config(path)
    except (OSError, ValueError):
        return "a quantized folder (python -m inference.quantize)"
    sizes = sorted(set(q.group_sizes.values()))
    group = f", group size {'/'.join(map(str, sizes))}" if sizes else ""
    return f"a quantized folder ({q.scheme}{group}, python -m inference.quantize)"


@dataclass(frozen=True)
class QuantizedFormat:
    """One on-disk layout of a quantized model that the opener can run (see the module docstring)."""

    name: str
    detect: Callable[[Path], bool]
    describe: Callable[[Path], str]
    load: Callable[..., Transformer]
    """load(path, device, dtype, config_overrides) -> Transformer in eval mode, ready to run."""


def describe_compressed_tensors(path: str | Path) -> str:
    return "a compressed-tensors pack-quantized folder"


FORMATS: list[QuantizedFormat] = [
    QuantizedFormat("inference.quantize", is_quantized_dir, describe_quantized, load_quantized),
    QuantizedFormat("compressed-tensors", is_compressed_tensors_dir, describe_compressed_tensors,
                    load_compressed_tensors),
]
"""Every quantized folder layout the opener recognises, tried in order."""


def quantized_format(path: str | Path) -> QuantizedFormat | None:
    """The quantized layout of folder `path`, or None for anything else (float folders included)."""
    path = Path(path)
    return next((f for f in FORMATS if path.is_dir() and f.detect(path)), None)
