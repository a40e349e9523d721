"""The per-rank loader: coverage across ranks, document boundaries, resumption, shuffling, bad input, memory.

The synthetic datasets hold "counting" documents whose token values equal their offsets in the stream, so every
batch shows exactly which stream positions it holds.
"""
import json
import math
import mmap
import os

import numpy as np
import pytest
import torch

from fixtures_data import counting_documents, write_synthetic
from common.tensors import IGNORE_INDEX
from pretrain.data import Batch, DataLoader, permute
from pretrain.shards import STATE


def random_lengths(total: int, seed: int, max_len: int = 40) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(1, max_len)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def dataset(tmp_path, num_tokens: int, shard_tokens: int = 50, seed: int = 0, **splits):
    docs = {"train": counting_documents(random_lengths(num_tokens, seed)), **splits}
    return write_synthetic(tmp_path / "data", docs, shard_tokens=shard_tokens)


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in ("tokens", "targets", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.max_seqlen == b.max_seqlen


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_tokens, shard_tokens", [(769, 50), (774, 10_000)])
def test_ranks_are_disjoint_and_complete(tmp_path, world_size, num_tokens, shard_tokens):
    # 769 tokens = 48 windows of 16 (divides every world_size x 2), many shards; 774 = 49 windows with a short
    # tail window, and a single shard for up to 8 ranks.
    T, B = 16, 2
    data = dataset(tmp_path, num_tokens, shard_tokens)
    W = math.ceil((num_tokens - 1) / T)
    per_step = world_size * B
    total = math.lcm(W, per_step)
    steps, epochs = total // per_step, total // W
    counts = np.zeros((epochs, num_tokens), dtype=np.int64)
    targets_per_rank = []
    for rank in range(world_size):
        loader = DataLoader(data, "train", T, B, rank=rank, world_size=world_size, seed=7)
        assert loader.windows_per_epoch == W and loader.tokens_per_epoch == num_tokens - 1
        n_targets = 0
        for step in range(steps):
            batch = loader.next_batch()
            assert batch.tokens.shape == batch.targets.shape == batch.position_ids.shape == (B, T)
            assert batch.tokens.dtype == batch.targets.dtype == batch.position_ids.dtype == torch.int64
            valid = batch.targets != IGNORE_INDEX
            assert torch.equal(batch.targets[valid], batch.tokens[valid] + 1)  # each target is the next token
            for b in range(B):
                epoch = ((step * world_size + rank) * B + b) // W  # the documented global sample numbering
                counts[epoch] += np.bincount(batch.targets[b][valid[b]].numpy(), minlength=num_tokens)
            n_targets += int(valid.sum())
        targets_per_rank.append(n_targets)
    # Within every epoch, all ranks together predict every token but the first exactly once: disjoint, complete.
    assert (counts[:, 0] == 0).all() and (counts[:, 1:] == 1).all()
    # Balanced: every rank takes the same number of full windows, apart from the one short window per epoch.
    assert max(targets_per_rank) - min(targets_per_rank) <= epochs * (T - 1)


@pytest.mark.parametrize("lengths, shard_tokens", [
    ([1, 5, 40, 3, 1, 1, 17, 60, 2, 30, 9, 24, 25, 8] * 3, 37),  # long and short documents across many shards
    (random_lengths(12_000, seed=3, max_len=5), 5000),  # ~2000 documents per shard: an index of several pages
])
def test_document_boundaries_positions_and_cu_seqlens(tmp_path, lengths, shard_tokens):
    T, B = 24, 3
    data = write_synthetic(tmp_path / "data", {"train": counting_documents(lengths)}, shard_tokens=shard_tokens)
    doc_starts = np.cumsum([0, *lengths[:-1]])
    loader = DataLoader(data, "train", T, B, seed=1)
    saw_inner_boundary = False
    for _ in range(loader.windows_per_epoch // B + 1):
        batch = loader.next_batch()
        expected_bounds = []
        expected_positions = np.zeros((B, T), dtype=np.int64)
        for row in range(B):
            start = int(batch.tokens[row, 0])  # counting data: the token is its stream offset
            n = int((batch.targets[row] != IGNORE_INDEX).sum())
            inside = doc_starts[(doc_starts > start) & (doc_starts < start + n)] - start
            row_bounds = [0, *inside.tolist(), *([n] if n < T else [])]
            saw_inner_boundary |= len(row_bounds) > 2
            expected_bounds += [row * T + x for x in row_bounds]
            for a, b in zip(row_bounds, row_bounds[1:] + [T]):
                expected_positions[row, a:b] = np.arange(b - a)
        assert batch.cu_seqlens.dtype == torch.int32
        assert batch.cu_seqlens.tolist() == expected_bounds + [B * T]
        assert torch.equal(batch.position_ids, torch.from_numpy(expected_positions))
        assert batch.max_seqlen == int(torch.diff(batch.cu_seqlens).max())
    assert saw_inner_boundary


def test_last_window_is_padded_not_dropped(tmp_path):
    T, B = 16, 1
    data = write_synthetic(tmp_path / "data", {"train": counting_documents([20, 5])}, eos_id=3)  # 25 tokens
    loader = DataLoader(data, "train", T, B, shuffle=False)
    assert loader.windows_per_epoch == 2
    first = loader.next_batch()
    last = loader.next_batch()
    assert (first.num_tokens, last.num_tokens) == (16, 8)  # the `tokens` metric does not count the padding
    assert last.to("cpu").num_tokens == 8
    assert last.tokens[0, :8].tolist() == list(range(16, 24)) and (last.tokens[0, 8:] == 3).all()
    assert last.targets[0, :8].tolist() == list(range(17, 25)) and (last.targets[0, 8:] == IGNORE_INDEX).all()
    # Document 2 starts at token 20 (row offset 4); the padding is a segment of its own.
    assert last.cu_seqlens.tolist() == [0, 4, 8, 16]
    assert last.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] + list(range(8))


def test_resume_yields_exactly_the_next_batches(tmp_path):
    data = dataset(tmp_path, 1000, shard_tokens=64)
    kwargs = dict(seq_len=16, micro_batch_size=3, rank=1, world_size=2, seed=5)
    reference = DataLoader(data, "train", **kwargs)
    expected = [reference.next_batch() for _ in range(25)]
    assert reference.epoch >= 2  # the run crosses epoch boundaries (63 windows, 6 per step)
    for k in (0, 7, 10, 11, 20):
        loader = DataLoader(data, "train", **kwargs)
        for _ in range(k):
            loader.next_batch()
        state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
        assert len(json.dumps(state)) < 300
        resumed = DataLoader(data, "train", **kwargs)
        resumed.load_state_dict(state)
        for i in range(k, 25):
            assert_batches_equal(resumed.next_batch(), expected[i])


def test_shards_evicted_from_the_open_set_read_back_the_same(tmp_path):
    data = dataset(tmp_path, 1000, shard_tokens=40)  # 25 shards
    roomy, tight = DataLoader(data, "train", 16, 4, seed=2), DataLoader(data, "train", 16, 4, seed=2)
    tight.data._max_open = 2
    for _ in range(20):
        assert_batches_equal(roomy.next_batch(), tight.next_batch())
    assert len(tight.data._open) == 2 and len(roomy.data._open) == 25


def test_resume_with_another_world_size_keeps_the_sample_order(tmp_path):
    data = dataset(tmp_path, 1000)
    old = [DataLoader(data, "train", 16, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(9):
        for loader in old:
            loader.next_batch()
    new = DataLoader(data, "train", 16, 4, rank=0, world_size=1, seed=3)
    new.load_state_dict(old[0].state_dict())
    merged = torch.cat([loader.next_batch().tokens for loader in old])
    assert torch.equal(new.next_batch().tokens, merged)


@pytest.mark.parametrize("change", [dict(seq_len=8), dict(seed=1), dict(shuffle=False), dict(micro_batch_size=3)])
def test_resume_refuses_incompatible_state(tmp_path, change):
    data = dataset(tmp_path, 1000)
    kwargs = dict(seq_len=16, micro_batch_size=2, seed=0, shuffle=True)
    loader = DataLoader(data, "train", **kwargs)
    loader.next_batch()
    other = DataLoader(data, "train", **{**kwargs, **change})
    with pytest.raises(ValueError, match="cannot resume the data loader"):
        other.load_state_dict(loader.state_dict())


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 3, 4, 5, 7, 64, 100, 1000, 4097):
        for seed in (0, 1, (2, 3)):
            out = permute(np.arange(n), n, seed)
            assert np.array_equal(np.sort(out), np.arange(n))
            assert np.array_equal(out, permute(np.arange(n), n, seed))
    a, b = permute(np.arange(1000), 1000, (0, 0)), permute(np.arange(1000), 1000, (0, 1))
    assert not np.array_equal(a, np.arange(1000)) and not np.array_equal(a, b)
    assert np.array_equal(permute(np.array([5, 999, 0]), 1000, (0, 0)), a[[5, 999, 0]])


def test_shuffling_and_epochs(tmp_path):
    data = dataset(tmp_path, 16 * 32 + 1)  # 32 windows of 16
    ordered = DataLoader(data, "train", 16, 4, shuffle=False)
    assert ordered.next_batch().tokens[:, 0].tolist() == [0, 16, 32, 48]

    def epoch_orders(seed):
        loader = DataLoader(data, "train", 16, 4, seed=seed)
        starts = torch.cat([loader.next_batch().tokens[:, 0] for _ in range(16)]).tolist()
        return starts[:32], starts[32:]

    first, second = epoch_orders(0)
    assert sorted(first) == sorted(second) == list(range(0, 512, 16))
    assert first != second and first != sorted(first)
    assert epoch_orders(0) == (first, second) and epoch_orders(1)[0] != first


def test_eval_batches_are_deterministic_and_disjoint(tmp_path):
    val = counting_documents(random_lengths(500, seed=2), start=10_000)
    data = dataset(tmp_path, 1000, val=val)
    seen = []
    for rank in range(2):
        loader = DataLoader(data, "val", 16, 2, rank=rank, world_size=2, seed=4)
        assert loader.num_eval_batches == math.ceil(499 / 16) // 4
        first = list(loader.eval_batches())
        again = list(loader.eval_batches(max_batches=2))
        assert len(first) == loader.num_eval_batches and len(again) == 2
        for a, b in zip(first, again):
            assert_batches_equal(a, b)
        assert loader.step == 0
        seen += [int(t) for batch in first for t in batch.tokens[:, 0]]
    assert len(seen) == len(set(seen)) and min(seen) >= 10_000
    assert sorted(seen) == list(range(10_000, 10_000 + 16 * len(seen), 16))  # stream order from the start


def test_uint32_tokens_for_big_vocabularies(tmp_path):
    docs = [np.arange(69_990, 70_000), np.arange(65_530, 65_545)]
    data = write_synthetic(tmp_path / "data", {"train": docs}, vocab_size=70_000)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and (data / "train_00000.bin").stat().st_size == 4 * 25
    batch = DataLoader(data, "train", 24, 1, shuffle=False).next_batch()
    assert batch.tokens[0].tolist() == list(range(69_990, 70_000)) + list(range(65_530, 65_544))


# --- bad input: one clear error naming the file ---------------------------------------------------------------


def test_manifest_mismatch_with_the_model(tmp_path):
    data = write_synthetic(tmp_path / "data", {"train": counting_documents([300])}, tokenizer_sha256="a" * 64)
    with pytest.raises(ValueError, match=r"manifest.json: token ids go up to vocab_size 65536 .* 512"):
        DataLoader(data, "train", 16, 1, vocab_size=512)
    with pytest.raises(ValueError, match=r"manifest.json: the data was tokenized with a different tokenizer"):
        DataLoader(data, "train", 16, 1, tokenizer_sha256="b" * 64)
    # A model vocabulary padded beyond the tokenizer's is fine.
    DataLoader(data, "train", 16, 1, tokenizer_sha256="a" * 64, vocab_size=65536 + 64)


def test_truncated_or_missing_shard(tmp_path):
    data = dataset(tmp_path, 300, shard_tokens=100)
    shard = data / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train_00001.bin is truncated .*rerun the prepare_data command"):
        DataLoader(data, "train", 16, 1)
    (data / "train_00002.idx").unlink()
    shard.unlink()
    with pytest.raises(ValueError, match=r"train_00001.bin is missing"):
        DataLoader(data, "train", 16, 1)


def test_empty_split_and_too_many_ranks(tmp_path):
    data = dataset(tmp_path, 100, val=[])
    with pytest.raises(ValueError, match=r"manifest.json: the val split is empty .*--val_fraction"):
        DataLoader(data, "val", 16, 1)
    with pytest.raises(ValueError, match=r"manifest.json: no 'test' split"):
        DataLoader(data, "test", 16, 1)
    with pytest.raises(ValueError, match=r"7 windows .* world_size x micro_batch_size = 8 x 1; use fewer ranks"):
        DataLoader(data, "train", 16, 1, rank=0, world_size=8)
    with pytest.raises(ValueError, match="rank"):
        DataLoader(data, "train", 16, 1, rank=2, world_size=2)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data directory"):
        DataLoader(tmp_path / "nope", "train", 16, 1)
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"manifest.json is missing: .* is not a prepared dataset"):
        DataLoader(tmp_path / "d", "train", 16, 1)
    (tmp_path / "d" / STATE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"was interrupted; rerun the same prepare_data command"):
        DataLoader(tmp_path / "d", "train", 16, 1)
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: not valid JSON"):
        DataLoader(tmp_path / "d", "train", 16, 1)
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version 99"):
        DataLoader(tmp_path / "d", "train", 16, 1)


def resident_kib_of_files_in(directory) -> int:
    """Resident memory of this process's mappings of files under `directory` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping header: range perms offset dev inode [path]
            inside = len(fields) > 5 and fields[5].startswith(str(directory))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not (hasattr(mmap, "MADV_DONTNEED") and os.path.exists("/proc/self/smaps")), reason="Linux")
def test_resident_memory_stays_flat(tmp_path):
    psutil = pytest.importorskip("psutil")
    # 32 MiB of uint16 tokens in 4 shards, written document by document (small writes leave the file in the page
    # cache as small pages, which the kernel maps around a faulting page in 64 KiB blocks).
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, size=int(n)) for n in rng.integers(100, 1100, size=(16 << 20) // 600)]
    data = write_synthetic(tmp_path / "data", {"train": docs}, shard_tokens=sum(map(len, docs)) // 4 + 1)
    loader = DataLoader(data, "train", 2048, 8)
    loader.next_batch()
    before = psutil.Process().memory_info().rss
    # A quarter of an epoch of random windows, from the page cache (the shards were just written): the pages read,
    # and the neighbours the kernel maps along with them, must not stay resident, in the shards or their indexes.
    for _ in range(loader.windows_per_epoch // 8 // 4):
        loader.next_batch()
    assert len(loader.data._open) == 4 and resident_kib_of_files_in(data) == 0
    assert psutil.Process().memory_info().rss - before < 4 << 20
