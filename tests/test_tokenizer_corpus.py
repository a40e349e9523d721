"""Reading raw corpora (formats, bad input) and turning documents into a bounded sentence sample."""
import gzip
import json
from collections import Counter

import numpy as np
import pytest

from tokenizer.corpus import CorpusStats, iter_documents, resolve_inputs
from tokenizer.sampling import Reservoir, SamplingStats, cut_utf8, document_sentences, drain, merge_samples


def read(path, **kwargs):
    stats = CorpusStats()
    docs = list(iter_documents(path, stats=stats, **kwargs))
    return docs, stats


# ------------------------------------------------------------------------------------------------ formats


def test_txt_documents_split_on_blank_lines_and_keep_indentation(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbffirst line\n    indented  twice\r\n\n \t \n\nsecond doc\n\n\n\tthird\n")
    docs, stats = read(p)
    assert docs == ["first line\n    indented  twice", "second doc", "\tthird"]
    assert stats.documents == 3 and stats.files == 1
    assert stats.characters == sum(map(len, docs))
    assert stats.bytes == sum(len(d.encode()) for d in docs)


def test_jsonl_and_gzip_formats_read_the_same_documents(tmp_path):
    docs = ["中文 文本", "  code:\n\tpass", "plain"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"content": d}, ensure_ascii=False) + "\n" for d in docs))
    with gzip.open(tmp_path / "c.txt.gz", "wt") as f:
        f.write("\n\n".join(["one", "two\nlines"]))
    assert read(tmp_path / "a.jsonl")[0] == docs
    assert read(tmp_path / "b.jsonl.gz", text_field="content")[0] == docs
    assert read(tmp_path / "c.txt.gz")[0] == ["one", "two\nlines"]


def test_resolve_inputs_files_dirs_globs_sorted_and_deduplicated(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/sub/a.jsonl.gz", "d/readme.md", "c.jsonl", "e.txt.gz"]:
        (tmp_path / name).write_text("x")
    got = resolve_inputs([str(tmp_path / "d"), str(tmp_path / "*.jsonl"), str(tmp_path / "d" / "b.txt"),
                          str(tmp_path / "**" / "*.gz")])
    names = [p.relative_to(tmp_path).as_posix() for p in got]
    assert names == sorted(names)
    assert set(names) == {"d/b.txt", "d/sub/a.jsonl.gz", "c.jsonl", "e.txt.gz"}  # readme.md ignored, no duplicates


@pytest.mark.parametrize("entry, message", [
    ("missing.txt", "no such file or directory"),
    ("*.zzz", "matches no"),
    ("notes.md", "unsupported file type"),
    ("emptydir", "matches no"),
])
def test_resolve_inputs_errors_name_the_path(tmp_path, entry, message):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match=message) as e:
        resolve_inputs([str(tmp_path / entry)])
    assert entry.split("*")[-1] in str(e.value)


# ------------------------------------------------------------------------------------------------ bad input


def test_empty_and_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 10)
    stats = CorpusStats()
    for p in sorted(tmp_path.iterdir()):
        assert list(iter_documents(p, stats=stats)) == []
    assert stats.files == 3
    assert stats.skipped_empty_files == 2
    assert stats.skipped_binary_files == 1
    assert stats.documents == 0


def test_undecodable_lines_are_dropped_not_fatal(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"good line\nbad \xff\xfe line\nmore good\n\nlatin1 caf\xe9\n\nok\n")
    docs, stats = read(p)
    assert docs == ["good line\nmore good", "ok"]
    assert stats.skipped_undecodable_lines == 2
    # A NUL byte past the binary sniffing window (first 8 KiB) only drops its line.
    p.write_bytes(b"x\n" * 5000 + b"\nnul \x00 here\nafter\n")
    docs, stats = read(p)
    assert docs[-1] == "after" and stats.skipped_undecodable_lines == 1 and stats.skipped_binary_files == 0

    j = tmp_path / "a.jsonl"
    j.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n{"text": "lone \\ud800 surrogate"}\n'
                  b'{"text": "also fine"}\n')
    docs, stats = read(j)
    assert docs == ["fine", "also fine"]
    assert stats.skipped_undecodable_lines == 2


