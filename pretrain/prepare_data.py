"""Tokenize raw corpora into fixed-size binary token shards, a document index and a manifest.

    python -m pretrain.prepare_data --tokenizer tokenizer.model --input corpus/ --output_dir data/prepared

Output directory (format_version 1):
- ``{split}_{i:05d}.bin``: raw little-endian token ids, dtype in the manifest (uint16 when the vocabulary fits,
  else uint32). Every document ends with EOS (and starts with BOS with --bos). Documents run on from one shard into
  the next, so every shard of a split but its last holds exactly shard_tokens tokens and no tail is dropped.
- ``{split}_{i:05d}.idx``: int64 offsets, within the shard, of the documents that start in it.
- ``manifest.json``: tokenizer sha256, vocab size, dtype, token/document counts per split and shard, sources and
  corpus statistics. Written last: a directory without it is not (yet) a dataset.
- ``tokenizer.model``: a copy of the tokenizer, so training can take it from here.
- ``.prepare_state.json``: what is written so far and where each split continues in the input stream, to resume.

A document goes to the "val" split when a hash of its text falls under val_fraction: the split does not depend on
file order or worker count, and duplicated documents never straddle train and val.

Determinism: inputs are sorted, documents are read in order and tokenized in order-preserving chunks, so the bytes
written depend on the inputs and settings only, never on --num_workers.

Resuming: a shard becomes visible (os.replace of its .tmp files) only once complete. The state file is saved after
every finished shard and every SAVE_EVERY_SECONDS; it records the finished shards, how much of each shard being
filled is flushed, and where each split continues (input file, document, token within the document). A rerun with
the same arguments checks the finished shards (redoing a damaged one), cuts the .tmp files back to the state, skips
the documents already written without tokenizing them, and carries on.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from tokenizer import Tokenizer
from tokenizer.corpus import CorpusStats, iter_documents, resolve_inputs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = ".prepare_state.json"
TOKENIZER_COPY = "tokenizer.model"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<i8")
SAVE_EVERY_SECONDS = 60.0
"""How often the resume state is saved besides at every finished shard."""
CHUNK_CHARS = 1 << 20
"""Characters of text sent to a tokenizer worker at a time: big enough to amortise the hand-off, small enough that
a few chunks in flight per worker stay a few MB."""


def choose_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of the vocabulary (little-endian, as stored)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def is_val_document(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its text, not its position."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"val-split").digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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
        os.replace(idx_tmp, idx_path)
        os.replace(bin_tmp, bin_path)
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
    _write_json_atomic(Path(out_dir) / MANIFEST, manifest)


@dataclass
class PrepareConfig:
    """Settings of one prepare_data run (the command-line flags)."""

    tokenizer: str
    """SentencePiece tokenizer.model (or a directory holding one)."""
    inputs: list[str]
    """Corpus files, directories (searched recursively) or globs: .txt, .jsonl, .txt.gz, .jsonl.gz."""
    output_dir: str
    """Directory for the shards and manifest.json; rerunning with the same settings resumes or verifies."""
    val_fraction: float = 0.01
    """Fraction of documents held out for the validation split (chosen by a hash of the text); 0 disables it."""
    shard_tokens: int = 100_000_000
    """Tokens per shard (the last shard of each split is shorter)."""
    bos: bool = False
    """Also prepend BOS to every document (EOS is always appended)."""
    text_field: str = "text"
    """Key of the document text in .jsonl records."""
    num_workers: int = os.cpu_count() or 1
    """Tokenizer processes (1: tokenize in this process). Does not change the output."""
    overwrite: bool = False
    """Delete data prepared earlier in output_dir with different inputs or settings instead of refusing."""
    progress: bool = True
    """Show a progress bar (tokens per second) on stderr."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise ValueError(f"--shard_tokens must be positive, got {self.shard_tokens}")
        if self.num_workers <= 0:
            raise ValueError(f"--num_workers must be positive, got {self.num_workers}")


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str) -> Tokenizer:
    # One tokenizer per worker process, loaded on its first chunk; parallelism comes from the processes.
    return Tokenizer(path, num_threads=1)


