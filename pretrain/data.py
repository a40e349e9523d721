"""Per-rank training batches from prepared token shards, with flat memory and exact resumption.

The token stream of a split (its shards, concatenated) is cut into windows of seq_len + 1 tokens that overlap by one
token, window i covering tokens [i * seq_len, i * seq_len + seq_len + 1): every token but the first is a target
exactly once per epoch, and the last, short window is padded (targets -100) rather than dropped. Windows pack
documents back to back; `position_ids` restart at every document start and `cu_seqlens` lists the document
boundaries, so attention can be kept within documents.

Global sample j (counting over all ranks and epochs) is window perm_e(j mod W) of epoch e = j // W, where perm_e is
a seeded pseudo-random permutation of the W windows computed lazily (a Feistel network, so no per-epoch index is
held in memory). Rank r's micro-batch at step s holds samples (s * world_size + r) * B + b, b < B: within an epoch
the ranks are disjoint and together see every window once, and each rank takes the same number of windows (all of
seq_len + 1 tokens but the split's last). The loader's whole state is the step, so a resumed run yields exactly the
batches an uninterrupted one would have.

Shards are memory-mapped, and after each batch the pages it read are dropped from the mapping (MADV_DONTNEED: they
stay in the OS page cache), with whatever neighbours the kernel mapped along with them (fault-around, large
folios), so resident memory stays flat whatever the corpus size.
"""
from __future__ import annotations

import bisect
import mmap
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from common.tensors import IGNORE_INDEX
from pretrain.shards import INDEX_DTYPE, MANIFEST, check_shards, load_manifest
MAX_OPEN_SHARDS = 256
"""Shards kept mapped at once (each holds two file descriptors); reopening one costs ~0.1 ms, so shuffled reads over
more shards than this are slower. Capped further by the open-file limit, see _max_open_shards."""
_FEISTEL_ROUNDS = 6
_STEPS_PER_BLOCK = 64


def permute(indices: np.ndarray, n: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """Apply a seeded pseudo-random permutation of range(n) to `indices`, in O(len(indices)) time and memory.

    A balanced Feistel network over the smallest even number of bits covering n is a bijection of [0, 2^bits);
    cycle walking (re-applying it until the value falls below n) restricts it to a bijection of [0, n).
    """
    x = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    seq = np.random.SeedSequence(list(seed) if isinstance(seed, tuple) else seed)
    keys = seq.generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for key in keys:
            h = right ^ key  # splitmix64 finaliser: a cheap, well-mixed round function
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
            left, right = right, left ^ (h & mask)
        return (left << shift) | right

    out = feistel(x)
    walking = out >= n
    while walking.any():
        out[walking] = feistel(out[walking])
        walking = out >= n
    return out.astype(np.int64)


def _max_open_shards() -> int:
    """MAX_OPEN_SHARDS, or fewer if the open-file limit is low: leave most descriptors to the rest of the job."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):  # no resource module on Windows
        return 16
    return max(1, min(MAX_OPEN_SHARDS, soft // 8)) if soft != resource.RLIM_INFINITY else MAX_OPEN_SHARDS


class _Mapped:
    """A read-only memory map of one file, viewed as a 1-D array."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        if path.stat().st_size == 0:  # mmap refuses empty files (a shard may start no document)
            self.mm, self.array = None, np.empty(0, dtype)
            return
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self.mm, dtype=dtype)

    def release(self) -> None:
        """Drop the map's pages from this process's resident memory. They stay in the page cache, so reading them
        again costs a minor fault, not I/O. Only pages present cost anything, so this is cheap when few are."""
        if self.mm is not None and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED)