def test_bad_json_records_are_counted_by_reason(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\nnot json\n[1, 2]\n{"other": "x"}\n{"text": 5}\n{"text": "   "}\n\n{"text": "end"}\n')
    docs, stats = read(p)
    assert docs == ["ok", "end"]
    assert (stats.skipped_bad_json, stats.skipped_missing_field, stats.skipped_empty_documents) == (2, 2, 1)


def test_enormous_lines_are_cut_or_skipped(tmp_path):
    big = "字" * 100 + "tail"  # 304 bytes; cut at 50 bytes must not split a 3-byte character
    p = tmp_path / "a.txt"
    p.write_text(f"short\n{big}\nafter\n")
    docs, stats = read(p, max_line_bytes=50)
    assert docs == ["short\n" + "字" * 16 + "\nafter"]
    assert stats.cut_long_lines == 1

    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": "small"}) + "\n")
    docs, stats = read(j, max_line_bytes=50)
    assert docs == ["small"]
    assert stats.skipped_long_records == 1


def test_runaway_document_is_emitted_in_bounded_pieces(tmp_path):
    p = tmp_path / "a.txt"
    lines = [f"line {i:03d}" for i in range(100)]  # 8 characters each, no blank line
    p.write_text("\n".join(lines))
    docs, stats = read(p, max_document_chars=200)
    assert all(len(d) <= 200 for d in docs)
    assert "\n".join(docs).replace("\n", "") == "".join(lines)  # nothing lost, only split
    assert stats.split_documents == len(docs) - 1 > 0


def test_corrupt_gzip_keeps_what_was_read_and_counts_the_file(tmp_path):
    data = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)).encode())
    (tmp_path / "trunc.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.txt.gz").write_bytes(b"this is not gzip at all")
    docs, stats = read(tmp_path / "trunc.jsonl.gz")
    assert 0 < len(docs) < 2000 and docs[0] == "doc 0"
    assert stats.skipped_unreadable_files == 1
    docs, stats = read(tmp_path / "garbage.txt.gz")
    assert docs == [] and stats.skipped_unreadable_files == 1


def test_stats_merge_summary_and_dict():
    a, b = CorpusStats(files=1, documents=2, skipped_binary_files=1), CorpusStats(files=2, documents=3)
    assert a.merge(b) is a
    assert (a.files, a.documents, a.skipped_binary_files) == (3, 5, 1)
    assert a.skipped == {"skipped_binary_files": 1}
    assert "skipped_binary_files=1" in a.summary()
    assert a.to_dict()["documents"] == 5


# ------------------------------------------------------------------------------------------------ sentences


def test_document_sentences_keep_whitespace_and_drop_blank_lines():
    doc = "def f():\n    x  =  1\r\n   \n\treturn x  \n"
    assert list(document_sentences(doc, 8192)) == ["def f():", "    x  =  1", "\treturn x  "]


def test_long_lines_are_cut_at_character_boundaries():
    stats = SamplingStats()
    line = "ab" + "é中😀" * 50
    out = list(document_sentences(line, 16, stats))
    assert "".join(out) == line
    assert all(len(s.encode()) <= 16 for s in out)
    assert stats.lines_cut == 1
    assert cut_utf8("abc", 16) == ["abc"]


def test_reservoir_is_bounded_uniform_and_deterministic():
    r = Reservoir(10, seed=0)
    r.extend(range(5))
    assert r.items == [0, 1, 2, 3, 4]  # fewer items than capacity: all kept, in order

    counts = Counter()
    for seed in range(3000):
        r = Reservoir(5, seed=seed)
        r.extend(range(20))
        assert len(r.items) == 5 and len(set(r.items)) == 5
        counts.update(r.items)
    # Each of the 20 items is kept with probability 1/4: 750 expected per item; 5 sigma is about 120.
    assert all(630 < counts[i] < 870 for i in range(20)), counts

    big = Reservoir(1000, seed=1)
    big.extend(range(200_000))
    assert big.seen == 200_000 and len(big.items) == 1000
    assert 80_000 < sum(big.items) / 1000 < 120_000  # mean of a uniform sample of range(200000)
    again = Reservoir(1000, seed=1)
    again.extend(range(200_000))
    assert again.items == big.items
    expected = list(big.items)
    assert list(drain(big.items)) == expected and big.items == [None] * 1000  # released as they are consumed


def test_merged_samples_are_uniform_over_both_streams():
    # Streams of 30 and 10 items, samples of 8: every item must end up kept with probability 8/40.
    counts = Counter()
    for seed in range(3000):
        rng = np.random.default_rng(seed)
        a, b = Reservoir(8, seed=seed), Reservoir(8, seed=-seed - 1)
        a.extend(range(30))
        b.extend(range(30, 40))
        merged = merge_samples(a.items, a.seen, b.items, b.seen, 8, rng)
        assert len(merged) == 8 and len(set(merged)) == 8
        counts.update(merged)
    # 600 expected per item; 5 sigma is about 110.
    assert all(490 < counts[i] < 710 for i in range(40)), counts
    rng = np.random.default_rng(0)
    assert sorted(merge_samples([1, 2], 2, [3], 1, 10, rng)) == [1, 2, 3]  # under capacity: everything
    assert merge_samples([], 0, [5, 6], 2, 1, rng) in ([5], [6])
    big = merge_samples(list(range(5)), 10**12, list(range(5, 10)), 10**12, 6, rng)  # binomial branch
    assert len(big) == 6 and len(set(big)) == 6


def test_reservoir_rejects_zero_capacity():
    with pytest.raises(ValueError):
        Reservoir(0)
