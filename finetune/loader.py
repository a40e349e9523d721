"""Micro batches of tokenized instruction samples: packed with document masking, or padded; exactly resumable.

Rows. With packing, the samples are packed once into rows of at most seq_len input positions (best-fit
decreasing over the lengths, so little is left as padding), each sample a document of its own: `position_ids`
restart at its first token and `cu_seqlens` fences it, so attention never crosses samples and the loss of a
packed row equals the losses of its samples computed one by one. Without packing, a row is one sample, and a micro
batch is padded to its longest row. Padding positions have target IGNORE_INDEX and a segment of their own.

Order. Global row j (over all ranks and epochs) is row perm_e(j mod R) of epoch e = j // R, where R is the number
of rows and perm_e a seeded permutation (pretrain.data.permute). Rank r's micro batch at step s holds rows
(s * world_size + r) * B + b, b < B, exactly as the pretraining loader does, so the whole state is the step and
a resumed run sees exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import bisect
import hashlib
from typing import Any, Iterator

import numpy as np
import torch

from common.errors import UserError
from common.tensors import IGNORE_INDEX
from finetune.data import Sample
from pretrain.data import Batch, permute, resume_step


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows whose lengths sum to at most `capacity` (best-fit decreasing).

    Deterministic: ties are broken by sample index. A row's samples are listed in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} positions, more than a row's {capacity}")
        k = bisect.bisect_left(free, (n, -1))  # the row with the least room that still fits it
        if k < len(free):
            room, row = free.pop(k)
            rows[row].append(i)
            bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return [sorted(r) for r in rows]


def fingerprint(samples: list[Sample]) -> str:
    """sha256 of every sample's ids and labels: resuming checks the data did not change."""
    h = hashlib.sha256()
    for s in samples:
        h.update(len(s.ids).to_bytes(4, "little"))
        h.update(s.ids.tobytes())
        h.update(s.labels.tobytes())
    return h.hexdigest()


class InstructionLoader:
    """Endless, resumable micro batches of one rank's share of a list of samples (see the module doc)."""

    def __init__(self, samples: list[Sample], seq_len: int, micro_batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, packing: bool = True,
                 split: str = "train", data_hash: str | None = None) -> None:
        if not samples:
            raise UserError(f"the {split} split has no samples")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        self.samples = samples
        self.seq_len, self.micro_batch_size, self.pad_id = seq_len, micro_batch_size, pad_id
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.packing, self.split = packing, split
        positions = [len(s.ids) - 1 for s in samples]  # a sample of n tokens is n - 1 (input, target) pairs
        too_long = next((i for i, n in enumerate(positions) if n > seq_len), None)
        if too_long is not None:
            raise UserError(f"sample {too_long} of the {split} split has {positions[too_long] + 1} tokens, more "
                            f"than seq_len + 1 = {seq_len + 1}; lower cutoff_len or raise seq_len")
        self.rows = pack(positions, seq_len) if packing else [[i] for i in range(len(samples))]
        self.data_hash = data_hash or fingerprint(samples)
        self.step = 0
        """Micro batches this rank has taken (the same on every rank): the loader's whole state."""

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def padding_fraction(self) -> float:
        """Share of the positions of all rows (each filled to seq_len when packing) that are padding."""
        used = sum(len(self.samples[i].ids) - 1 for row in self.rows for i in row)
        return 1 - used / (self.num_rows * self.seq_len) if self.packing else float("nan")

    def row_indices(self, step: int, shuffle: bool | None = None) -> list[int]:
        shuffle = self.shuffle if shuffle is None else shuffle
        B, R = self.micro_batch_size, self.num_rows
        first = (step * self.world_size + self.rank) * B
        rows = []
        for j in range(first, first + B):
            epoch, k = divmod(j, R)
            rows.append(int(permute(np.array([k]), R, (self.seed, epoch))[0]) if shuffle else k)
        return rows

    def batch_at(self, step: int, shuffle: bool | None = None) -> Batch:
        rows = [self.rows[r] for r in self.row_indices(step, shuffle)]
        lengths = [[len(self.samples[i].ids) - 1 for i in row] for row in rows]
        B = len(rows)
        T = self.seq_len if self.packing else max(sum(n) for n in lengths)
        tokens = np.full((B, T), self.pad_id, dtype=np.int64)
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((B, T), dtype=np.int64)
        bounds = []
        for b, row in enumerate(rows):
            at = 0
            for i, n in zip(row, lengths[b]):
                s = self.samples[i]
                tokens[b, at:at + n] = s.ids[:-1]
                targets[b, at:at + n] = s.labels[1:]
                positions[b, at:at + n] = np.arange(n)
                bounds.append(b * T + at)
                at += n
            if at < T:  # padding: a segment of its own
                positions[b, at:] = np.arange(T - at)
                bounds.append(b * T + at)
        bounds.append(B * T)
        cu = np.asarray(bounds, dtype=np.int32)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(positions),
                     torch.from_numpy(cu), int(np.diff(cu).max()), sum(map(sum, lengths)))

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """The rows in order from the first, unshuffled; at most max_batches micro batches, the same count on every
        rank (enough to cover every row once; the last may wrap around to the first rows)."""
        per_step = self.world_size * self.micro_batch_size
        n = -(-self.num_rows // per_step)
        for step in range(n if max_batches is None else min(n, max_batches)):
            yield self.batch_at(step, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": self.step * self.world_size * self.micro_batch_size, "split": self.split,
                "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle, "packing": self.packing,
                "num_rows": self.num_rows, "data_sha256": self.data_hash}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = resume_step(self.state_dict(), state, "rows_consumed", self.world_size * self.micro_batch_size,
                                "the instruction data")