class _DocIndex:
    """A shard's document offsets (memory-mapped), searched touching only the pages that hold the answer: a binary
    search over the whole map would fault in pages all over it, on every window."""

    def __init__(self, path: Path) -> None:
        self.map = _Mapped(path, INDEX_DTYPE)
        self.stride = max(1, mmap.PAGESIZE // INDEX_DTYPE.itemsize)
        self.fences = self.map.array[:: self.stride].copy()  # the first offset of every page (1/512 of the index)
        self.map.release()

    def starts_in(self, start: int, stop: int) -> np.ndarray:
        """The offsets in [start, stop), ascending (offsets are strictly increasing, so pages whose first offset
        is past `start`, or at or past `stop`, bound the search)."""
        first = max(int(self.fences.searchsorted(start, "right")) - 1, 0) * self.stride
        last = min(int(self.fences.searchsorted(stop, "left")) * self.stride, len(self.map.array))
        if first >= last:
            return self.map.array[:0].copy()
        pages = self.map.array[first:last]
        return pages[pages.searchsorted(start) : pages.searchsorted(stop)].copy()


class TokenShards:
    """One split of a prepared directory as a single memory-mapped token stream, with its document starts."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(data_dir, tokenizer_sha256, vocab_size)
        path = self.data_dir / MANIFEST
        info = self.manifest["splits"].get(split)
        if info is None:
            raise UserError(f"{path}: no '{split}' split; the splits are {', '.join(self.manifest['splits'])}")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.eos_id: int = self.manifest["eos_id"]
        self.shards: list[dict[str, Any]] = info["shards"]
        self.num_tokens: int = sum(s["num_tokens"] for s in self.shards)
        self.num_documents: int = sum(s["num_documents"] for s in self.shards)
        if self.num_tokens < 2:
            hint = " (prepare it with --val_fraction > 0 or a bigger corpus)" if split == "val" else ""
            raise UserError(f"{path}: the {split} split is empty ({self.num_tokens} tokens){hint}")
        check_shards(self.data_dir, self.shards, self.dtype.itemsize)
        self.offsets: list[int] = np.cumsum([0] + [s["num_tokens"] for s in self.shards]).tolist()
        self._open: OrderedDict[int, tuple[_Mapped, _DocIndex]] = OrderedDict()
        self._max_open = _max_open_shards()
        self._touched: set[int] = set()

    def _shard(self, k: int) -> tuple[_Mapped, _DocIndex]:
        if k in self._open:
            self._open.move_to_end(k)
        else:
            shard = self.shards[k]
            self._open[k] = (_Mapped(self.data_dir / shard["bin"], self.dtype),
                             _DocIndex(self.data_dir / shard["idx"]))
            if len(self._open) > self._max_open:
                self._open.popitem(last=False)  # unmapped once garbage
        return self._open[k]

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) for the shards overlapping stream tokens [start, stop)."""
        k = bisect.bisect_right(self.offsets, start) - 1
        while start < stop:
            base, end = self.offsets[k], self.offsets[k + 1]
            yield k, start - base, min(stop, end) - base
            start = end
            k += 1

    def release(self) -> None:
        """Drop the pages read since the last call from resident memory (see the module doc)."""
        for k in self._touched:
            if k in self._open:
                tokens, index = self._open[k]
                tokens.release()
                index.map.release()
        self._touched.clear()

    def read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Copy tokens [start, stop) of the stream into `out`; return the offsets, relative to start and ascending,
        of the documents that start in that range."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        doc_starts = []
        pos = 0
        for k, a, b in self._pieces(start, stop):
            tokens, index = self._shard(k)
            out[pos : pos + b - a] = tokens.array[a:b]
            doc_starts.append(index.starts_in(a, b) + (pos - a))
            self._touched.add(k)
            pos += b - a
        return np.concatenate(doc_starts) if len(doc_starts) != 1 else doc_starts[0]


@dataclass
class Batch:
    """One micro-batch. Document boundaries are given two ways, for document-masked attention."""

    tokens: torch.Tensor
    """Input ids, int64 [B, T]."""
    targets: torch.Tensor
    """Next-token ids, int64 [B, T]; -100 where there is nothing to predict (padding of the last window)."""
    position_ids: torch.Tensor
    """Rotary positions, int64 [B, T]: 0 at every row start and every document start."""
    cu_seqlens: torch.Tensor
    """int32 [num_segments + 1]: cumulative segment lengths over the flattened B*T tokens (flash-attn varlen
    convention, 0 first and B*T last); a segment is a document's piece of a row, or the padding of a row."""
    max_seqlen: int
    """Longest segment in cu_seqlens (flash-attn's varlen kernels want it without a device sync)."""
    num_tokens: int
    """Positions holding a real token, padding not counted: what the `tokens` metric adds up."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on `device` (pin the memory first for non_blocking copies to overlap with compute)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(move(self.tokens), move(self.targets), move(self.position_ids), move(self.cu_seqlens),
                     self.max_seqlen, self.num_tokens)


def resume_step(mine: dict[str, Any], state: dict[str, Any], counter: str, per_step: int, what: str) -> int:
    """The step a loader continues at from its saved `state`: every key but the `counter` of rows consumed must be
    as it is now (`mine`), and the rows consumed must be whole steps of `per_step` (world size x micro batch), so
    the world size or micro batch may change between runs while the data, order and settings may not."""
    changed = [k for k in mine if k != counter and state.get(k) != mine[k]]
    if changed:
        detail = ", ".join(f"{k} {str(state.get(k))[:16]!r} -> {str(mine[k])[:16]!r}" for k in changed)
        raise UserError(f"cannot resume {what}: {detail} changed since the checkpoint; restore the original data "
                        "and settings, or start a new run_dir")
    if state[counter] % per_step:
        raise UserError(f"cannot resume {what}: {state[counter]} {counter} consumed is not a multiple of "
                        f"world_size x micro_batch_size = {per_step}")
    return state[counter] // per_step


class DataLoader:
    """Endless, resumable micro-batches of one rank's share of a prepared split."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        tokenizer_sha256: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Open `split` of the prepared `data_dir`; tokenizer_sha256/vocab_size, when given, are checked against
        its manifest (pass the model's). Raises ValueError/FileNotFoundError naming the file on any problem."""
        if seq_len <= 0 or micro_batch_size <= 0:
            raise UserError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        self.data = TokenShards(data_dir, split, tokenizer_sha256, vocab_size)
        self.split = split
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.windows_per_epoch = -(-(self.data.num_tokens - 1) // seq_len)
        """Windows of seq_len + 1 tokens in one pass over the split (the last one may be short)."""
        self.step = 0
        """Micro-batches this rank has taken (the same on every rank): the loader's whole state."""
        self._block: tuple[Any, np.ndarray] = (None, np.empty(0))
        per_step = world_size * micro_batch_size
        if self.windows_per_epoch < per_step:
            raise UserError(
                f"{self.data.data_dir / MANIFEST}: the {split} split has {self.data.num_tokens:,} tokens, "
                f"{self.windows_per_epoch} windows of seq_len + 1 = {seq_len + 1}, fewer than world_size x "
                f"micro_batch_size = {world_size} x {micro_batch_size}; use fewer ranks, a smaller micro_batch_size "
                "or seq_len, or more data"
            )

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens in one pass over the split (all ranks together): every token but the first."""
        return self.data.num_tokens - 1

    @property
    def epoch(self) -> int:
        """Epoch of the next sample this rank will take."""
        return (self.step * self.world_size + self.rank) * self.micro_batch_size // self.windows_per_epoch

    @property
    def num_eval_batches(self) -> int:
        """Micro-batches per rank in one full, unshuffled, non-repeating pass (what eval_batches yields at most)."""
        return self.windows_per_epoch // (self.world_size * self.micro_batch_size)

    def window_starts(self, step: int, shuffle: bool | None = None) -> np.ndarray:
        """Stream offsets of the windows in this rank's micro-batch `step`."""
        shuffle = self.shuffle if shuffle is None else shuffle
        block = step // _STEPS_PER_BLOCK
        key = (block, shuffle)
        if self._block[0] != key:
            # Permuting a block of steps at once amortises numpy's per-call overhead over many windows.
            steps = np.arange(block * _STEPS_PER_BLOCK, (block + 1) * _STEPS_PER_BLOCK, dtype=np.int64)
            B, W = self.micro_batch_size, self.windows_per_epoch
            samples = ((steps * self.world_size + self.rank) * B)[:, None] + np.arange(B, dtype=np.int64)
            epochs, windows = np.divmod(samples, W)
            if shuffle:
                for e in np.unique(epochs):
                    windows[epochs == e] = permute(windows[epochs == e], W, (self.seed, int(e)))
            self._block = (key, windows * self.seq_len)
        return self._block[1][step % _STEPS_PER_BLOCK]

    def batch_at(self, step: int, shuffle: bool | None = None) -> Batch:
        """This rank's micro-batch `step`, without changing the loader's position."""
        B, T, N = self.micro_batch_size, self.seq_len, self.data.num_tokens
        windows = np.full((B, T + 1), self.data.eos_id, dtype=np.int64)
        short: list[tuple[int, int]] = []
        # Segment starts over the flattened B*T tokens: row starts, document starts inside rows, and the padding
        # of a short last window as a segment of its own.
        bounds: list[int] = []
        for b, start in enumerate(self.window_starts(step, shuffle).tolist()):
            n = min(T + 1, N - start)  # < T + 1 only for the last window of the split
            doc_starts = self.data.read(start, start + n, windows[b, :n]).tolist()
            # A document starting at the window's first token starts the row anyway; one starting at its last
            # token is only a target here, and starts the next window.
            bounds.append(b * T)
            bounds.extend(b * T + d for d in doc_starts if 0 < d < n - 1)
            if n - 1 < T:
                bounds.append(b * T + n - 1)
                short.append((b, n - 1))
        bounds.append(B * T)
        self.data.release()
        tokens, targets = windows[:, :T].copy(), windows[:, 1:].copy()
        for b, n in short:
            tokens[b, n:] = self.data.eos_id
            targets[b, n:] = IGNORE_INDEX
        cu_seqlens = np.array(bounds, dtype=np.int64)
        lengths = np.diff(cu_seqlens)
        positions = np.arange(B * T, dtype=np.int64) - np.repeat(cu_seqlens[:-1], lengths)
        return Batch(
            tokens=torch.from_numpy(tokens),
            targets=torch.from_numpy(targets),
            position_ids=torch.from_numpy(positions.reshape(B, T)),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            max_seqlen=int(lengths.max()),
            num_tokens=B * T - sum(T - n for _, n in short),
        )

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank (the loader runs through epochs endlessly)."""
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """A deterministic pass for validation loss: the split in stream order from its start, never shuffled,
        at most max_batches micro-batches (the same count on every rank); the loader's position is untouched."""
        n = self.num_eval_batches if max_batches is None else min(max_batches, self.num_eval_batches)
        for step in range(n):
            yield self.batch_at(step, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        """Small, rank-independent resume state (store it with the checkpoint)."""
        return {
            "samples": self.step * self.world_size * self.micro_batch_size,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_tokens": self.data.num_tokens,
            "tokenizer_sha256": self.data.manifest["tokenizer_sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped. The world size or micro-batch size may change as long as they
        divide the samples already consumed; the data, seq_len, seed and shuffling must be the same."""
        self.step = resume_step(self.state_dict(), state, "samples", self.world_size * self.micro_batch_size,
                                "the data loader")
