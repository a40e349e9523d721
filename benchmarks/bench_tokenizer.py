"""Tokenizer benchmark: training cost at vocab 64000 and held-out compression against the LLaMA tokenizer.

    python benchmarks/bench_tokenizer.py --corpus ../shared/data/corpus \\
        --llama ../shared/data/weights/llama2c_tokenizer.model --work_dir /tmp/bench_tokenizer

1. Splits every corpus file into a training part and a held-out part: documents are taken in blocks of (up to)
   --block consecutive documents and every --holdout_every-th block is held out, so held-out text is unseen
   (whole neighbouring paragraphs/poems, not interleaved lines of them). Files named in --exclude are left out
   (zh_poetry_sample.txt is a subset of zh_chinese_poetry.jsonl.gz: its text would leak into the held-out part).
2. Trains with the real CLI (python -m tokenizer.train) in a subprocess; reports wall time and peak memory.
3. Reports tokens per UTF-8 byte / per character on the held-out Chinese, English and code text for both tokenizers.
4. Checks that transformers.AutoTokenizer on the exported files gives SentencePiece's ids on held-out documents,
   and times batch encoding.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import Tokenizer  # noqa: E402
from tokenizer.corpus import iter_documents, resolve_inputs  # noqa: E402
from tokenizer.stats import compression_table, format_table  # noqa: E402


def split_corpus(corpus: Path, out: Path, block: int, every: int, exclude: set[str]) -> dict[str, list[Path]]:
    """Write train/<name>.jsonl and heldout/<name>.jsonl for every corpus file; return held-out files by language."""
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    heldout: dict[str, list[Path]] = {"zh": [], "en": [], "code": []}
    for path in resolve_inputs([str(corpus)]):
        if path.name in exclude:
            print(f"excluded {path.name}")
            continue
        stem = path.name.split(".")[0]
        # Small files get smaller blocks, so that every file has at least ~20 held-out blocks.
        n_docs = sum(1 for _ in iter_documents(path))
        size = max(1, min(block, n_docs // (every * 20)))
        n_train = n_held = 0
        with open(out / "train" / f"{stem}.jsonl", "w") as ft, open(out / "heldout" / f"{stem}.jsonl", "w") as fh:
            for i, doc in enumerate(iter_documents(path)):
                held = (i // size) % every == every - 1
                (fh if held else ft).write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n_held += held
                n_train += not held
        print(f"{path.name}: {n_train:,} training / {n_held:,} held-out documents (blocks of {size})")
        lang = "zh" if stem.startswith("zh") else "code" if stem.startswith("code") else "en"
        heldout[lang].append(out / "heldout" / f"{stem}.jsonl")
    return heldout


def hf_parity(tok_dir: Path, files: list[Path], max_docs: int) -> tuple[int, int]:
    from transformers import AutoTokenizer

    sp = Tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    docs = [d for f in files for d in itertools.islice(iter_documents(f), max_docs)]
    ours = sp.encode_batch(docs)
    theirs = hf(docs, add_special_tokens=False)["input_ids"]
    return sum(a != b for a, b in zip(ours, theirs, strict=True)), len(docs)


def encode_speed(tok: Tokenizer, files: list[Path]) -> dict:
    docs = [d for f in files for d in iter_documents(f)]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    t0 = time.perf_counter()
    for d in docs:
        tok.encode(d)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok.encode_batch(docs)
    batch = time.perf_counter() - t0
    return {"MB": round(nbytes / 1e6, 1), "encode_loop_MB_s": round(nbytes / 1e6 / one, 2),
            "encode_batch_MB_s": round(nbytes / 1e6 / batch, 2), "threads": tok.num_threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="../shared/data/corpus")
    p.add_argument("--llama", default="../shared/data/weights/llama2c_tokenizer.model")
    p.add_argument("--work_dir", default="/tmp/bench_tokenizer")
    p.add_argument("--vocab_size", type=int, default=64000)
    p.add_argument("--block", type=int, default=200, help="documents per hold-out block")
    p.add_argument("--holdout_every", type=int, default=10, help="hold out one block in this many")
    p.add_argument("--exclude", nargs="*", default=["zh_poetry_sample.txt"])
    p.add_argument("--skip_train", action="store_true", help="reuse the tokenizer already in work_dir/tokenizer")
    args = p.parse_args()
    work = Path(args.work_dir)
    results: dict = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}

    heldout = split_corpus(Path(args.corpus), work, args.block, args.holdout_every, set(args.exclude))
    tok_dir = work / "tokenizer"
    if not args.skip_train:
        cmd = [sys.executable, "-m", "tokenizer.train", "--input", str(work / "train"), "--output_dir", str(tok_dir),
               "--vocab_size", str(args.vocab_size), "--overwrite"]
        print("$", " ".join(cmd), flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        results["train_wall_seconds"] = round(time.perf_counter() - t0, 1)
        results["train_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
        results["train_peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
        # Other work on the machine stretches wall time: record the load it ran under.
        results["load_average_1min"] = [load_before, os.getloadavg()[0]]
    card = json.loads((tok_dir / "tokenizer_card.json").read_text())
    results["card"] = {k: card[k] for k in ("tokenizer", "corpus", "sampling", "training")}

    toks = {"ours": Tokenizer(tok_dir), "llama": Tokenizer(args.llama)}
    results["compression"] = {}
    for lang, files in heldout.items():
        rows, _ = compression_table(toks, files, progress=False)
        print(f"\nheld-out {lang}:\n{format_table(rows)}")
        results["compression"][lang] = [r.to_dict() for r in rows]
    mismatches, n = hf_parity(tok_dir, [f for fs in heldout.values() for f in fs], max_docs=3000)
    results["hf_parity"] = {"documents": n, "mismatches": mismatches}
    print(f"\ntransformers vs SentencePiece ids on {n} held-out documents: {mismatches} mismatches")
    results["encode_speed"] = encode_speed(toks["ours"], heldout["en"] + heldout["zh"])
    print("encode speed:", results["encode_speed"])
    keys = ("train_wall_seconds", "train_cpu_seconds", "train_peak_rss_mib", "load_average_1min")
    print("training:", {k: results.get(k) for k in keys}, card["training"])
    print("corpus:", card["corpus"]["documents"], "documents,", card["corpus"]["characters"], "characters;",
          "sampling:", card["sampling"])
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
