"""The token-shard format: what pretrain.prepare_data writes and pretrain.data reads, in one place.

Output directory (format_version 1):
- ``{split}_{i:05d}.bin``: raw little-endian token ids, dtype in the manifest (uint16 when the vocabulary fits,
  else uint32). Every document ends with EOS (and starts with BOS with --bos). Documents run on from one shard into
  the next, so every shard of a split but its last holds exactly shard_tokens tokens and no tail is dropped.
- ``{split}_{i:05d}.idx``: int64 offsets, within the shard, of the documents that start in it.
- ``manifest.json``: tokenizer sha256, vocab size, dtype, token/document counts per split and shard, sources and
  corpus statistics. Written last: a directory without it is not (yet) a dataset.
- ``tokenizer.model``: a copy of the tokenizer, so training can take it from here.
- ``.prepare_state.json``: what is written so far and where each split continues in the input stream, to resume.

A shard becomes visible (its .tmp files renamed into place) only once complete, and manifest.json is written last,
so a reader that finds a manifest finds every shard it lists.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.errors import MissingFileError, UserError
from common.io import replace_file, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = ".prepare_state.json"
TOKENIZER_COPY = "tokenizer.model"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<i8")

def choose_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of the vocabulary (little-endian, as stored)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise UserError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


class Position(NamedTuple):
    """A place in the input stream: the `token`-th token of the `doc`-th document of the `file`-th input file."""

    file: int
    doc: int
    token: int = 0


STREAM_START = Position(0, 0, 0)


def check_shard(data_dir: Path, shard: dict[str, Any], itemsize: int) -> str | None:
    """What is wrong with a shard's files on disk (missing or wrong size), or None if they look complete."""
    sizes = {"bin": shard["num_tokens"] * itemsize, "idx": shard["num_documents"] * INDEX_DTYPE.itemsize}
    for key, expected in sizes.items():
        path = data_dir / shard[key]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        if size != expected:
            return f"{path} is truncated or corrupt ({size} bytes, expected {expected})"
    return None


def check_shards(data_dir: Path, shards: Sequence[dict[str, Any]], itemsize: int) -> None:
    """A UserError for the first shard whose files are missing or not the size the manifest gives: a stat per
    file, so the launch preflight finds a truncated shard in milliseconds."""
    for shard in shards:
        problem = check_shard(data_dir, shard, itemsize)
        if problem:
            raise UserError(f"{problem}; rerun the prepare_data command that made {data_dir} to rebuild it")


