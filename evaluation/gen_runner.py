"""What the generative evaluators (GSM8K, HumanEval) share: their arguments and the checks on them."""
from __future__ import annotations

import argparse

from common import cli
from common.errors import UserError
from evaluation.runner import add_model_flags


def build_parser(prog: str, description: str, data_help: str) -> argparse.ArgumentParser:
    """The options every evaluator has (model, adapter, quantization, device, outputs) and --samples."""
    p = cli.parser(prog, description)
    p.add_argument("--model", "--model_name_or_path", dest="model",
                   help="a Hugging Face causal-LM folder or a training run directory (not needed with --samples)")
    p.add_argument("--data_dir", required=True, help=data_help)
    p.add_argument("--output_dir", required=True, help="where results.json and predictions.jsonl go")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --output_dir holds")
    p.add_argument("--samples", help="score the replies in this JSONL file instead of generating them")
    p.add_argument("--limit", type=int, help="evaluate only the first N problems")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    p.add_argument("--max_new_tokens", type=int, help="longest reply in tokens")
    p.add_argument("--max_length", type=int, help="longest prompt + reply in tokens (default: the model's context)")
    add_model_flags(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.samples is None and args.model is None:
        raise UserError("give --model to generate replies, or --samples FILE to score replies made elsewhere")
    for flag in ("limit", "batch_size", "max_new_tokens", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
