"""What every inference command shares: the model flags, opening the model (optionally quantized), its tokenizer
and chat template, and the engine on top."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from artifacts import add_quantize_args, load_tokenizer, open_model
from common.tensors import DTYPES
from model import Transformer
from tokenizer import Tokenizer

from .engine import PREFILL_CHUNK, Engine
from .templates import ChatTemplate, load_chat_template

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face folder, training or LoRA fine-tuning run directory, or quantized folder")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run (default: latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn_impl", default="sdpa", choices=("sdpa", "eager"),
                   help="attention kernel (the engine needs one that takes per-row masks)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder merged into --model")
    add_quantize_args(p)
    p.add_argument("--max_len", type=int, default=None,
                   help="positions per KV-cache slot (prompt + reply; default: the model's max_seq_len)")


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    template: ChatTemplate


def load(args: argparse.Namespace) -> Loaded:
    model = open_model(args.model, args.device, args.dtype, tag=args.tag, adapter=args.adapter,
                       quantize=args.quantize, group_size=args.group_size, quantize_head=args.quantize_head,
                       runtime={"attn_impl": args.attn_impl})
    tok = load_tokenizer(args.model, args.tokenizer, model)
    return Loaded(model, tok, load_chat_template(args.model, tok))


def make_engine(loaded: Loaded, slots: int, max_len: int | None, max_queue: int = 64,
                prefill_chunk: int | None = PREFILL_CHUNK, prefix_caching: bool = True) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, slots=slots, max_len=max_len, max_queue=max_queue,
                  prefill_chunk=prefill_chunk, prefix_caching=prefix_caching).start()
