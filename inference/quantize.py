"""Write a weight-only INT8 / INT4 quantized copy of a model (gpt-fast's quantize.py, for this model).

    python -m inference.quantize --model runs/sample/train/hf --scheme int8 --output_dir out/int8
    python -m inference.quantize --model runs/sample/train/hf --scheme int4 --group_size 128 --output_dir out/int4

The schemes, kernels and group sizes are model/quant.py's; the folder format is artifacts/quantized.py's. Every
command that runs a model opens the folder as saved (artifacts.open_model), or quantizes a float model on load with
--quantize int8|int4 (plus --group_size and --quantize_head, the flags this command takes too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from artifacts.open import add_quantize_args, load_tokenizer, open_model
from artifacts.quantized import save_quantized
from common.cli import entry_point, parser as make_parser
from common.io import check_output_dir
from common.tensors import DTYPES
from model.quant import check_scheme, linear_weight_bytes, quantize_model


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
    args = p.parse_args(argv)
    check_scheme(args.scheme)
    check_output_dir(args.output_dir, args.overwrite)
    model = open_model(args.model, "cpu", "float32", tag=args.tag, needs_float="python -m inference.quantize")
    tokenizer = load_tokenizer(args.model, args.tokenizer, model)
    source_dtype = torch.float32
    if (Path(args.model) / "config.json").is_file():
        name = json.loads((Path(args.model) / "config.json").read_text()).get("dtype") or "float32"
        source_dtype = DTYPES.get(name, torch.float32)
    before = linear_weight_bytes(model, args.quantize_head)
    # pack=False: the folder stores the portable INT4 layout, not this machine's kernel layout
    quantize_model(model, args.scheme, args.group_size, args.quantize_head, pack=False)
    after = linear_weight_bytes(model, args.quantize_head)
    save_quantized(model, args.output_dir, args.model, tokenizer.path, source_dtype, args.overwrite)
    sizes = sorted(set(model.quantization.group_sizes.values()))
    extra = f", group size {'/'.join(map(str, sizes))}" if sizes else ""
    print(f"{args.scheme}{extra}: {len(model.quantization.layers)} linear layers, {before / 2**20:.2f} MiB (fp32) -> "
          f"{after / 2**20:.2f} MiB ({after / before:.3f}x); wrote {args.output_dir}")


if __name__ == "__main__":
    main()
