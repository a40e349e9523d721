"""Tokenizer training, the Tokenizer class, the Hugging Face export and the stats CLI, on small synthetic corpora."""
import gzip
import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm

from fixtures_tokenizer import mixed_documents, train_small, write_corpus
from fixtures_time import limit
from tokenizer import Tokenizer
from tokenizer.hf import load_model_proto, save_hf_tokenizer
from tokenizer.stats import compression_table
from tokenizer.stats import main as stats_main
from tokenizer.corpus import resolve_inputs
from tokenizer.sampling import SampleSpec, sample_sentences
from tokenizer.train import CARD_FILENAME
from tokenizer.train import main as train_main

REPO = Path(__file__).resolve().parents[1]

CODE = (
    "class Point:\n"
    "    def __init__(self, x,  y):\n"
    "        self.x  =  x        # aligned\n"
    "\tif x:\n"
    "\t\treturn   None   \n"
    "\n\n\n"
    "        pass"
)
SAMPLES = [
    "Hello world, this is the season.",
    "的一是不了人我在有他这中大来上国个到说们",
    "混合 mixed 文本 text 123",
    "Order 1234567890 on 2024-05-17 cost 3.14159 dollars",
    CODE,
    "  two leading spaces",
    " one leading space and trailing spaces   ",
    "many     inner      spaces",
    "\ttab first\r\nwindows line",
    "emoji 😀🎉👍🏽 and rare 𠀋 龘 ﷺ",
    "literal <s> and </s> and <unk> in text",
    "",
    " ",
]
# SentencePiece itself decodes a literal "▁" (U+2581) as a space, as LLaMA's tokenizer does: ids must still agree.
NOT_ROUND_TRIP = ["▁ a literal metaspace ▁▁"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "tok"
    train_small(corpus, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def special_dir(corpus, tmp_path_factory):
    """A tokenizer with a pad token and user-defined chat symbols."""
    out = tmp_path_factory.mktemp("special") / "tok"
    train_small(corpus, out, vocab_size=900, pad=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    return out


def run_main(main, argv) -> str:
    """Run a CLI main() that must fail; return its one-line error message."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)  # the error line (also on stderr); e.value.code is the exit status
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ training output


def test_training_writes_model_card_and_hf_files(tok_dir, tok, corpus):
    names = {p.name for p in tok_dir.iterdir()}
    assert names == {"tokenizer.model", "tokenizer.vocab", CARD_FILENAME, "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"}  # and no leftover temp dir
    card = json.loads((tok_dir / CARD_FILENAME).read_text())
    assert card["tokenizer"]["sha256"] == hashlib.sha256((tok_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert card["tokenizer"]["vocab_size"] == tok.vocab_size == 1000
    s = card["settings"]
    assert (s["split_digits"], s["byte_fallback"], s["max_piece_length"], s["character_coverage"]) == (
        True, True, 16, 0.9999)
    o = card["sentencepiece_options"]
    assert o["model_type"] == "bpe" and o["normalization_rule_name"] == "identity"
    assert o["remove_extra_whitespaces"] is False and o["allow_whitespace_only_pieces"] is True
    docs = mixed_documents()
    assert card["corpus"]["files"] == 4
    assert card["corpus"]["documents"] == sum(len(v) for v in docs.values())
    assert card["corpus"]["characters"] == sum(len(d) for v in docs.values() for d in v)
    assert card["sampling"]["sentences_sampled"] == card["sampling"]["sentences_seen"] > 0
    assert card["training"]["peak_rss_mib"] > 0
    # The model records a stable prefix, not the temp dir it was trained in.
    assert load_model_proto(tok_dir).trainer_spec.model_prefix == "tokenizer"
    with open(tok_dir / "tokenizer.vocab", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 1000


def test_training_is_deterministic_and_sampling_is_bounded(corpus, tok_dir, tmp_path):
    again = train_small(corpus, tmp_path / "again")
    assert again["tokenizer"]["sha256"] == json.loads((tok_dir / CARD_FILENAME).read_text())["tokenizer"]["sha256"]
    small = train_small(corpus, tmp_path / "small", vocab_size=800, max_sentences=500)
    assert small["sampling"]["sentences_sampled"] == 500
    assert small["sampling"]["sentences_seen"] == again["sampling"]["sentences_seen"] > 500


def test_parallel_reading_gives_the_same_sample_and_tokenizer(corpus, tok_dir, tmp_path):
    files = resolve_inputs([str(corpus)])
    spec = SampleSpec(max_sentences=700, max_sentence_bytes=8192)
    serial = sample_sentences(files, spec, num_workers=1, progress=False)
    parallel = sample_sentences(files, spec, num_workers=2, progress=False)
    assert len(serial[0]) == 700 and serial == parallel
    card = train_small(corpus, tmp_path / "par", num_workers=2)
    assert card["tokenizer"]["sha256"] == json.loads((tok_dir / CARD_FILENAME).read_text())["tokenizer"]["sha256"]


def test_memory_warning_before_training(corpus, tmp_path, monkeypatch, capsys):
    import tokenizer.train

    monkeypatch.setattr(tokenizer.train.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    train_small(corpus, tmp_path / "tok", vocab_size=800, max_sentences=200)
    assert "lower --max_sentences" in capsys.readouterr().err


def test_special_ids_come_from_the_model(tok, special_dir):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    special = Tokenizer(special_dir)
    assert (special.unk_id, special.bos_id, special.eos_id, special.pad_id) == (0, 1, 2, 3)
    assert special.id_to_piece(special.pad_id) == "<pad>"
    assert special.piece_to_id("<|im_start|>") == 4 and special.piece_to_id("<|im_end|>") == 5
    ids = special.encode("<|im_start|>user hi<|im_end|>")
    assert 4 in ids and 5 in ids  # user-defined symbols stay whole
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id] + tok.encode("hi") + [tok.eos_id]


# ------------------------------------------------------------------------------------------------ behaviour


def test_numbers_split_into_single_digits(tok):
    learned = [tok.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_byte(i) and not tok.sp.is_control(i)]
    multi_digit = [p for p in learned if len(re.findall(r"\d", p)) > 1]
    assert multi_digit == []
    ids = tok.encode("Order 1234567890 cost 3.14159")
    digits = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
    assert "".join(digits) == "1234567890314159"
    assert all(len(p) == 1 for p in digits)


def test_rare_characters_and_emoji_round_trip_through_byte_fallback(tok):
    text = "😀🎉👍🏽 𠀋 龘 ﷺ"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    byte_pieces = [tok.id_to_piece(i) for i in ids if tok.sp.is_byte(i)]
    assert len(byte_pieces) == len("😀🎉👍🏽𠀋龘ﷺ".encode())  # none of these is in the training corpus
    assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in byte_pieces)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_code_indentation_uses_whitespace_pieces(tok):
    assert tok.piece_to_id("▁▁▁▁") != tok.unk_id  # learned from the indented code in the corpus
    ids = tok.encode("        return result")
    assert len(ids) <= 4 and tok.decode(ids) == "        return result"


def test_encode_batch_matches_encode_and_accepts_array_ids(tok):
    docs = SAMPLES * 20
    assert tok.encode_batch(docs, eos=True) == [tok.encode(d, eos=True) for d in docs]
    assert tok.encode_batch([]) == []
    ids = tok.encode(CODE)
    assert tok.decode(np.array(ids, dtype=np.int32)) == CODE
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_tokenizer_loading(tok_dir, tmp_path):
    by_file = Tokenizer(tok_dir / "tokenizer.model")
    assert by_file.path == Tokenizer(tok_dir).path and by_file.sha256 == Tokenizer(tok_dir).sha256
    assert len(by_file) == by_file.vocab_size
    copy = pickle.loads(pickle.dumps(by_file))  # e.g. for DataLoader workers
    assert copy.encode(CODE) == by_file.encode(CODE) and copy.sha256 == by_file.sha256
    with pytest.raises(FileNotFoundError, match="no SentencePiece model"):
        Tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")


# ------------------------------------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("which", ["tok_dir", "special_dir"])
def test_transformers_gives_sentencepiece_ids(which, request):
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    path = request.getfixturevalue(which)
    sp = Tokenizer(path)
    hf = AutoTokenizer.from_pretrained(path)
    raw = RawTokenizer.from_file(str(path / "tokenizer.json"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (sp.bos_id, sp.eos_id, sp.unk_id)
    assert (hf.pad_token_id if hf.pad_token_id is not None else -1) == sp.pad_id
    texts = SAMPLES + NOT_ROUND_TRIP + [
        "<|im_start|>user\n你好<|im_end|>", "a<|im_start|>b", " <|im_start|> x", "<|im_end|><|im_end|>",
    ]
    docs = mixed_documents(n=40, seed=1)
    texts += [d for v in docs.values() for d in v]
    expected = sp.encode_batch(texts)
    assert hf(texts, add_special_tokens=False)["input_ids"] == expected
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == expected
    assert hf(texts[0])["input_ids"] == sp.encode(texts[0], bos=True)  # BOS by default, like LLaMA
    for text, ids in zip(texts, expected, strict=True):
        assert hf.decode(ids) == sp.decode(ids), text


def test_save_hf_tokenizer_from_a_model_file(tok_dir, tmp_path):
    out = save_hf_tokenizer(tok_dir / "tokenizer.model", tmp_path / "hf")
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["clean_up_tokenization_spaces"] is False


def test_save_hf_tokenizer_rejects_models_it_cannot_reproduce(tmp_path):
    text = "\n".join(f"line {i} of some words to learn from" for i in range(300))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_prefix=str(tmp_path / "uni"),
                                   vocab_size=40, model_type="unigram", hard_vocab_limit=False,
                                   minloglevel=2)
    with pytest.raises(ValueError, match="only BPE"):
        save_hf_tokenizer(tmp_path / "uni.model", tmp_path / "out")


# ------------------------------------------------------------------------------------------------ CLI and bad input


def test_cli_trains_and_reports_skipped_bad_input(corpus, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (bad / "latin1.txt").write_bytes(b"caf\xe9 au lait\n\nplain ascii line\n")
    (bad / "huge.txt").write_text("word " * 5000 + "\n")  # one 25 kB line: cut into sentences
    (bad / "records.jsonl").write_text('{"text": "ok"}\nbroken {\n{"body": "no text field"}\n')
    data = gzip.compress("".join(f"line {i * 7919 % 10007}\n" for i in range(2000)).encode())
    (bad / "trunc.txt.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "tok"
    train_main(["--input", str(corpus), str(bad), "--output_dir", str(out), "--vocab_size", "1000", "--quiet"])
    assert "wrote" in capsys.readouterr().out
    card = json.loads((out / CARD_FILENAME).read_text())["corpus"]
    assert card["files"] == 10
    assert (card["skipped_empty_files"], card["skipped_binary_files"], card["skipped_undecodable_lines"]) == (1, 1, 1)
    assert (card["skipped_bad_json"], card["skipped_missing_field"], card["skipped_unreadable_files"]) == (1, 1, 1)
    sampling = json.loads((out / CARD_FILENAME).read_text())["sampling"]
    assert sampling["lines_cut"] == 1


def test_cli_errors_are_one_line(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    msg = run_main(train_main, ["--input", str(tmp_path / "empty.txt"), "--output_dir", str(tmp_path / "o1")])
    assert "no text" in msg
    assert not (tmp_path / "o1").exists()  # nothing half-written

    msg = run_main(train_main, ["--input", str(corpus), "--output_dir", str(tmp_path / "o2"), "--vocab_size", "300",
                                "--quiet"])
    assert "--vocab_size 300 is too small" in msg and not (tmp_path / "o2").exists()

    msg = run_main(train_main, ["--input", str(corpus), "--output_dir", str(tmp_path / "o3"), "--vocab_size",
                                "50000", "--quiet"])
    assert "too large" in msg

    (tmp_path / "afile").write_text("x")
    msg = run_main(train_main, ["--input", str(corpus), "--output_dir", str(tmp_path / "afile" / "sub")])
    assert "cannot write the output directory" in msg

    msg = run_main(train_main, ["--input", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o4")])
    assert "nope: no such file or directory" in msg

    msg = run_main(train_main, ["--input", str(corpus), "--output_dir", str(tmp_path / "o5"), "--vocab_size", "0"])
    assert "--vocab_size must be a positive integer" in msg


def test_existing_tokenizer_is_not_overwritten_without_flag(corpus, tok_dir, tmp_path):
    before = (tok_dir / "tokenizer.model").read_bytes()
    msg = run_main(train_main, ["--input", str(corpus), "--output_dir", str(tok_dir), "--vocab_size", "900"])
    assert "already exists; pass --overwrite" in msg
    assert (tok_dir / "tokenizer.model").read_bytes() == before


def test_cli_module_exits_without_traceback(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "tokenizer.train", "--input", str(tmp_path / "empty.jsonl"), "--output_dir",
         str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=limit(120),
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the corpus holds no text")


# ------------------------------------------------------------------------------------------------ stats


def test_compression_table_counts(tok, corpus):
    files = sorted(corpus.iterdir())
    rows, stats = compression_table({"a": tok}, files, progress=False)
    assert [r.input for r in rows] == [str(f) for f in files] + ["all"]
    en = next(r for r in rows if r.input.endswith("en.txt"))
    docs = mixed_documents()["en"]
    assert en.documents == len(docs)
    assert en.tokens == sum(len(tok.encode(d)) for d in docs)
    assert en.bytes == sum(len(d.encode()) for d in docs) and en.characters == sum(map(len, docs))
    assert en.tokens_per_byte == pytest.approx(en.tokens / en.bytes)
    zh = next(r for r in rows if "zh" in r.input)
    assert zh.bytes > zh.characters and zh.tokens_per_char > zh.tokens_per_byte  # 3 bytes per hanzi
    total = rows[-1]
    assert total.tokens == sum(r.tokens for r in rows[:-1]) and stats.documents == sum(r.documents for r in rows[:-1])
    assert 0 < total.vocab_used <= tok.vocab_size


def test_stats_cli_compares_tokenizers(tok_dir, special_dir, corpus, tmp_path, capsys):
    out = tmp_path / "stats.json"
    stats_main(["--tokenizer", f"plain={tok_dir}", "--tokenizer", f"special={special_dir / 'tokenizer.model'}",
                "--input", str(corpus / "zh.jsonl.gz"), str(corpus / "en.txt"), "--output_json", str(out),
                "--quiet", "--max_chars", "5000"])
    table = capsys.readouterr().out
    assert "tokens/byte" in table and "| zh.jsonl.gz | plain |" in table and "| all | special |" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["characters"] <= 5000 + 200 for r in rows if r["input"] != "all")

    msg = run_main(stats_main, ["--tokenizer", str(tok_dir), "--tokenizer", str(tok_dir), "--input", str(corpus)])
    assert "two tokenizers are named" in msg
    (tmp_path / "empty.txt").write_text("")
    msg = run_main(stats_main, ["--tokenizer", str(tok_dir), "--input", str(tmp_path / "empty.txt")])
    assert "hold no text" in msg
    msg = run_main(stats_main, ["--tokenizer", str(tmp_path / "missing"), "--input", str(corpus)])
    assert "no SentencePiece model" in msg
    msg = run_main(stats_main, ["--tokenizer", str(tok_dir), "--input", str(corpus), "--output_json",
                                str(tmp_path / "nodir" / "x.json")])
    assert "no such directory for --output_json" in msg


def test_stream_decoder_gives_the_whole_decode_piece_by_piece(tok):
    """Pushed token by token (any ids, byte-fallback pieces splitting characters included), the pieces add up to
    decode() of the whole sequence, and no piece ends in half a character; a context token keeps the reply's
    leading space as decoding it with the context does."""
    from tokenizer import StreamDecoder

    rng = np.random.default_rng(0)
    text = "今天早上，小明去了图书馆。 On Monday  morning, Alice found 12 + 35 = 47 maps. 😀 Ωmega"
    ids = tok.encode(text)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    assert byte_ids, "the fixture tokenizer has byte fallback"
    cases = [ids, list(rng.integers(0, tok.vocab_size, 300)), [tok.bos_id, *ids, tok.eos_id, *ids[:5]]]
    for case in cases:
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in case]
        assert "".join(pieces) + stream.flush() == tok.decode(case)
        assert not any(p.endswith("\ufffd") for p in pieces)
    emoji = "😀".encode()  # four byte-fallback tokens: nothing comes out until the last one
    stream = StreamDecoder(tok)
    assert [stream.push(tok.piece_to_id(f"<0x{b:02X}>")) for b in emoji] == ["", "", "", "😀"]

    head, reply = tok.encode("Alice went"), tok.encode(" to the market")
    stream = StreamDecoder(tok, head[-1:])
    got = "".join(stream.push(i) for i in reply) + stream.flush()
    assert got == tok.decode(head[-1:] + reply)[len(tok.decode(head[-1:])):] and got.startswith(" ")
    cut = StreamDecoder(tok, [tok.piece_to_id("<0xE4>")])  # a context ending mid-character is dropped
    assert "".join(cut.push(i) for i in reply) + cut.flush() == tok.decode(reply)