@dataclass
class _Chunk:
    """A batch of consecutive documents for a tokenizer worker, and what it needs to know to process them."""

    tokenizer: str
    bos: bool
    dtype: str
    val_fraction: float
    resume: tuple[Position, ...]
    """Per split (in SPLITS order), where its writer continues: earlier documents of that split are skipped."""
    positions: list[tuple[int, int]]
    """(file, document) of each text."""
    texts: list[str]


def _encode_chunk(chunk: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split, filter and tokenize a chunk: per document its split (index into SPLITS, -1: already written), the
    tokens skipped at its start (resuming inside it) and its token count; and all the tokens, concatenated."""
    splits = np.zeros(len(chunk.texts), dtype=np.int64)
    skips = np.zeros(len(chunk.texts), dtype=np.int64)
    todo = []
    for i, (pos, text) in enumerate(zip(chunk.positions, chunk.texts)):
        split = int(is_val_document(text, chunk.val_fraction))  # index into SPLITS = ("train", "val")
        start = chunk.resume[split]
        if pos < start[:2]:
            splits[i] = -1  # in a finished shard, or in the checkpointed part of the one being filled
            continue
        splits[i] = split
        skips[i] = start.token if pos == start[:2] else 0
        todo.append(i)
    ids = _worker_tokenizer(chunk.tokenizer).encode_batch([chunk.texts[i] for i in todo], bos=chunk.bos, eos=True)
    lengths = np.zeros(len(chunk.texts), dtype=np.int64)
    for i, doc in zip(todo, ids):
        lengths[i] = len(doc) - skips[i]
    pieces = (doc[skips[i] :] for i, doc in zip(todo, ids))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=chunk.dtype, count=int(lengths.sum()))
    return splits, skips, lengths, flat


def _documents(
    files: Sequence[Path], first: Position, text_field: str, file_stats: dict[int, dict[str, int]], bar: tqdm
) -> Iterator[tuple[tuple[int, int], str]]:
    """((file, document), text) of every document from `first` on, in input order; counts each file's stats
    into file_stats once it is read to the end."""
    for fi in range(first.file, len(files)):
        bar.set_postfix_str(f"file {fi + 1}/{len(files)}", refresh=False)
        stats = CorpusStats()
        for di, text in enumerate(iter_documents(files[fi], text_field, stats)):
            if (fi, di) >= first[:2]:
                yield (fi, di), text
        file_stats[fi] = stats.to_dict()


def _chunks(docs: Iterable[tuple[tuple[int, int], str]], make: Callable[..., _Chunk]) -> Iterator[_Chunk]:
    positions: list[tuple[int, int]] = []
    texts: list[str] = []
    size = 0
    for pos, text in docs:
        positions.append(pos)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield make(positions=positions, texts=texts)
            positions, texts, size = [], [], 0
    if texts:
        yield make(positions=positions, texts=texts)


def _ordered_map(fn: Callable, items: Iterable, pool: Any, max_pending: int) -> Iterator[tuple[Any, Any]]:
    """Yield (item, fn(item)) in input order, with at most max_pending items in flight (Pool.imap reads its whole
    input ahead, which for a corpus means unbounded memory)."""
    if pool is None:
        for item in items:
            yield item, fn(item)
        return
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.apply_async(fn, (item,))))
        if len(pending) >= max_pending:
            item, result = pending.popleft()
            yield item, result.get()
    while pending:
        item, result = pending.popleft()
        yield item, result.get()


def _fingerprint(cfg: PrepareConfig, tok: Tokenizer, files: Sequence[Path]) -> dict[str, Any]:
    """Everything that determines the output bytes; a resume is refused when it differs."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": tok.sha256,
        "inputs": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "bos": cfg.bos,
        "text_field": cfg.text_field,
    }


def _remove_outputs(out: Path) -> None:
    """Delete what an earlier prepare_data run wrote into `out` (and nothing else)."""
    for name in (MANIFEST, STATE, TOKENIZER_COPY):
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        for path in out.glob(f"{split}_*"):
            if path.name.endswith((".bin", ".idx", ".tmp")):
                path.unlink()


