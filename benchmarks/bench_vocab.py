"""Vocabulary extension benchmark: the LLaMA tokenizer extended with Chinese pieces, against the original.

    python benchmarks/bench_vocab.py --corpus ../shared/data/corpus \\
        --llama ../shared/data/weights/llama2c_tokenizer.model --work_dir /tmp/bench_vocab

1. Splits the corpus into training and held-out parts exactly as benchmarks/bench_tokenizer.py does (blocks of
   documents, every 10th block held out; zh_poetry_sample.txt and the Python code left out).
2. Trains a Chinese tokenizer on the training part of zh_chinese_poetry with the real CLI (python -m
   tokenizer.train), the sample limited by --max_sentences so it finishes in seconds on one core.
3. Merges it into the LLaMA tokenizer (python -m tokenizer.merge).
4. Reports tokens per byte / per character on held-out Chinese and English for the original, the merged and the
   Chinese-only tokenizer (python -m tokenizer.stats), and checks that the merged tokenizer's Hugging Face files
   give SentencePiece's ids on held-out documents and that every original id keeps its piece.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tokenizer import hf_parity, split_corpus  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="../shared/data/corpus")
    p.add_argument("--llama", default="../shared/data/weights/llama2c_tokenizer.model")
    p.add_argument("--work_dir", default="/tmp/bench_vocab")
    p.add_argument("--vocab_size", type=int, default=20000, help="size of the Chinese tokenizer before merging")
    p.add_argument("--max_sentences", type=int, default=200000, help="training sample of the Chinese tokenizer")
    args = p.parse_args()
    work = Path(args.work_dir)
    held = split_corpus(Path(args.corpus), work / "split", 200, 10,
                        {"zh_poetry_sample.txt", "code_python_stdlib.jsonl.gz"})
    py = sys.executable
    train_s = run([py, "-m", "tokenizer.train", "--input", str(work / "split" / "train" / "zh_chinese_poetry.jsonl"),
                   "--output_dir", str(work / "zh"), "--vocab_size", str(args.vocab_size), "--max_sentences",
                   str(args.max_sentences), "--num_threads", "1", "--num_workers", "1", "--overwrite", "--quiet"])
    merge_s = run([py, "-m", "tokenizer.merge", "--base", args.llama, "--extra", str(work / "zh"), "--output_dir",
                   str(work / "merged"), "--overwrite"])
    files = [str(f) for f in held["zh"] + held["en"]]
    run([py, "-m", "tokenizer.stats", "--tokenizer", f"llama={args.llama}", "--tokenizer",
         f"llama+zh={work / 'merged'}", "--tokenizer", f"zh-only={work / 'zh'}", "--input", *files,
         "--output_json", str(work / "stats.json"), "--quiet"])
    old, new = Tokenizer(args.llama), Tokenizer(work / "merged")
    moved = sum(old.id_to_piece(i) != new.id_to_piece(i) for i in range(old.vocab_size))
    bad, n = hf_parity(work / "merged", held["zh"] + held["en"], 2000)
    print(f"train {train_s:.1f}s, merge {merge_s:.1f}s; vocab {old.vocab_size} -> {new.vocab_size}; "
          f"original ids whose piece changed: {moved}; HF ids differing from SentencePiece: {bad} of {n} documents")


if __name__ == "__main__":
    main()
