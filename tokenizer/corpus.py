"""Stream documents out of raw corpus files of any size, skipping (and counting) what cannot be read.

Formats, chosen by file name:
- ``.txt``: documents are separated by one or more blank (whitespace-only) lines; line breaks inside a document and
  all indentation are kept; ``\\r\\n`` becomes ``\\n`` and a UTF-8 BOM is dropped.
- ``.jsonl``: one JSON object per line, the document is the string under ``text_field``.
- ``.txt.gz`` / ``.jsonl.gz``: gzip of either, decompressed while streaming.

Nothing is read whole: files are consumed line by line with a bounded line length, so one pathological input
cannot exhaust memory. Bad content never raises; it is skipped and counted in a `CorpusStats`:
- a file that is empty, looks binary (NUL bytes in its first 8 KiB), is a corrupt/truncated gzip or cannot be read
  is skipped (a corrupt gzip keeps the documents read before the damage);
- a line with invalid UTF-8 or NUL bytes is dropped (a JSON record: the record is dropped);
- a ``.txt`` line longer than ``max_line_bytes`` is cut to that length (the rest of the line is discarded);
  a ``.jsonl`` record longer than that cannot be parsed when cut and is dropped;
- a ``.txt`` document that grows past ``max_document_chars`` is emitted in pieces of at most that size;
- JSON lines that do not parse, are not objects, or lack a non-empty string ``text_field`` are dropped.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from common.errors import UserError

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
DEFAULT_MAX_LINE_BYTES = 64 << 20
"""Longest line read (64 MiB): generous for whole-document JSON records, bounded against runaway files."""
DEFAULT_MAX_DOCUMENT_CHARS = 64 << 20
"""Largest .txt document (in characters) kept in memory before it is emitted in pieces."""
_BINARY_SNIFF_BYTES = 8192


@dataclass
class CorpusStats:
    """What was read from a corpus and what was skipped, and why."""

    files: int = 0
    """Input files opened."""
    documents: int = 0
    """Documents yielded."""
    characters: int = 0
    """Unicode characters in the yielded documents."""
    bytes: int = 0
    """UTF-8 bytes of the yielded documents."""
    skipped_empty_files: int = 0
    """Files with no content at all."""
    skipped_binary_files: int = 0
    """Files skipped because they look binary (NUL bytes near the start)."""
    skipped_unreadable_files: int = 0
    """Files that could not be read: permission errors, corrupt or truncated gzip (documents before the damage kept)."""
    skipped_undecodable_lines: int = 0
    """Lines (or JSON records) dropped for invalid UTF-8, NUL bytes or lone surrogates."""
    skipped_bad_json: int = 0
    """JSON lines that did not parse or were not JSON objects."""
    skipped_missing_field: int = 0
    """JSON records without a string text field."""
    skipped_empty_documents: int = 0
    """Documents (JSON records) whose text was empty or whitespace only."""
    skipped_long_records: int = 0
    """JSON records longer than max_line_bytes (cannot be parsed once cut)."""
    cut_long_lines: int = 0
    """Text lines cut to max_line_bytes."""
    split_documents: int = 0
    """Text documents longer than max_document_chars that were emitted in pieces."""

    def merge(self, other: CorpusStats) -> CorpusStats:
        """Add `other`'s counts into this one (in place) and return self."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def skipped(self) -> dict[str, int]:
        """The non-zero skip/cut counters."""
        return {
            k: v for k, v in self.to_dict().items() if v and k.startswith(("skipped_", "cut_", "split_"))
        }

    def summary(self) -> str:
        """One line for logs: what was read, then anything skipped."""
        line = f"{self.files} files, {self.documents:,} documents, {self.characters:,} characters"
        if self.skipped:
            line += "; " + ", ".join(f"{k}={v:,}" for k, v in self.skipped.items())
        return line


