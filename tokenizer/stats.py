"""Compare tokenizers' compression on corpora, side by side (the table Baichuan-7B publishes).

    python -m tokenizer.stats --tokenizer ours=tok/ --tokenizer llama=llama.model --input zh.txt en.txt

For every input file and tokenizer: tokens, tokens per UTF-8 byte and per character (lower is better), the share
of tokens that are byte-fallback pieces or <unk>, and how much of the vocabulary the text uses. Each document is
encoded on its own, as the data pipeline does (so each gets its dummy-prefix "▁"). --max_chars bounds the text read
per file so that huge corpora give a quick estimate.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import cli
from common.errors import UserError
from common.io import write_json
from tokenizer.corpus import CorpusStats, iter_documents, resolve_inputs
from tokenizer.tokenizer import Tokenizer

BATCH_DOCS = 1024


@dataclass
class Compression:
    """Compression of one tokenizer on one body of text."""

    tokenizer: str
    """Tokenizer name."""
    input: str
    """Input file, or "all" for the total over every input."""
    documents: int
    characters: int
    bytes: int
    tokens: int
    byte_fallback_tokens: int
    """Tokens that are <0xNN> byte pieces (characters missing from the vocabulary)."""
    unk_tokens: int
    vocab_used: int
    """Distinct token ids that occur in this text."""
    vocab_size: int

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / max(self.bytes, 1)

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / max(self.characters, 1)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_byte": round(self.tokens_per_byte, 4),
            "tokens_per_char": round(self.tokens_per_char, 4),
            "vocab_used_fraction": round(self.vocab_used / self.vocab_size, 4),
        }


class _Counter:
    """Running token statistics of one tokenizer on one text."""

    def __init__(self, tok: Tokenizer, byte_ids: np.ndarray) -> None:
        self.tok = tok
        self.byte_ids = byte_ids
        self.counts = np.zeros(tok.vocab_size, dtype=np.int64)
        self.docs = self.chars = self.bytes = 0

    def add(self, docs: list[str]) -> None:
        ids = self.tok.encode_batch(docs)
        flat = np.fromiter((i for seq in ids for i in seq), dtype=np.int64, count=sum(map(len, ids)))
        self.counts += np.bincount(flat, minlength=self.tok.vocab_size)
        self.docs += len(docs)
        self.chars += sum(map(len, docs))
        self.bytes += sum(len(d.encode("utf-8")) for d in docs)

    def result(self, name: str, input: str) -> Compression:
        unk = int(self.counts[self.tok.unk_id]) if self.tok.unk_id >= 0 else 0
        return Compression(
            tokenizer=name,
            input=input,
            documents=self.docs,
            characters=self.chars,
            bytes=self.bytes,
            tokens=int(self.counts.sum()),
            byte_fallback_tokens=int(self.counts[self.byte_ids].sum()),
            unk_tokens=unk,
            vocab_used=int((self.counts > 0).sum()),
            vocab_size=self.tok.vocab_size,
        )

    def merge(self, other: _Counter) -> None:
        self.counts += other.counts
        self.docs += other.docs
        self.chars += other.chars
        self.bytes += other.bytes


def _byte_ids(tok: Tokenizer) -> np.ndarray:
    return np.array([i for i in range(tok.vocab_size) if tok.sp.is_byte(i)], dtype=np.int64)


def _batches(path: Path, text_field: str, max_chars: int | None, stats: CorpusStats) -> Iterator[list[str]]:
    batch: list[str] = []
    budget = max_chars if max_chars is not None else float("inf")
    for doc in iter_documents(path, text_field, stats):
        if budget <= 0:
            break
        batch.append(doc)
        budget -= len(doc)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def compression_table(
    tokenizers: dict[str, Tokenizer],
    files: Sequence[Path],
    text_field: str = "text",
    max_chars: int | None = None,
    progress: bool = True,
) -> tuple[list[Compression], CorpusStats]:
    """Compression of every tokenizer on every file, plus an "all" row per tokenizer (when there are several files)."""
    byte_ids = {name: _byte_ids(tok) for name, tok in tokenizers.items()}
    totals = {name: _Counter(tok, byte_ids[name]) for name, tok in tokenizers.items()}
    rows: list[Compression] = []
    corpus = CorpusStats()
    with tqdm(desc="encoding", unit=" chars", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        for path in files:
            bar.set_postfix_str(path.name, refresh=False)
            counters = {name: _Counter(tok, byte_ids[name]) for name, tok in tokenizers.items()}
            for batch in _batches(path, text_field, max_chars, corpus):
                for counter in counters.values():
                    counter.add(batch)
                bar.update(sum(map(len, batch)))
            for name, counter in counters.items():
                rows.append(counter.result(name, str(path)))
                totals[name].merge(counter)
    if len(files) > 1:
        rows += [counter.result(name, "all") for name, counter in totals.items()]
    return rows, corpus


def format_table(rows: Sequence[Compression]) -> str:
    """A Markdown table of the rows."""
    header = ["input", "tokenizer", "vocab", "chars", "tokens", "tokens/byte", "tokens/char", "byte-fallback",
              "unk", "vocab used"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            Path(r.input).name if r.input != "all" else "all",
            r.tokenizer,
            f"{r.vocab_size:,}",
            f"{r.characters:,}",
            f"{r.tokens:,}",
            f"{r.tokens_per_byte:.4f}",
            f"{r.tokens_per_char:.4f}",
            f"{r.byte_fallback_tokens / max(r.tokens, 1):.2%}",
            f"{r.unk_tokens / max(r.tokens, 1):.2%}",
            f"{r.vocab_used:,} ({r.vocab_used / r.vocab_size:.1%})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_tokenizer_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' (named after its directory, or after the file when it is not tokenizer.model)."""
    name, sep, path = arg.partition("=")
    if sep and name and path and not Path(arg).exists():
        return name, path
    p = Path(arg)
    if p.is_dir() or p.name == "tokenizer.model":
        return (p if p.is_dir() else p.parent).resolve().name, arg
    return p.stem, arg


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = cli.parser("python -m tokenizer.stats",
                   "Tokens per byte / per character and vocabulary use of tokenizers on corpora, side by side.")
    p.add_argument("--tokenizer", action="extend", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="tokenizer.model files (or their directories), optionally named NAME=PATH; several to "
                        "compare (after one --tokenizer, or with the flag repeated)")
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt, .jsonl, .gz)")
    p.add_argument("--text_field", default="text", help="text key of .jsonl records")
    p.add_argument("--max_chars", type=int, default=None, help="read at most this many characters per file")
    p.add_argument("--output_json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.max_chars is not None and args.max_chars <= 0:
        raise UserError(f"--max_chars must be positive, got {args.max_chars}")
    tokenizers: dict[str, Tokenizer] = {}
    for arg in args.tokenizer:
        name, path = parse_tokenizer_arg(arg)
        if name in tokenizers:
            raise UserError(f"two tokenizers are named {name!r}; name them with --tokenizer NAME=PATH")
        tokenizers[name] = Tokenizer(path)
    files = resolve_inputs(args.input)
    rows, corpus = compression_table(tokenizers, files, args.text_field, args.max_chars, not args.quiet)
    if corpus.documents == 0:
        raise UserError(f"the inputs hold no text ({corpus.summary()}); check --input and --text_field")
    if args.output_json:
        out = Path(args.output_json)
        if not out.parent.is_dir():
            raise UserError(f"{out.parent}: no such directory for --output_json")
        payload = {"rows": [r.to_dict() for r in rows], "corpus": corpus.to_dict(),
                   "tokenizers": {n: {"path": str(t.path), "sha256": t.sha256} for n, t in tokenizers.items()}}
        write_json(out, payload)
    if corpus.skipped:
        print(f"skipped while reading: {corpus.summary()}", file=sys.stderr)
    print(format_table(rows))


if __name__ == "__main__":
    main()
