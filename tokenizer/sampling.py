"""Turn corpus files into a bounded, uniform sample of SentencePiece training sentences.

How documents become training sentences: every line of a document is one sentence, exactly as written
(indentation, tabs and repeated spaces kept); whitespace-only lines are dropped; a line longer than
max_sentence_bytes is cut at character boundaries into several sentences (SentencePiece would silently drop it).
Newlines themselves never reach the trainer, so "\\n" is encoded through byte fallback, as in LLaMA.

The corpus is streamed once. Each file keeps a reservoir (Li's Algorithm L) of at most max_sentences sentences;
the per-file samples are merged exactly (hypergeometric split), in file order, so the final sample is a uniform
sample of the whole corpus, bounded in memory, and the same whatever the number of reading processes.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from tqdm import tqdm

from tokenizer.corpus import CorpusStats, iter_documents

from common.errors import UserError

T = TypeVar("T")


@dataclass
class SamplingStats:
    """How the corpus was cut into sentences and sampled."""

    sentences_seen: int = 0
    """Non-blank lines (after cutting) read from the corpus."""
    sentences_sampled: int = 0
    """Sentences kept in the sample and fed to the trainer."""
    sample_characters: int = 0
    """Characters in the sampled sentences."""
    lines_cut: int = 0
    """Lines longer than max_sentence_bytes that were cut into several sentences."""


@dataclass(frozen=True)
class SampleSpec:
    """How to read and sample one corpus (picklable, for the reading processes)."""

    max_sentences: int
    """Size of the sample."""
    max_sentence_bytes: int
    """Longer lines are cut into sentences of at most this many UTF-8 bytes."""
    text_field: str = "text"
    """Key of the document text in .jsonl records."""
    seed: int = 0
    """Seed of the sample."""


def cut_utf8(line: str, max_bytes: int) -> list[str]:
    """Split `line` into pieces of at most `max_bytes` UTF-8 bytes without breaking a character."""
    data = line.encode("utf-8")
    pieces = []
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # continuation byte: back up to a character start
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


def document_sentences(doc: str, max_sentence_bytes: int, stats: SamplingStats | None = None) -> Iterator[str]:
    """The training sentences of one document (see module doc)."""
    for line in doc.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        # At most 4 UTF-8 bytes per character, so most lines skip the encode.
        if len(line) * 4 <= max_sentence_bytes or len(line.encode("utf-8")) <= max_sentence_bytes:
            yield line
            continue
        if stats is not None:
            stats.lines_cut += 1
        yield from cut_utf8(line, max_sentence_bytes)


class Reservoir(Generic[T]):
    """A uniform random sample of at most `capacity` items from a stream of unknown length (Li's Algorithm L).

    Instead of a random draw per item it draws how many items to skip before the next replacement, so the cost
    per item read is one comparison.
    """

    def __init__(self, capacity: int, seed: int | str = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"reservoir capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.items: list[T] = []
        self.seen = 0
        self._rng = random.Random(seed)
        self._log_w = 0.0
        self._next = 0  # stream index of the next item that replaces a sampled one

    def _uniform(self) -> float:
        return self._rng.random() or 1e-300  # in (0, 1), so the logs stay finite

    def _schedule(self) -> None:
        # Keep log(W), not W: for a big capacity W rounds to 1.0 and log(1 - W) would be -inf.
        self._log_w += math.log(self._uniform()) / self.capacity
        self._next += math.floor(math.log(self._uniform()) / math.log(-math.expm1(self._log_w))) + 1

    def add(self, item: T) -> None:
        if len(self.items) < self.capacity:
            self.items.append(item)
            if len(self.items) == self.capacity:
                self._next = self.seen
                self._schedule()
        elif self.seen == self._next:
            self.items[self._rng.randrange(self.capacity)] = item
            self._schedule()
        self.seen += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)


def merge_samples(a: list[T], seen_a: int, b: list[T], seen_b: int, capacity: int,
                  rng: np.random.Generator) -> list[T]:
    """A uniform sample of min(capacity, seen_a + seen_b) items of two disjoint streams, from uniform samples of each.

    How many items come from the first stream is hypergeometric; given that count, a uniform subset of a uniform
    sample of a stream is a uniform sample of that stream.
    """
    k = min(capacity, seen_a + seen_b)
    if seen_a == 0 or seen_b == 0:
        take_a = min(k, seen_a)
    elif seen_a + seen_b < 10**9:  # numpy's exact hypergeometric sampler needs populations below 1e9
        take_a = int(rng.hypergeometric(seen_a, seen_b, k))
    else:  # without-replacement effects are negligible at this size
        take_a = int(np.clip(rng.binomial(k, seen_a / (seen_a + seen_b)), k - seen_b, seen_a))
    keep_a = a if take_a == len(a) else [a[i] for i in rng.choice(len(a), take_a, replace=False)]
    keep_b = b if k - take_a == len(b) else [b[i] for i in rng.choice(len(b), k - take_a, replace=False)]
    return keep_a + keep_b


def drain(items: list[T]) -> Iterator[T]:
    """Yield the items, releasing each as it goes, so that a consumer that copies them does not double memory."""
    for i in range(len(items)):
        item, items[i] = items[i], None  # type: ignore[call-overload]
        yield item


@dataclass
class FileSample:
    """What one worker returns for one file."""

    sentences: list[str]
    """Uniform sample of the file's sentences."""
    seen: int
    """Sentences the file holds."""
    corpus: CorpusStats
    """What was read from the file and skipped."""
    lines_cut: int
    """Long lines cut into several sentences."""


PARALLEL_READ_MIN_BYTES = 64 << 20
"""Corpora smaller than this on disk are read in-process: starting worker processes costs about a second."""
_PROGRESS_EVERY = 1000
"""Documents a worker reads between two progress reports."""
_worker_docs = None
"""In a worker process: the multiprocessing.Value counting documents read, shared with the parent (set by
_init_worker, the standard way to hand pool workers a shared object)."""


def _init_worker(counter) -> None:
    global _worker_docs
    _worker_docs = counter


def _report_docs(n: int) -> None:
    if _worker_docs is not None:
        with _worker_docs.get_lock():
            _worker_docs.value += n


def sample_file(path: Path, index: int, spec: SampleSpec, on_docs: Callable[[int], object] = _report_docs
                ) -> FileSample:
    """Read one corpus file and keep a uniform sample of up to spec.max_sentences of its sentences.

    The sample's seed depends only on spec.seed and the file's index, so the result does not depend on which
    process reads which file.
    """
    corpus, sampling = CorpusStats(), SamplingStats()
    reservoir: Reservoir[str] = Reservoir(spec.max_sentences, seed=f"{spec.seed}:{index}")
    unreported = 0
    for doc in iter_documents(path, spec.text_field, corpus):
        reservoir.extend(document_sentences(doc, spec.max_sentence_bytes, sampling))
        unreported += 1
        if unreported == _PROGRESS_EVERY:
            on_docs(unreported)
            unreported = 0
    on_docs(unreported)
    return FileSample(reservoir.items, reservoir.seen, corpus, sampling.lines_cut)


def _wait(future: Future, counter, bar: tqdm) -> FileSample:
    while True:
        try:
            return future.result(timeout=0.2)  # a worker that dies raises BrokenProcessPool instead of hanging
        except FutureTimeout:
            pass
        finally:
            bar.update(counter.value - bar.n)


def _sample_in_workers(files: list[Path], spec: SampleSpec, workers: int, add: Callable[[FileSample], None],
                       bar: tqdm) -> None:
    """Run sample_file over `files` in worker processes, handing the results to `add` in file order."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    counter = ctx.Value("q", 0)
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
            # At most two files in flight per worker: finished samples wait in memory until merged in order.
            pending: deque[Future] = deque()
            for i, path in enumerate(files):
                pending.append(pool.submit(sample_file, path, i, spec))
                while len(pending) > 2 * workers:
                    add(_wait(pending.popleft(), counter, bar))
            while pending:
                add(_wait(pending.popleft(), counter, bar))
    except BrokenProcessPool:
        raise UserError(
            "a corpus reading process died (out of memory?); retry with --num_workers 1 or a smaller --max_sentences"
        ) from None


def sample_sentences(
    files: list[Path], spec: SampleSpec, num_workers: int = 0, progress: bool = True
) -> tuple[list[str], CorpusStats, SamplingStats]:
    """Stream every document of `files` once and keep a uniform sample of spec.max_sentences sentences.

    num_workers processes read files in parallel; 0 means all cores when the files total PARALLEL_READ_MIN_BYTES
    on disk, else 1.
    """
    corpus, sampling = CorpusStats(), SamplingStats()
    sample: list[str] = []
    rng = np.random.default_rng(spec.seed)

    def add(part: FileSample) -> None:
        nonlocal sample
        sample = merge_samples(sample, sampling.sentences_seen, part.sentences, part.seen, spec.max_sentences, rng)
        sampling.sentences_seen += part.seen
        sampling.lines_cut += part.lines_cut
        corpus.merge(part.corpus)
        bar.set_postfix_str(f"{corpus.files}/{len(files)} files", refresh=False)

    if num_workers:
        workers = num_workers
    else:
        big = sum(p.stat().st_size for p in files) >= PARALLEL_READ_MIN_BYTES
        workers = (os.cpu_count() or 1) if big else 1
    workers = min(workers, len(files))
    with tqdm(desc="reading corpus", unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1:
            for i, path in enumerate(files):
                add(sample_file(path, i, spec, bar.update))
        else:
            _sample_in_workers(files, spec, workers, add, bar)
    sampling.sentences_sampled = len(sample)
    sampling.sample_characters = sum(map(len, sample))
    return sample, corpus, sampling
