"""prepare_data: content, determinism across worker counts, resuming, dtype choice, bad input, and the loader on top."""
import json
import os

import numpy as np
import pytest

import pretrain.prepare_data as prep
from fixtures_data import make_corpus, make_documents, train_tiny_tokenizer
from pretrain.data import DataLoader
from pretrain.prepare_data import PrepareConfig, is_val_document, prepare
from pretrain.shards import MANIFEST, STATE, choose_dtype
from tokenizer import Tokenizer
from tokenizer.corpus import iter_documents, resolve_inputs


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def run(tokenizer_path, corpus, out, **kwargs):
    kwargs = {"val_fraction": 0.1, "shard_tokens": 2000, "num_workers": 1, "progress": False, **kwargs}
    return prepare(PrepareConfig(str(tokenizer_path), [str(corpus)], str(out), **kwargs))


def read_split(out, manifest, split):
    """(token stream, document start offsets) of a split, read straight from the files."""
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    tokens, starts, offset = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        tokens.append(np.fromfile(out / shard["bin"], dtype=dtype))
        starts.append(np.fromfile(out / shard["idx"], dtype="<i8") + offset)
        offset += shard["num_tokens"]
    return np.concatenate(tokens), np.concatenate(starts)


def record_tokenized(monkeypatch) -> list[str]:
    """The texts the tokenizer is asked to encode from now on (in this process: num_workers=1)."""
    texts = []
    encode_batch = Tokenizer.encode_batch

    def recording(self, batch, **kwargs):
        texts.extend(batch)
        return encode_batch(self, batch, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_batch", recording)
    return texts


def snapshot(out):
    """Bytes of every output file (the resume state included)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_choose_dtype():
    assert choose_dtype(512) == np.uint16 and choose_dtype(65536) == np.uint16
    assert choose_dtype(65537) == np.uint32 and choose_dtype(250_000) == np.uint32
    with pytest.raises(ValueError):
        choose_dtype(0)


def test_shards_hold_every_document_with_eos(tokenizer_path, corpus, tmp_path):
    out = tmp_path / "data"
    manifest = run(tokenizer_path, corpus, out)
    tok = Tokenizer(tokenizer_path)
    assert manifest == json.loads((out / MANIFEST).read_text())
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["vocab_size"] == tok.vocab_size == 512
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == tok.eos_id
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    docs = [d for f in resolve_inputs([corpus]) for d in iter_documents(f)]
    assert len(docs) == 240 == manifest["num_documents"]
    expected = {s: [d for d in docs if is_val_document(d, 0.1) == (s == "val")] for s in ("train", "val")}
    assert 10 <= len(expected["val"]) <= 45  # about 10% of 240
    for split, split_docs in expected.items():
        info = manifest["splits"][split]
        tokens, starts = read_split(out, manifest, split)
        assert info["num_tokens"] == len(tokens) and info["num_documents"] == len(starts) == len(split_docs)
        shards = info["shards"]
        assert all(s["num_tokens"] == 2000 for s in shards[:-1]) and 0 < shards[-1]["num_tokens"] <= 2000
        assert all((out / s["bin"]).stat().st_size == 2 * s["num_tokens"] for s in shards)
        # Every document, in input order, ends with EOS; the index points at their starts.
        pieces = np.split(tokens, starts[1:])
        assert starts[0] == 0 and all(p[-1] == tok.eos_id and tok.eos_id not in p[:-1] for p in pieces)
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == split_docs
    assert len(manifest["splits"]["train"]["shards"]) > 2  # documents run across shard boundaries
    assert [s["path"] for s in manifest["sources"]] == [str(p) for p in resolve_inputs([corpus])]
    assert manifest["corpus_stats"]["documents"] == 240 and manifest["corpus_stats"]["files"] == 3


def test_bos_option(tokenizer_path, corpus, tmp_path):
    manifest = run(tokenizer_path, corpus, tmp_path / "data", bos=True, val_fraction=0.0)
    tokens, starts = read_split(tmp_path / "data", manifest, "train")
    assert manifest["bos"] and (tokens[starts] == manifest["bos_id"]).all()
    assert manifest["splits"]["val"]["num_tokens"] == 0


def test_same_inputs_same_bytes_whatever_the_worker_count(tokenizer_path, corpus, tmp_path):
    run(tokenizer_path, corpus, tmp_path / "one", num_workers=1)
    run(tokenizer_path, corpus, tmp_path / "two", num_workers=2)
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one == two and "train_00000.bin" in one and "val_00000.idx" in one


def test_interrupted_run_resumes_without_redoing_finished_shards(tokenizer_path, corpus, tmp_path, monkeypatch):
    run(tokenizer_path, corpus, tmp_path / "clean")
    out = tmp_path / "data"
    close_shard = prep.ShardWriter._close_shard
    closed = []

    def crash_on_third_shard(self, next_start):
        if len(closed) == 2:
            raise KeyboardInterrupt
        close_shard(self, next_start)
        closed.append(next_start)

    monkeypatch.setattr(prep.ShardWriter, "_close_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer_path, corpus, out)
    monkeypatch.setattr(prep.ShardWriter, "_close_shard", close_shard)
    assert not (out / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        DataLoader(out, "train", 16, 1)
    finished = {p.name: os.stat(p) for p in out.glob("*.bin")}
    assert len(finished) == 2 and list(out.glob("*.tmp"))  # a half-written shard is only a .tmp file

    encoded = record_tokenized(monkeypatch)
    manifest = run(tokenizer_path, corpus, out)
    # Only documents from the resume point on were tokenized again: the tail of the input, starting with the one
    # cut by the last finished shard.
    docs = [d for f in resolve_inputs([corpus]) for d in iter_documents(f)]
    assert 0 < len(encoded) and encoded == docs[-len(encoded) :]
    finished_docs = sum(s["num_documents"] for s in manifest["splits"]["train"]["shards"][:2])
    assert len(encoded) <= 240 - finished_docs + 1
    for name, st in finished.items():  # nor were those shards rewritten
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list(out.glob("*.tmp"))
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_resume_continues_a_half_filled_shard(tokenizer_path, corpus, tmp_path, monkeypatch):
    # State saved after every chunk of ~10 documents; crash in the middle of a chunk, with tokens written to the
    # .tmp files after the last save: the resumed run truncates them back and continues.
    monkeypatch.setattr(prep, "SAVE_EVERY_SECONDS", -1.0)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 1500)
    out = tmp_path / "data"
    add = prep.ShardWriter.add
    calls = []

    def crash_at_document_100(self, *args):
        calls.append(1)
        if len(calls) == 100:
            raise KeyboardInterrupt
        add(self, *args)

    monkeypatch.setattr(prep.ShardWriter, "add", crash_at_document_100)
    with pytest.raises(KeyboardInterrupt):
        run(tokenizer_path, corpus, out, shard_tokens=100_000)
    monkeypatch.setattr(prep.ShardWriter, "add", add)
    assert not list(out.glob("*.bin")) and list(out.glob("*.bin.tmp"))

    encoded = record_tokenized(monkeypatch)
    run(tokenizer_path, corpus, out, shard_tokens=100_000)
    docs = [d for f in resolve_inputs([corpus]) for d in iter_documents(f)]
    assert encoded == docs[-len(encoded) :] and 140 <= len(encoded) < 160
    run(tokenizer_path, corpus, tmp_path / "clean2", shard_tokens=100_000)
    assert snapshot(out) == snapshot(tmp_path / "clean2")


def test_rerun_verifies_and_rebuilds_only_damaged_shards(tokenizer_path, corpus, tmp_path, capsys):
    out = tmp_path / "data"
    run(tokenizer_path, corpus, out)
    clean = snapshot(out)
    run(tokenizer_path, corpus, out)
    assert "nothing to do" in capsys.readouterr().out and snapshot(out) == clean

    damaged = out / "train_00002.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match="train_00002.bin is truncated"):
        DataLoader(out, "train", 16, 1)
    before = {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.bin")}
    run(tokenizer_path, corpus, out)
    assert snapshot(out) == clean
    rewritten = {p.name for p in out.glob("*.bin") if os.stat(p).st_mtime_ns != before[p.name]}
    assert "train_00002.bin" in rewritten and "train_00000.bin" not in rewritten and "val_00000.bin" not in rewritten


def test_changed_settings_need_overwrite(tokenizer_path, corpus, tmp_path):
    out = tmp_path / "data"
    run(tokenizer_path, corpus, out)
    with pytest.raises(ValueError, match=r"was prepared with different val_fraction; .*--overwrite"):
        run(tokenizer_path, corpus, out, val_fraction=0.2)
    manifest = run(tokenizer_path, corpus, out, val_fraction=0.2, overwrite=True, shard_tokens=10**6)
    assert manifest["val_fraction"] == 0.2 and sorted(p.name for p in out.glob("*.bin")) == ["train_00000.bin",
                                                                                           "val_00000.bin"]


def test_loader_reads_prepared_data(tokenizer_path, corpus, tmp_path):
    out = tmp_path / "data"
    manifest = run(tokenizer_path, corpus, out)
    tok = Tokenizer(out)
    loader = DataLoader(out, "train", 32, 4, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
    assert loader.tokens_per_epoch == manifest["splits"]["train"]["num_tokens"] - 1
    batch = loader.next_batch()
    assert int(batch.tokens.max()) < tok.vocab_size
    # A row's segments are pieces of documents: only the last token of a segment may be EOS.
    cu = batch.cu_seqlens.tolist()
    flat = batch.tokens.flatten().tolist()
    for a, b in zip(cu, cu[1:]):
        assert tok.eos_id not in flat[a : b - 1]
    assert list(DataLoader(out, "val", 32, 2, shuffle=False).eval_batches(1))


def test_cli_errors_are_one_line(tokenizer_path, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prep.main(["--tokenizer", str(tokenizer_path), "--input", str(tmp_path / "missing.txt"),
                   "--output_dir", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and "missing.txt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        prep.main(["--tokenizer", str(tmp_path / "none.model"), "--input", str(corpus),
                   "--output_dir", str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and "none.model" in str(e.value)
    with pytest.raises(SystemExit) as e:
        prep.main(["--tokenizer", str(tokenizer_path), "--input", str(corpus), "--output_dir", str(tmp_path / "out"),
                   "--val_fraction", "1.5"])
    assert "--val_fraction" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n")
    with pytest.raises(SystemExit) as e:
        prep.main(["--tokenizer", str(tokenizer_path), "--input", str(empty), "--output_dir", str(tmp_path / "out2"),
                   "--no_progress"])
    assert "no training documents" in str(e.value)
    assert not (tmp_path / "out2" / MANIFEST).exists()


def test_cli_end_to_end(tokenizer_path, corpus, tmp_path, capsys):
    prep.main(["--tokenizer", str(tokenizer_path), "--input", str(corpus / "a.txt"), str(corpus / "b.jsonl"),
               "--output_dir", str(tmp_path / "out"), "--num_workers", "1", "--no_progress"])
    out = capsys.readouterr().out
    assert "tok/s" in out and "train" in out
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert len(manifest["sources"]) == 2 and manifest["num_documents"] == 160
    assert (tmp_path / "out" / STATE).exists()


def test_val_split_is_a_stable_hash_of_the_text():
    docs = make_documents(2000, seed=5)
    picked = [d for d in docs if is_val_document(d, 0.05)]
    assert 60 <= len(picked) <= 140 and picked == [d for d in docs if is_val_document(d, 0.05)]
    assert not any(is_val_document(d, 0.0) for d in docs)
    assert set(picked) <= {d for d in docs if is_val_document(d, 0.2)}  # larger fractions extend smaller ones