def is_supported(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def resolve_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (searched recursively) and globs into a sorted, deduplicated list of corpus files.

    Only .txt/.jsonl (optionally .gz) files are taken from directories and globs; an explicit file of another type,
    or an entry that matches no corpus file, raises a ValueError naming it.
    """
    found: set[Path] = set()
    for entry in paths:
        entry = str(entry)
        p = Path(entry).expanduser()
        if p.is_dir():
            matches = [q for q in p.rglob("*") if q.is_file() and is_supported(q)]
            where = f"directory {entry}"
        elif p.is_file():
            if not is_supported(p):
                raise UserError(f"{entry}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            matches = [p]
            where = entry
        elif glob.has_magic(entry):
            matches = [Path(q) for q in glob.glob(os.path.expanduser(entry), recursive=True)]
            matches = [q for q in matches if q.is_file() and is_supported(q)]
            where = f"glob {entry}"
        else:
            raise UserError(f"{entry}: no such file or directory")
        if not matches:
            raise UserError(f"{where}: matches no {'/'.join(SUFFIXES)} file")
        found.update(q.resolve() for q in matches)
    if not found:
        raise UserError("no input files given")
    return sorted(found)


def _read_lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (line without its newline, was_cut). A line over max_line_bytes is cut and the rest skipped unread."""
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1], False
            continue
        if len(line) <= max_line_bytes:  # last line of the file, without a newline
            yield line, False
            return
        # Enormous line: keep the first max_line_bytes, drain the rest in bounded chunks.
        while True:
            rest = f.readline(max_line_bytes)
            if not rest or rest.endswith(b"\n"):
                break
        yield line[:max_line_bytes], True


def _decode(line: bytes, stats: CorpusStats, cut: bool) -> str | None:
    if b"\x00" in line:
        stats.skipped_undecodable_lines += 1
        return None
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        # A cut can split a multi-byte character at the very end: drop that partial character, keep the line.
        if cut and e.start >= len(line) - 3 and e.reason == "unexpected end of data":
            return line[: e.start].decode("utf-8")
        stats.skipped_undecodable_lines += 1
        return None


def _txt_documents(
    f: IO[bytes], stats: CorpusStats, max_line_bytes: int, max_document_chars: int
) -> Iterator[str]:
    lines: list[str] = []
    size = 0
    first = True
    for raw, cut in _read_lines(f, max_line_bytes):
        if first:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 BOM
            first = False
        if cut:
            stats.cut_long_lines += 1
        line = _decode(raw, stats, cut)
        if line is None:
            continue
        line = line.removesuffix("\r")
        if not line.strip():
            if lines:
                yield "\n".join(lines)
                lines, size = [], 0
            continue
        lines.append(line)
        size += len(line) + 1
        while size > max_document_chars:
            # Emit bounded pieces of a runaway document; the remainder starts the next piece.
            text = "\n".join(lines)
            stats.split_documents += 1
            yield text[:max_document_chars]
            rest = text[max_document_chars:]
            lines, size = ([rest], len(rest)) if rest else ([], 0)
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(f: IO[bytes], text_field: str, stats: CorpusStats, max_line_bytes: int) -> Iterator[str]:
    for raw, cut in _read_lines(f, max_line_bytes):
        if cut:
            stats.skipped_long_records += 1
            continue
        if not raw.strip():
            continue
        if b"\x00" in raw:
            stats.skipped_undecodable_lines += 1
            continue
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            stats.skipped_undecodable_lines += 1
            continue
        except ValueError:
            stats.skipped_bad_json += 1
            continue
        if not isinstance(record, dict):
            stats.skipped_bad_json += 1
            continue
        text = record.get(text_field)
        if not isinstance(text, str):
            stats.skipped_missing_field += 1
            continue
        if not text.strip():
            stats.skipped_empty_documents += 1
            continue
        try:
            text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates that no tokenizer can encode
        except UnicodeEncodeError:
            stats.skipped_undecodable_lines += 1
            continue
        yield text


def iter_documents(
    path: str | os.PathLike,
    text_field: str = "text",
    stats: CorpusStats | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
) -> Iterator[str]:
    """Yield the documents of one corpus file, counting what was read and skipped into `stats` (see module doc)."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    stats.files += 1
    name = path.name.lower()
    try:
        raw = open(path, "rb")
    except OSError as e:
        logger.warning("skipping %s: %s", path, e.strerror or e)
        stats.skipped_unreadable_files += 1
        return
    with raw:
        f: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if name.endswith(".gz") else raw
        try:
            head = f.peek(_BINARY_SNIFF_BYTES)[:_BINARY_SNIFF_BYTES]
            if not head:
                stats.skipped_empty_files += 1
                return
            if b"\x00" in head:
                logger.warning("skipping %s: looks like a binary file", path)
                stats.skipped_binary_files += 1
                return
            if name.endswith((".jsonl", ".jsonl.gz")):
                docs = _jsonl_documents(f, text_field, stats, max_line_bytes)
            else:
                docs = _txt_documents(f, stats, max_line_bytes, max_document_chars)
            for doc in docs:
                stats.documents += 1
                stats.characters += len(doc)
                stats.bytes += len(doc.encode("utf-8"))
                yield doc
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            logger.warning("skipping the rest of %s: %s", path, e)
            stats.skipped_unreadable_files += 1
