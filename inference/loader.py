"""What every inference command shares: the model flags, opening the model (optionally quantized), its tokenizer
and chat template, and the engine on top."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from artifacts.open import check_device, default_device, default_dtype, load_model, load_tokenizer
from common.tensors import DTYPES
from model import Transformer
from tokenizer import Tokenizer

from .engine import Engine
from .templates import ChatTemplate, load_chat_template

QUANT_SCHEMES = ("int8", "int4")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face folder or training run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run (default: latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn_impl", default="sdpa", choices=("sdpa", "eager"),
                   help="attention kernel (the engine needs one that takes per-row masks)")
    p.add_argument("--quantize", default=None, choices=QUANT_SCHEMES, help="weight-only quantization")
    p.add_argument("--group_size", type=int, default=128, help="int4 group size")
    p.add_argument("--max_len", type=int, default=None,
                   help="positions per KV-cache slot (prompt + reply; default: the model's max_seq_len)")


def quantize(model: Transformer, scheme: str, group_size: int) -> Transformer:
    """The model quantized by inference.quantize (lazily imported: it lives on its own branch until merged)."""
    try:
        from inference.quantize import quantize_model
    except ImportError as e:
        raise ValueError(f"--quantize {scheme}: inference.quantize is not available here ({e})") from None
    out = quantize_model(model, scheme, group_size)
    return model if out is None else out


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    template: ChatTemplate


def load(args: argparse.Namespace) -> Loaded:
    device = args.device or default_device()
    check_device(device)
    model = load_model(args.model, device, args.dtype or default_dtype(device), tag=args.tag)
    model.config.attn_impl = args.attn_impl
    if args.quantize:
        model = quantize(model, args.quantize, args.group_size)
    tok = load_tokenizer(args.model, args.tokenizer, model)
    return Loaded(model, tok, load_chat_template(args.model, tok))


def make_engine(loaded: Loaded, slots: int, max_len: int | None, max_queue: int = 64) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, slots=slots, max_len=max_len, max_queue=max_queue).start()
