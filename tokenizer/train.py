"""Train a SentencePiece BPE tokenizer on raw corpora of any size (Baichuan-7B's recipe by default).

    python -m tokenizer.train --input data/ more/*.jsonl.gz --output_dir tok --vocab_size 64000

Defaults follow Baichuan-7B: BPE, vocab 64000, numbers split into single digits, byte fallback for rare characters,
no Unicode normalisation, whitespace kept as is (no collapsing, whitespace-only pieces allowed, so indented code
survives), pieces of at most 16 characters, character coverage 0.9999, and <unk>=0, <s>=1, </s>=2 (then the optional
<pad> and user-defined symbols).

Every line of a document is one training sentence, exactly as written (indentation, tabs and repeated spaces kept;
over-long lines cut), and the corpus is streamed once into a uniform sample of at most --max_sentences sentences,
so memory is bounded by the sample, not the corpus (see tokenizer/sampling.py). Files are read by parallel worker
processes and SentencePiece trains on all cores.

Writes into --output_dir: tokenizer.model, tokenizer.vocab, tokenizer_card.json (every setting, the corpus
statistics and what was skipped) and Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that transformers.AutoTokenizer loads with the same ids. tokenizer.vocab (SentencePiece's
"piece<TAB>score" listing) is for reading only: pieces made of tabs, learned from indented code, break its format;
tokenizer.model is the tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil
import sentencepiece as spm
from tqdm import tqdm

from common import cli, reflect
from common.errors import UserError
from common.io import replace_file
from tokenizer.corpus import resolve_inputs
from tokenizer.hf import HF_FILES, load_model_proto, save_hf_tokenizer
from tokenizer.sampling import SampleSpec, SamplingStats, drain, sample_sentences
from tokenizer.tokenizer import MODEL_FILENAME, Tokenizer

CARD_FILENAME = "tokenizer_card.json"
VOCAB_FILENAME = "tokenizer.vocab"


@dataclass
class TrainerConfig:
    """Everything that decides the trained tokenizer; saved verbatim in the card."""

    input: list[str]
    """Corpus files, directories (searched recursively) or globs; .txt, .jsonl and their .gz."""
    output_dir: str
    """Directory that receives tokenizer.model, tokenizer.vocab, the card and the Hugging Face files."""
    vocab_size: int = 64000
    """Total vocabulary size, special tokens and the 256 byte pieces included."""
    text_field: str = "text"
    """Key of the document text in .jsonl records."""
    max_piece_length: int = 16
    """Longest piece, in characters (SentencePiece max_sentencepiece_length)."""
    character_coverage: float = 0.9999
    """Fraction of the corpus's characters that get their own piece; the rarest rest use byte fallback."""
    split_digits: bool = True
    """Split every number into single digits (no multi-digit pieces)."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as their UTF-8 bytes instead of <unk>."""
    pad: bool = False
    """Add a <pad> control token (id 3); without it pad_id is -1."""
    user_defined_symbols: list[str] = field(default_factory=list)
    """Extra pieces always kept whole (e.g. chat markers), placed after the special tokens."""
    max_sentences: int = 5_000_000
    """Size of the uniform sentence sample fed to the trainer. Memory grows with the sample's characters: about
    60 bytes each on a mostly Chinese sample (41M characters took 2.4 GiB), far less on English or code."""
    max_sentence_bytes: int = 8192
    """Longer lines are cut into sentences of at most this many UTF-8 bytes."""
    seed: int = 0
    """Seed of the sentence sample."""
    num_threads: int = 0
    """Trainer threads; 0 means all cores."""
    num_workers: int = 0
    """Processes reading corpus files in parallel (one file each at a time); 0 means all cores when the corpus is
    big enough to repay starting them (PARALLEL_READ_MIN_BYTES on disk), else 1."""
    overwrite: bool = False
    """Replace an existing tokenizer in output_dir."""

    def __post_init__(self) -> None:
        if not self.input:
            raise UserError("no --input given")
        for name in ("vocab_size", "max_piece_length", "max_sentences", "max_sentence_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"--{name} must be a positive integer, got {value!r}")
        if self.max_sentence_bytes < 16:
            raise UserError(f"--max_sentence_bytes must be at least 16, got {self.max_sentence_bytes}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise UserError(f"--character_coverage must be in (0, 1], got {self.character_coverage}")
        for name in ("num_threads", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for sym in self.user_defined_symbols:
            if not sym or any(c.isspace() for c in sym):
                raise UserError(f"user-defined symbol {sym!r} must be non-empty and contain no whitespace")
        if len(set(self.user_defined_symbols)) != len(self.user_defined_symbols):
            raise UserError(f"duplicate user-defined symbols: {self.user_defined_symbols}")


# ---------------------------------------------------------------------------------------------------------------------
# SentencePiece


def sentencepiece_options(cfg: TrainerConfig) -> dict:
    """The SentencePieceTrainer options for `cfg` (all of them also go into the card)."""
    return dict(
        model_type="bpe",
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        split_digits=cfg.split_digits,
        byte_fallback=cfg.byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,  # LLaMA/Baichuan: a leading "▁" so the first word tokenizes like the others
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentencepiece_length=cfg.max_piece_length,
        max_sentence_length=cfg.max_sentence_bytes,
        input_sentence_size=0,  # sampling already happened, feed everything
        shuffle_input_sentence=False,
        num_threads=cfg.num_threads or os.cpu_count() or 1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3 if cfg.pad else -1,
        user_defined_symbols=cfg.user_defined_symbols,
        hard_vocab_limit=True,
        vocabulary_output_piece_score=True,
    )


_ALPHABET = re.compile(r"Alphabet size=(\d+)")
_META = re.compile(r"Adding meta_piece")
_MERGED = re.compile(r"merges=(\d+)")
_SP_LOG = re.compile(  # SentencePiece's info/error log (warnings pass through) and the trainer spec it prints first
    r"^[IEF]\d{4} |^WARNING: All log messages before absl|^(trainer|normalizer|denormalizer)_spec|^  |^}"
    r"|contains escaped characters that break the format of"  # tab pieces in tokenizer.vocab, see module doc
    r"|Too many sentences are loaded|--input_sentence_size=<size>|randomly sample <size> sentences"  # sampled already
)


@contextmanager
def _sentencepiece_progress(vocab_size: int, enabled: bool, verbose: bool) -> Iterator[list[str]]:
    """Turn SentencePiece's C++ log (written to fd 2) into a tqdm bar of merges; yields the captured log lines.

    fd 2 is redirected to a pipe read by a thread (the trainer releases the GIL, so the reader keeps up); anything
    that is not SentencePiece's log is passed through to the real stderr.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    real_stderr: TextIO = os.fdopen(os.dup(saved), "w", buffering=1)
    bar = tqdm(total=vocab_size, desc="training BPE", unit=" pieces", disable=not enabled, file=real_stderr,
               dynamic_ncols=True)
    base = {"meta": 0, "alphabet": 0}

    def read() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as pipe:
            for line in pipe:
                lines.append(line.rstrip("\n"))
                if verbose or not _SP_LOG.search(line):
                    bar.write(line.rstrip("\n"), file=real_stderr)
                if _META.search(line):
                    base["meta"] += 1
                elif m := _ALPHABET.search(line):
                    base["alphabet"] = int(m.group(1))
                    bar.update(base["meta"] + base["alphabet"] - bar.n)
                elif m := _MERGED.search(line):
                    bar.update(base["meta"] + base["alphabet"] + int(m.group(1)) - bar.n)
                elif "Saving model" in line:  # merges are logged every 100 only
                    bar.update(bar.total - bar.n)

    os.dup2(write_fd, 2)
    os.close(write_fd)
    reader = threading.Thread(target=read, name="sentencepiece-log", daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        os.dup2(saved, 2)  # closes the pipe's last write end, so the reader sees EOF
        os.close(saved)
        reader.join()
        bar.close()
        real_stderr.close()


def _sentencepiece_error(e: Exception, log: list[str], cfg: TrainerConfig) -> Exception:
    """A one-line, actionable message for a SentencePiece training failure the settings cause (a UserError);
    any other failure stays a RuntimeError with SentencePiece's last line, and keeps its traceback."""
    text = " ".join([str(e)] + log[-5:])
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text):
        return UserError(
            f"--vocab_size {cfg.vocab_size} is too small: the corpus needs {m.group(2)} vocabulary entries for its "
            f"characters and special/byte pieces at --character_coverage {cfg.character_coverage}; "
            "raise --vocab_size or lower --character_coverage"
        )
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return UserError(
            f"--vocab_size {cfg.vocab_size} is too large for this corpus sample (at most {m.group(2)} pieces can be "
            "learned); lower --vocab_size or add more text"
        )
    last = str(e).strip().splitlines()[-1] if str(e).strip() else (log[-1] if log else type(e).__name__)
    return RuntimeError(f"SentencePiece training failed: {last}")


def train_sentencepiece(sentences: Iterable[str], cfg: TrainerConfig, model_prefix: Path,
                        progress: bool = True, verbose: bool = False) -> None:
    """Run SentencePieceTrainer on `sentences`, writing model_prefix.model and model_prefix.vocab."""
    with _sentencepiece_progress(cfg.vocab_size, progress, verbose) as log:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=str(model_prefix), **sentencepiece_options(cfg)
            )
        except (RuntimeError, OSError) as e:
            error = e
        else:
            error = None
    if error is not None:
        raise _sentencepiece_error(error, log, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# The whole run


def _prepare_output_dir(cfg: TrainerConfig) -> tuple[Path, Path, bool]:
    """Check output_dir is writable (before any long work) and make a private temp dir inside it.

    Returns (output dir, temp dir, whether the output dir was created here).
    """
    out = Path(cfg.output_dir)
    if (out / MODEL_FILENAME).exists() and not cfg.overwrite:
        raise UserError(f"{out / MODEL_FILENAME} already exists; pass --overwrite or choose another --output_dir")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer-tmp-"))
    except OSError as e:
        raise UserError(
            f"{out}: cannot write the output directory ({e.strerror or e}); choose another --output_dir"
        ) from None
    return out, tmp, created


BYTES_PER_SAMPLE_CHAR = 80
"""Rough SentencePiece BPE trainer memory per sampled character (measured ~60 on Chinese poetry; an upper guess)."""


def _warn_if_memory_short(sampling: SamplingStats) -> None:
    """Warn before training (not after an hour of it) when the sample likely does not fit in memory."""
    need = sampling.sample_characters * BYTES_PER_SAMPLE_CHAR
    available = psutil.virtual_memory().available
    if need > available:
        print(
            f"warning: training on {sampling.sample_characters:,} sampled characters may need about "
            f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available; if it runs out of memory, "
            "lower --max_sentences",
            file=sys.stderr,
        )


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # macOS reports bytes


def train_tokenizer(cfg: TrainerConfig, progress: bool = True, verbose: bool = False) -> dict:
    """Train, export and document a tokenizer as described by `cfg`; returns the card that was written.

    progress shows bars and a corpus summary on stderr; verbose also passes SentencePiece's own log through.
    """
    files = resolve_inputs(cfg.input)
    out, tmp, created = _prepare_output_dir(cfg)
    done = False
    try:
        t0 = time.perf_counter()
        spec = SampleSpec(cfg.max_sentences, cfg.max_sentence_bytes, cfg.text_field, cfg.seed)
        sample, corpus, sampling = sample_sentences(files, spec, cfg.num_workers, progress)
        t_read = time.perf_counter() - t0
        if sampling.sentences_sampled == 0:
            raise UserError(f"the corpus holds no text ({corpus.summary()}); check --input and --text_field")
        if progress:
            print(f"corpus: {corpus.summary()}", file=sys.stderr)
            cut = f", {sampling.lines_cut:,} long lines cut" if sampling.lines_cut else ""
            print(f"sampled {sampling.sentences_sampled:,} of {sampling.sentences_seen:,} sentences "
                  f"({sampling.sample_characters:,} characters{cut})", file=sys.stderr)
        _warn_if_memory_short(sampling)

        t0 = time.perf_counter()
        train_sentencepiece(drain(sample), cfg, tmp / "tokenizer", progress, verbose)
        t_train = time.perf_counter() - t0

        # Record a stable model_prefix rather than the temp path SentencePiece saw.
        proto = load_model_proto(tmp / MODEL_FILENAME)
        proto.trainer_spec.model_prefix = "tokenizer"
        (tmp / MODEL_FILENAME).write_bytes(proto.SerializeToString())
        tok = Tokenizer(tmp / MODEL_FILENAME)
        save_hf_tokenizer(tmp / MODEL_FILENAME, tmp)

        options = sentencepiece_options(cfg)
        card = {
            "tokenizer": {
                "vocab_size": tok.vocab_size,
                "sha256": tok.sha256,
                "unk_id": tok.unk_id,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "pad_id": tok.pad_id,
                "user_defined_symbols": cfg.user_defined_symbols,
                "files": sorted({MODEL_FILENAME, VOCAB_FILENAME, CARD_FILENAME, *HF_FILES}),
            },
            "settings": dataclasses.asdict(cfg),
            "sentencepiece_options": options,
            "corpus": {**corpus.to_dict(), "input_files": [str(p) for p in files]},
            "sampling": dataclasses.asdict(sampling),
            "training": {
                "read_seconds": round(t_read, 2),
                "train_seconds": round(t_train, 2),
                "peak_rss_mib": _peak_rss_mib(),
                "num_threads": options["num_threads"],
                "sentencepiece_version": spm.__version__,
                "python": platform.python_version(),
                "machine": platform.platform(),
            },
        }
        (tmp / CARD_FILENAME).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        # Move finished files into place, tokenizer.model last: its presence means the rest is there too.
        for name in sorted(card["tokenizer"]["files"], key=lambda n: n == MODEL_FILENAME):
            replace_file(tmp / name, out / name)
        done = True
        return card
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)  # leave no empty output dir behind a failed run


def parse_args(argv: list[str] | None = None) -> tuple[TrainerConfig, argparse.Namespace]:
    p = cli.parser("python -m tokenizer.train",
                   "Train a SentencePiece BPE tokenizer (Baichuan-7B recipe) on .txt/.jsonl(.gz) corpora.")
    reflect.add_dataclass_args(p, TrainerConfig, required=("input", "output_dir"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    args = p.parse_args(argv)
    return reflect.dataclass_from_args(TrainerConfig, args), args


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    card = train_tokenizer(cfg, progress=not args.quiet, verbose=args.verbose)
    t = card["training"]
    print(
        f"wrote {Path(cfg.output_dir) / MODEL_FILENAME} (vocab {card['tokenizer']['vocab_size']}, "
        f"sha256 {card['tokenizer']['sha256'][:12]}) in {t['read_seconds'] + t['train_seconds']:.0f}s, "
        f"peak memory {t['peak_rss_mib']} MiB"
    )


if __name__ == "__main__":
    main()
