"""Write a weight-only INT8 / INT4 quantized copy of a model (gpt-fast's quantize.py, for this model).

    python -m inference.quantize --model runs/sample/train/hf --scheme int8 --output_dir out/int8
    python -m inference.quantize --model runs/sample/train/hf --scheme int4 --group_size 128 --output_dir out/int4
    python -m inference.quantize --model M --scheme int4 --method gptq --calibration PATHS \
        --format compressed-tensors --group_size 128 --output_dir out/int4-ct   # GPTQ; transformers/vLLM folder

The schemes, kernels and group sizes are model/quant.py's; GPTQ calibration is inference/calibration.py's; the
folder formats are artifacts/quantized.py's (native) and artifacts/quant_formats.py's (compressed-tensors). Every
command that runs a model opens the folder as saved (artifacts.open_model), or quantizes a float model on load with
--quantize int8|int4 (plus --group_size and --quantize_head, the flags this command takes too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from artifacts.devices import default_device
from artifacts.open import add_quantize_args, load_tokenizer, open_model
from artifacts.quant_formats import SAVE_FORMATS, save_compressed_tensors
from artifacts.quantized import copy_tokenizer_files, save_quantized
from common.cli import entry_point, parser as make_parser
from common.errors import UserError
from common.io import check_output_dir
from common.tensors import DTYPES
from inference.calibration import (DEFAULT_CALIBRATION, DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, METHODS,
                                   calibration_tokens, quantize_model_gptq)
from model.quant import check_scheme, linear_weight_bytes, plan_group_sizes, quantize_model
from tokenizer import Tokenizer


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """--method, --calibration*, --format and --device of python -m inference.quantize."""
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="rtn: round to nearest (no data); gptq: second-order rounding calibrated on --calibration")
    p.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                   help="text files/folders/globs (.txt, .jsonl, .gz) for --method gptq (default: data/sample)")
    p.add_argument("--calibration_sequences", type=int, default=DEFAULT_SEQUENCES,
                   help="calibration sequences")
    p.add_argument("--calibration_seq_len", type=int, default=DEFAULT_SEQ_LEN,
                   help="tokens per calibration sequence (at most the model's context)")
    p.add_argument("--format", choices=SAVE_FORMATS, default="native",
                   help="native: this project's folder (quantization_config.json); compressed-tensors: the "
                        "pack-quantized folder transformers and vLLM load (one group size for all layers)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda if present, else cpu)")


def calibration_from_args(args: argparse.Namespace, tokenizer: Tokenizer, max_seq_len: int) -> torch.Tensor | None:
    """The calibration token windows of --method gptq (None for rtn)."""
    if args.method != "gptq":
        if args.calibration is not None:
            raise UserError("--calibration is used by --method gptq only; add --method gptq or drop it")
        return None
    return calibration_tokens(args.calibration or [DEFAULT_CALIBRATION], tokenizer, args.calibration_sequences,
                              min(args.calibration_seq_len, max_seq_len))


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = make_parser("python -m inference.quantize", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="Hugging Face LLaMA folder or training run directory")
    p.add_argument("--scheme", required=True, help="int8 or int4")
    add_quantize_args(p, on_load=False)
    p.add_argument("--output_dir", required=True, help="the quantized folder to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run directory (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    add_calibration_args(p)
    args = p.parse_args(argv)
    check_scheme(args.scheme)
    check_output_dir(args.output_dir, args.overwrite)
    model = open_model(args.model, args.device or default_device(), "float32", tag=args.tag,
                       needs_float="python -m inference.quantize")
    tokenizer = load_tokenizer(args.model, args.tokenizer, model)
    compressed = args.format != "native"
    if args.scheme == "int4":
        sizes = set(plan_group_sizes(model, args.group_size, args.quantize_head).values())
        if compressed and len(sizes) > 1:
            raise UserError(f"--format {args.format} stores one group size for all layers; the per-layer default "
                            f"gives {'/'.join(map(str, sorted(sizes)))} here: pass --group_size N dividing every "
                            "layer's in_features")
    tokens = calibration_from_args(args, tokenizer, model.config.max_seq_len)
    source_dtype = torch.float32
    if (Path(args.model) / "config.json").is_file():
        name = json.loads((Path(args.model) / "config.json").read_text()).get("dtype") or "float32"
        source_dtype = DTYPES.get(name, torch.float32)
    before = linear_weight_bytes(model, args.quantize_head)
    if tokens is not None or compressed:
        # GPTQ, or round to nearest on compressed-tensors' symmetric grid; the portable INT4 layout either way
        quantize_model_gptq(model, args.scheme, args.group_size, args.quantize_head, tokens, symmetric=compressed)
    else:
        # pack=False: the folder stores the portable INT4 layout, not this machine's kernel layout
        quantize_model(model, args.scheme, args.group_size, args.quantize_head, pack=False)
    after = linear_weight_bytes(model, args.quantize_head)
    if compressed:
        save_compressed_tensors(model, args.output_dir, tokenizer.path,
                                lambda tmp: copy_tokenizer_files(Path(args.model), Path(tokenizer.path), tmp),
                                source_dtype, args.overwrite)
    else:
        save_quantized(model, args.output_dir, args.model, tokenizer.path, source_dtype, args.overwrite)
    sizes = sorted(set(model.quantization.group_sizes.values()))
    extra = f", group size {'/'.join(map(str, sizes))}" if sizes else ""
    print(f"{args.scheme}{extra}: {len(model.quantization.layers)} linear layers, {before / 2**20:.2f} MiB (fp32) -> "
          f"{after / 2**20:.2f} MiB ({after / before:.3f}x); wrote {args.output_dir} "
          f"({args.method}, {args.format} format)")


if __name__ == "__main__":
    main()