def _load_state(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The resume state of an earlier run in `out` with the same fingerprint, or None to start afresh."""
    state_path = out / STATE
    if overwrite:
        _remove_outputs(out)
        return None
    if not state_path.exists():
        if (out / MANIFEST).exists() or any(out.glob("train_*.bin")):
            raise ValueError(
                f"{out} already holds prepared data without a {STATE} to resume from; "
                "pass --overwrite to replace it or choose another --output_dir"
            )
        return None
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{state_path}: unreadable resume state ({e}); pass --overwrite to start over") from None
    old = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
    if changed:
        raise ValueError(
            f"{out} was prepared with different {', '.join(changed)}; rerun with the original arguments to resume, "
            "pass --overwrite to start over, or choose another --output_dir"
        )
    return state


def _cut_damaged_shards(out: Path, splits: dict[str, dict[str, Any]], itemsize: int) -> bool:
    """Cut each split of a saved state back to before its first missing or damaged shard, which is then redone
    (later shards are rewritten identically). True if every shard was intact."""
    intact = True
    for info in splits.values():
        for i, shard in enumerate(info["shards"]):
            if check_shard(out, shard, itemsize) is not None:
                info["next"], info["shards"], info["partial"] = shard["start"], info["shards"][:i], None
                intact = False
                break
    return intact


def _tokenize(
    cfg: PrepareConfig,
    tok: Tokenizer,
    files: Sequence[Path],
    writers: dict[str, ShardWriter],
    file_stats: dict[int, dict[str, int]],
    save_state: Callable[[], None],
) -> None:
    """Stream the documents the writers still need through the tokenizer workers, in order, into the writers.

    This process only reads documents and appends tokens; the workers pick each document's split, drop what is
    already written and tokenize the rest."""
    resume = tuple(writers[s].position for s in SPLITS)
    make = functools.partial(_Chunk, str(tok.path), cfg.bos, next(iter(writers.values())).dtype.str,
                             cfg.val_fraction, resume)
    bar = tqdm(desc=f"tokenizing into {cfg.output_dir}", unit="tok", unit_scale=True, disable=not cfg.progress)
    chunks = _chunks(_documents(files, min(resume), cfg.text_field, file_stats, bar), make)
    pool = multiprocessing.get_context("spawn").Pool(cfg.num_workers) if cfg.num_workers > 1 else None
    last_save = time.perf_counter()
    try:
        for chunk, (splits, skips, lengths, flat) in _ordered_map(_encode_chunk, chunks, pool, 2 * cfg.num_workers + 2):
            ends = np.cumsum(lengths).tolist()
            for (fi, di), split, skip, a, b in zip(chunk.positions, splits.tolist(), skips.tolist(),
                                                    [0, *ends[:-1]], ends):
                if split >= 0:
                    writers[SPLITS[split]].add(flat[a:b], fi, di, skip)
            bar.update(len(flat))
            if time.perf_counter() - last_save > SAVE_EVERY_SECONDS:
                save_state()  # also between shards, so that a long shard is not redone from its start
                last_save = time.perf_counter()
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    for w in writers.values():
        w.close(end=Position(len(files), 0, 0))


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Tokenize cfg.inputs into shards in cfg.output_dir (resuming an interrupted run); return the manifest."""
    tok = Tokenizer(cfg.tokenizer)
    if tok.eos_id < 0:
        raise ValueError(f"{tok.path}: the tokenizer has no EOS token, which marks document ends; use one that has")
    if cfg.bos and tok.bos_id < 0:
        raise ValueError(f"{tok.path}: --bos given but the tokenizer has no BOS token")
    files = resolve_inputs(cfg.inputs)
    dtype = choose_dtype(tok.vocab_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(cfg, tok, files)
    state = _load_state(out, fingerprint, cfg.overwrite)

    splits: dict[str, dict[str, Any]] = {s: {"shards": [], "next": list(STREAM_START)} for s in SPLITS}
    file_stats: dict[int, dict[str, int]] = {}
    if state is not None:
        splits = state["splits"]
        file_stats = {int(k): v for k, v in state["file_stats"].items()}
        intact = _cut_damaged_shards(out, splits, dtype.itemsize)
        if intact and state.get("complete") and (out / MANIFEST).exists():
            print(f"{out}: already prepared and intact, nothing to do")
            return json.loads((out / MANIFEST).read_text())
        (out / MANIFEST).unlink(missing_ok=True)

    def save_state(complete: bool = False) -> None:
        _write_json_atomic(out / STATE, {
            "fingerprint": fingerprint,
            "complete": complete,
            "splits": {s: w.checkpoint() for s, w in writers.items()},
            "file_stats": {str(k): v for k, v in sorted(file_stats.items())},
        })

    writers = {
        s: ShardWriter(out, s, dtype, cfg.shard_tokens, info["shards"], Position(*info["next"]), info.get("partial"),
                       on_shard=save_state)
        for s, info in splits.items()
    }
    first_file = min(w.position for w in writers.values()).file
    for k in [k for k in file_stats if k >= first_file]:
        del file_stats[k]  # those files are read, and counted, again
    start_tokens = sum(w.num_tokens for w in writers.values())
    t0 = time.perf_counter()
    _tokenize(cfg, tok, files, writers, file_stats, save_state)
    elapsed = time.perf_counter() - t0

    stats = CorpusStats()
    for fi in sorted(file_stats):
        stats.merge(CorpusStats(**file_stats[fi]))
    if writers["train"].num_tokens == 0:
        raise ValueError(f"no training documents in {', '.join(cfg.inputs)} ({stats.summary()}); "
                         "check the paths, --text_field and --val_fraction")
    if cfg.val_fraction > 0 and writers["val"].num_tokens == 0:
        print(f"warning: no document fell into the val split (val_fraction={cfg.val_fraction}); "
              "the corpus is too small for it", file=sys.stderr)
    copy = out / TOKENIZER_COPY
    if not (copy.exists() and copy.samefile(tok.path)):
        shutil.copyfile(tok.path, copy.with_name(copy.name + ".tmp"))
        os.replace(copy.with_name(copy.name + ".tmp"), copy)
    manifest = build_manifest(
        tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, bos=cfg.bos,
        shard_tokens=cfg.shard_tokens, val_fraction=cfg.val_fraction,
        splits={s: w.shards for s, w in writers.items()},
        sources=[{"path": str(p), "bytes": p.stat().st_size} for p in files],
        stats=stats.to_dict(),
    )
    save_state(complete=True)
    write_manifest(out, manifest)
    new_tokens = manifest["num_tokens"] - start_tokens
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"{out}: train {train['num_tokens']:,} tokens / {train['num_documents']:,} documents, "
          f"val {val['num_tokens']:,} tokens / {val['num_documents']:,} documents ({stats.summary()}); "
          f"{new_tokens:,} tokens written in {elapsed:.1f}s ({new_tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fields = {f.name: f for f in dataclasses.fields(PrepareConfig)}
    p.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model (or a directory holding one)")
    p.add_argument("--input", nargs="+", required=True, dest="inputs", metavar="PATH",
                   help="corpus files, directories or globs (.txt, .jsonl, .txt.gz, .jsonl.gz)")
    p.add_argument("--output_dir", required=True, help="where to write shards and manifest.json")
    p.add_argument("--val_fraction", type=float, default=fields["val_fraction"].default,
                   help="fraction of documents held out for validation (default: %(default)s)")
    p.add_argument("--shard_tokens", type=int, default=fields["shard_tokens"].default,
                   help="tokens per shard (default: %(default)s)")
    p.add_argument("--bos", action="store_true", help="prepend BOS to every document (EOS is always appended)")
    p.add_argument("--text_field", default="text", help="text key of .jsonl records (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=fields["num_workers"].default,
                   help="tokenizer processes (default: all cores, %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace data prepared earlier with other settings")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    try:
        prepare(PrepareConfig(**vars(args)))
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished shards are kept; rerun the same command to resume")


if __name__ == "__main__":
    main()
