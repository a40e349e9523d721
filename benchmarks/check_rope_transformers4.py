"""Logits of every rope type against an older transformers (4.4x), which cannot be installed beside 5.x.

    pip install --target /tmp/tf4 --no-deps transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5
    PYTHONPATH=/tmp/tf4:$PWD python benchmarks/check_rope_transformers4.py

Exports the tiny models of tests/test_rope.py (one per rope type, original context 64, max_seq_len 256) with our
to_hf, loads each folder with the transformers found first on PYTHONPATH and prints the largest logit difference
at 200 and 40 tokens. docs/long_context.md records the result.
"""
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Transformer  # noqa: E402
from test_rope import SCALINGS, tiny  # noqa: E402


def main() -> None:
    print("transformers", transformers.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in SCALINGS.items():
            torch.manual_seed(0)
            ours = Transformer(tiny(**settings)).eval()
            ours.to_hf(Path(tmp) / name)
            for length in (200, 40):
                theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / name,
                                                                           torch_dtype=torch.float32).eval()
                x = torch.randint(0, ours.config.vocab_size, (2, length))
                with torch.no_grad():
                    diff = (ours(x) - theirs(x).logits).abs().max().item()
                print(f"{name:24s} {length:4d} tokens: max |diff| {diff:.1e} {'ok' if diff < 1e-4 else 'MISMATCH'}")


if __name__ == "__main__":
    main()
