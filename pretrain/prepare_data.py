"""Tokenize raw corpora into fixed-size binary token shards, a document index and a manifest.

    python -m pretrain.prepare_data --tokenizer tokenizer.model --input corpus/ --output_dir data/prepared

The output directory's format (shards, document index, manifest.json) is described in pretrain/shards.py.

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
from typing import Any

import numpy as np
from tqdm import tqdm

from common import cli, reflect
from common.cli import entry_point
from common.errors import UserError
from common.io import atomic_write, write_json
from pretrain.shards import (FORMAT_VERSION, MANIFEST, SPLITS, STATE, STREAM_START, TOKENIZER_COPY,
                             Position, ShardWriter, build_manifest, check_shard, choose_dtype, write_manifest)
from tokenizer import Tokenizer
from tokenizer.corpus import CorpusStats, iter_documents, resolve_inputs

SAVE_EVERY_SECONDS = 60.0
"""How often the resume state is saved besides at every finished shard."""
CHUNK_CHARS = 1 << 20
"""Characters of text sent to a tokenizer worker at a time: big enough to amortise the hand-off, small enough that
a few chunks in flight per worker stay a few MB."""


def is_val_document(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its text, not its position."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"val-split").digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


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
    """Tokenizer processes (1: tokenize in this process; default: every core). Does not change the output."""
    overwrite: bool = False
    """Delete data prepared earlier in output_dir with different inputs or settings instead of refusing."""
    progress: bool = True
    """Show a progress bar (tokens per second) on stderr."""

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise UserError(f"--shard_tokens must be positive, got {self.shard_tokens}")
        if self.num_workers <= 0:
            raise UserError(f"--num_workers must be positive, got {self.num_workers}")


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
            raise UserError(
                f"{out} already holds prepared data without a {STATE} to resume from; "
                "pass --overwrite to replace it or choose another --output_dir"
            )
        return None
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{state_path}: unreadable resume state ({e}); pass --overwrite to start over") from None
    old = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
    if changed:
        raise UserError(
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
        raise UserError(f"{tok.path}: the tokenizer has no EOS token, which marks document ends; use one that has")
    if cfg.bos and tok.bos_id < 0:
        raise UserError(f"{tok.path}: --bos given but the tokenizer has no BOS token")
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
        write_json(out / STATE, {
            "fingerprint": fingerprint,
            "complete": complete,
            "splits": {s: w.checkpoint() for s, w in writers.items()},
            "file_stats": {str(k): v for k, v in sorted(file_stats.items())},
        }, indent=1)

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
        raise UserError(f"no training documents in {', '.join(cfg.inputs)} ({stats.summary()}); "
                        "check the paths, --text_field and --val_fraction")
    if cfg.val_fraction > 0 and writers["val"].num_tokens == 0:
        print(f"warning: no document fell into the val split (val_fraction={cfg.val_fraction}); "
              "the corpus is too small for it", file=sys.stderr)
    copy = out / TOKENIZER_COPY
    if not (copy.exists() and copy.samefile(tok.path)):
        with atomic_write(copy, "wb") as f, open(tok.path, "rb") as source:
            shutil.copyfileobj(source, f)
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


@entry_point
def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("python -m pretrain.prepare_data", __doc__.split("\n\n")[0])
    reflect.add_dataclass_args(p, PrepareConfig, required=("tokenizer", "inputs", "output_dir"),
                           rename={"inputs": "input"})
    args = p.parse_args(argv)
    try:
        prepare(reflect.dataclass_from_args(PrepareConfig, args))
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
