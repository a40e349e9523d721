"""The KV cache of decoding: keys and values of every layer, one row per sequence, each row at its own length."""
from __future__ import annotations

from typing import Sequence

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to max_len positions.

    Each row has its own length (`lengths`, the positions it holds): a forward appends each of its rows' new keys
    and values at that row's own length, so rows of different lengths (continuous batching) share one forward.
    Lengths are host-side ints, so no step waits on the device to learn them.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (n_layers, batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * batch_size

    @staticmethod
    def bytes_needed(config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
        """Memory of a cache of this shape (keys and values)."""
        return (2 * config.n_layers * batch_size * max_len * config.n_kv_heads * config.head_dim
                * torch.finfo(dtype).bits // 8)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        """The positions every row holds (rows of different lengths: read `lengths`)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"the rows of this KV cache hold different lengths {self.lengths}")
        return self.lengths[0]

    def reset(self, rows: Sequence[int]) -> None:
        """Empty these rows (their old keys and values are overwritten as new ones come)."""
        for r in rows:
            self.lengths[r] = 0

    def repeat(self, n: int, max_len: int | None = None) -> "KVCache":
        """A new cache with this batch-1 cache's contents repeated n times; room for max_len positions."""
        if self.k.shape[1] != 1:
            raise ValueError(f"KVCache.repeat needs a batch-1 cache, this one has batch {self.k.shape[1]}")
        max_len = max_len or self.max_len
        if max_len < self.length:
            raise ValueError(f"max_len={max_len} is shorter than the cached {self.length} positions")
        L, _, _, kv, d = self.k.shape
        new = KVCache(L, n, max_len, kv, d, self.k.device, self.k.dtype)
        new.k[:, :, :self.length] = self.k[:, :, :self.length]
        new.v[:, :, :self.length] = self.v[:, :, :self.length]
        new.lengths = [self.length] * n
        return new