class ShardWriter:
    """Appends documents to one split: fixed-size .bin shards plus .idx document offsets.

    The shard being filled lives in .bin.tmp/.idx.tmp files and is renamed into place only when complete, so a
    half-written shard never looks finished. `checkpoint()` flushes it and describes it, so that a writer created
    with that description (`resume`) truncates the .tmp files back to it and carries on. `on_shard` is called after
    each shard lands (prepare saves its resume state there).
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        shards: Sequence[dict[str, Any]] = (),
        next_start: Position = STREAM_START,
        partial: dict[str, Any] | None = None,
        on_shard: Callable[[], None] | None = None,
    ) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = list(shards)
        self.next_start = Position(*next_start)
        """Where in the input stream the shard being filled starts."""
        self.position = self.next_start
        """Where in the input stream this writer's next document comes from."""
        self.on_shard = on_shard
        self._bin: Any = None
        self._idx: Any = None
        self._count = 0
        self._docs = 0
        if partial is not None:
            self._reopen(partial)

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards) + self._count

    def _paths(self) -> tuple[Path, Path]:
        name = shard_name(self.split, len(self.shards))
        return self.out_dir / f"{name}.bin", self.out_dir / f"{name}.idx"

    def _tmp_paths(self) -> tuple[Path, Path]:
        return tuple(p.with_name(p.name + ".tmp") for p in self._paths())  # type: ignore[return-value]

    def _open(self, mode: str) -> None:
        self._bin, self._idx = (open(p, mode) for p in self._tmp_paths())

    def _reopen(self, partial: dict[str, Any]) -> None:
        """Continue the shard being filled from a checkpoint, if its .tmp files still hold what it recorded."""
        tokens, docs = partial["num_tokens"], partial["num_documents"]
        sizes = (tokens * self.dtype.itemsize, docs * INDEX_DTYPE.itemsize)
        paths = self._tmp_paths()
        if all(p.exists() and p.stat().st_size >= n for p, n in zip(paths, sizes)):
            self._open("r+b")
            for f, n in zip((self._bin, self._idx), sizes):
                f.truncate(n)
                f.seek(n)
            self._count, self._docs = tokens, docs
            self.position = Position(*partial["position"])
        # else: the .tmp files are gone or short; the shard is redone from next_start.

    def add(self, tokens: np.ndarray, file: int = 0, doc: int = 0, offset: int = 0) -> None:
        """Append `tokens`, which start at token `offset` of document `doc` of input `file` (0: a new document)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        if self._bin is None and len(tokens):
            self._open("wb")
        if offset == 0 and len(tokens):
            self._idx.write(np.int64(self._count).astype(INDEX_DTYPE).tobytes())
            self._docs += 1
        done = 0
        while done < len(tokens):
            if self._bin is None:
                self._open("wb")
            take = min(len(tokens) - done, self.shard_tokens - self._count)
            self._bin.write(tokens[done : done + take].tobytes())
            done += take
            self._count += take
            if self._count == self.shard_tokens:
                end = offset + done
                self._close_shard(Position(file, doc, end) if done < len(tokens) else Position(file, doc + 1, 0))
        self.position = Position(file, doc + 1, 0)

    def checkpoint(self) -> dict[str, Any]:
        """Flush, and describe everything written so far (finished shards and the one being filled)."""
        partial = None
        if self._bin is not None:
            self._bin.flush()
            self._idx.flush()
            partial = {"num_tokens": self._count, "num_documents": self._docs, "position": list(self.position)}
        return {"shards": self.shards, "next": list(self.next_start), "partial": partial}

    def close(self, end: Position) -> None:
        """Write the last, partial shard (if any); `end` is the position just past the input."""
        if self._count:
            self._close_shard(end)
        self.next_start = self.position = end

    def _close_shard(self, next_start: Position) -> None:
        bin_path, idx_path = self._paths()
        bin_tmp, idx_tmp = self._tmp_paths()
        self._bin.close()
        self._idx.close()
        self._bin = self._idx = None
        replace_file(idx_tmp, idx_path)
        replace_file(bin_tmp, bin_path)
        self.shards.append({
            "bin": bin_path.name,
            "idx": idx_path.name,
            "num_tokens": self._count,
            "num_documents": self._docs,
            "start": list(self.next_start),
        })
        self.next_start = self.position = next_start
        self._count = self._docs = 0
        if self.on_shard is not None:
            self.on_shard()


def build_manifest(
    *,
    tokenizer_sha256: str,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    bos: bool,
    shard_tokens: int,
    val_fraction: float,
    splits: dict[str, Sequence[dict[str, Any]]],
    sources: Sequence[dict[str, Any]] = (),
    stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The manifest.json of a prepared directory (also used to describe synthetic datasets in benchmarks)."""
    split_info = {}
    for name, shards in splits.items():
        split_info[name] = {
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards),
            "shards": [{k: s[k] for k in ("bin", "idx", "num_tokens", "num_documents")} for s in shards],
        }
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "dtype": choose_dtype(vocab_size).name,
        "bos": bos,
        "eos": True,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "num_tokens": sum(s["num_tokens"] for s in split_info.values()),
        "num_documents": sum(s["num_documents"] for s in split_info.values()),
        "splits": split_info,
        "sources": list(sources),
        "corpus_stats": stats or {},
    }


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically: the step that turns a directory of shards into a dataset."""
    write_json(Path(out_dir) / MANIFEST, manifest, indent=1)


def load_manifest(
    data_dir: str | os.PathLike, tokenizer_sha256: str | None = None, vocab_size: int | None = None
) -> dict[str, Any]:
    """Read and check DATA/manifest.json; optionally check it was made for the model's tokenizer and vocabulary."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise MissingFileError(f"{data_dir}: no such data directory; create it with "
                               f"python -m pretrain.prepare_data --output_dir {data_dir} ...")
    if not path.is_file():
        if (data_dir / STATE).exists():
            raise MissingFileError(f"{path} is missing: preparing {data_dir} was interrupted; "
                                   "rerun the same prepare_data command to finish it")
        raise MissingFileError(f"{path} is missing: {data_dir} is not a prepared dataset; "
                               f"run python -m pretrain.prepare_data --output_dir {data_dir} ... first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); rerun prepare_data to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}; "
                        "re-prepare the data with this version of prepare_data")
    for key in ("tokenizer_sha256", "vocab_size", "eos_id", "dtype", "splits"):
        if key not in manifest:
            raise UserError(f"{path}: missing key '{key}'; re-prepare the data with prepare_data")
    if manifest["dtype"] != choose_dtype(manifest["vocab_size"]).name:
        raise UserError(f"{path}: dtype {manifest['dtype']!r} does not match vocab_size {manifest['vocab_size']}")
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest["tokenizer_sha256"]:
        raise UserError(
            f"{path}: the data was tokenized with a different tokenizer (sha256 {manifest['tokenizer_sha256'][:12]}... "
            f"vs {tokenizer_sha256[:12]}...); train with {data_dir / 'tokenizer.model'} or re-prepare the data "
            "with your tokenizer"
        )
    if vocab_size is not None and vocab_size < manifest["vocab_size"]:
        raise UserError(
            f"{path}: token ids go up to vocab_size {manifest['vocab_size']} but the model's vocab_size is "
            f"{vocab_size}; set the model's vocab_size to at least {manifest['vocab_size']} or re-prepare the data"
        )
    return manifest
