"""Greedy tokens of GGUF files against our fp32 model, without llama.cpp (no llama-cpp-python wheel here):
the files' tensors, dequantized by gguf's reader, run through tests/reference_gguf.py's reference_logits (a forward pass in
llama.cpp's conventions, adjacent-pair rotary), and each prompt's greedy continuation is compared with
Transformer.generate on the original model.

    python benchmarks/quantization/gguf_greedy.py --model runs/quant8m/train/hf --data_dir runs/quant8m/data \
        runs/gguf/quant8m-f16.gguf runs/gguf/quant8m-q8_0.gguf runs/gguf/quant8m-q4_0.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from artifacts import open_model  # noqa: E402
from benchmarks.quantization.bench_quant import heldout_tokens, identical_prefix  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the reference forward is test code
from reference_gguf import read_tensors, reference_logits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32)
    args = p.parse_args()
    model = open_model(args.model, "cpu", "float32")
    held = heldout_tokens(Path(args.data_dir), 10_000)
    prompts = [held[i * 97:i * 97 + 16].tolist() for i in range(args.prompts)]
    with torch.inference_mode():
        ours = [model.generate(torch.tensor([pr]), args.new_tokens)[0, 16:].tolist() for pr in prompts]
        for file in args.files:
            t = read_tensors(file)
            same = []
            for pr, ref in zip(prompts, ours):
                ids = list(pr)
                for _ in range(args.new_tokens):
                    ids.append(int(reference_logits(t, model.config, ids)[-1].argmax()))
                same.append(identical_prefix(ids[16:], ref))
            print(f"{Path(file).name}: identical greedy prefix {np.mean(same):.1f}/{args.new_tokens} mean, "
                  f"{sum(s == args.new_tokens for s in same)}/{len(same)} prompts fully identical ({same})")


if __name__ == "__main__":
    main()
