"""Tiny model folders (Hugging Face layout, with a tokenizer) for the quantization and GGUF tests."""
from __future__ import annotations

from pathlib import Path

import torch

from fixtures_tokenizer import train_small, write_corpus
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

# in_features 64 and 128 take the int4 kernels' group sizes; out_features are multiples of 16 (the CPU kernel's).
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)


def tiny_tokenizer(root: Path) -> Tokenizer:
    train_small(write_corpus(root / "corpus", n=60), root / "tok", vocab_size=600)
    return Tokenizer(root / "tok")


def tiny_model_dir(root: Path, tok: Tokenizer, name: str = "hf", seed: int = 0,
                   **overrides) -> tuple[Path, Transformer]:
    """A random tiny model (vocab padded to a multiple of 16) saved as a Hugging Face folder with its tokenizer."""
    torch.manual_seed(seed)
    vocab = (tok.vocab_size + 15) // 16 * 16
    model = Transformer(ModelConfig.from_dict({**TINY, "vocab_size": vocab, **overrides})).eval()
    model.to_hf(root / name, tokenizer_path=tok.path)
    return root / name, model
