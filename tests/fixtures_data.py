"""Small, generated fixtures for the data pipeline tests: a corpus, a tiny SentencePiece model, synthetic shards."""
from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.shards import Position, ShardWriter, build_manifest, choose_dtype, write_manifest

_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew strange potions "
          "in old stone towers near rivers and mountains under bright stars").split()
_HANZI = "春江潮水连海平明月共生滟滟随波千万里何处无山川草木人间天地日月风云雨雪"


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return "".join(rng.choice(_HANZI) for _ in range(rng.randint(4, 16))) + "。"
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."


def make_documents(n: int, seed: int = 0) -> list[str]:
    """n distinct multi-line documents mixing English words and Chinese characters."""
    rng = random.Random(seed)
    return [f"Document {seed}-{i}.\n" + "\n".join(_sentence(rng) for _ in range(rng.randint(1, 6))) for i in range(n)]


def make_corpus(root: Path, seed: int = 0) -> Path:
    """A directory with one corpus file of each supported kind; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    docs = make_documents(240, seed)
    (root / "a.txt").write_text("\n\n".join(docs[:80]) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[80:160]))
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d, "source": "gen"}) + "\n" for d in docs[160:])
    return root


def train_tiny_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """A small byte-fallback BPE SentencePiece model (LLaMA-style special ids) trained on generated text."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "train.txt"
    text.write_text("\n".join(line for d in make_documents(400, seed=99) for line in d.splitlines()) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # keep newlines, as LLaMA does
        num_threads=1, minloglevel=2,
    )
    return out_dir / "tokenizer.model"


def write_synthetic(
    out_dir: Path,
    splits: dict[str, Sequence[np.ndarray]],
    vocab_size: int = 1 << 16,
    eos_id: int = 0,
    shard_tokens: int = 100,
    tokenizer_sha256: str = "0" * 64,
) -> Path:
    """A prepared directory holding the given documents (token arrays) per split, as prepare_data lays it out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = {}
    for split, docs in splits.items():
        writer = ShardWriter(out_dir, split, choose_dtype(vocab_size), shard_tokens)
        for i, doc in enumerate(docs):
            writer.add(doc, 0, i)
        writer.close(end=Position(1, 0, 0))
        shards[split] = writer.shards
    write_manifest(out_dir, build_manifest(
        tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size, bos_id=-1, eos_id=eos_id, bos=False,
        shard_tokens=shard_tokens, val_fraction=0.0, splits=shards,
    ))
    return out_dir


def counting_documents(lengths: Sequence[int], start: int = 0) -> list[np.ndarray]:
    """Documents whose tokens are consecutive integers: token value == its offset in the stream (plus start),
    so a batch reveals exactly which stream positions it holds."""
    bounds = np.cumsum([start, *lengths])
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
