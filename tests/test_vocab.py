"""Vocabulary extension: tokenizer merge (ids kept, HF files exact), embedding resize, embeddings-only training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from fixtures_tokenizer import mixed_documents, train_small
from fixtures_train import REPO, env
from model import ModelConfig, Transformer
from model.resize import resize_hf
from tokenizer import Tokenizer
from tokenizer.hf import load_model_proto
from tokenizer.merge import merge_tokenizers

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """A base tokenizer trained on English only and an extra one trained on Chinese only (plus a little English,
    so that some pieces are duplicates), and their merge."""
    root = tmp_path_factory.mktemp("vocab")
    docs = mixed_documents(400, seed=3)
    (root / "en").mkdir()
    (root / "en" / "en.txt").write_text("\n\n".join(docs["en"] + docs["numbers"]) + "\n", encoding="utf-8")
    (root / "zh").mkdir()
    (root / "zh" / "zh.txt").write_text("\n\n".join(docs["zh"] + docs["en"][:40]) + "\n", encoding="utf-8")
    train_small(root / "en", root / "base", vocab_size=600, num_threads=1)
    train_small(root / "zh", root / "extra", vocab_size=900, num_threads=1)
    merge_tokenizers(root / "base", root / "extra", root / "merged")
    return {"root": root, "base": root / "base" / "tokenizer.model", "extra": root / "extra" / "tokenizer.model",
            "merged": root / "merged" / "tokenizer.model", "zh_text": docs["zh"][:50], "en_text": docs["en"][:50]}


def test_merge_keeps_every_original_id_and_appends_new_pieces_in_order(tokenizers):
    base, extra, merged = (load_model_proto(tokenizers[k]) for k in ("base", "extra", "merged"))
    n = len(base.pieces)
    for i, p in enumerate(base.pieces):  # every original piece keeps its id, type and score
        q = merged.pieces[i]
        assert (q.piece, q.type, q.score) == (p.piece, p.type, p.score)
    base_set = {p.piece for p in base.pieces}
    kinds = (spm.sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL,
             spm.sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    expected = [p.piece for p in extra.pieces if p.type in kinds and p.piece not in base_set]
    duplicates = [p.piece for p in extra.pieces if p.type in kinds and p.piece in base_set]
    assert duplicates, "the fixture should share some pieces"
    assert [p.piece for p in merged.pieces[n:]] == expected  # appended once each, in the extra model's order
    new_scores = [p.score for p in merged.pieces[n:]]
    assert all(a > b for a, b in zip(new_scores, new_scores[1:]))  # order kept
    assert max(new_scores) < min(p.score for p in base.pieces if p.type == kinds[0])  # below every base merge
    card = json.loads((tokenizers["root"] / "merged" / "merge.json").read_text())
    assert card["added"] == len(expected) and card["duplicates_skipped"] == len(duplicates)

    old, new = Tokenizer(tokenizers["base"]), Tokenizer(tokenizers["merged"])
    assert (new.bos_id, new.eos_id, new.unk_id) == (old.bos_id, old.eos_id, old.unk_id)
    assert new.vocab_size == n + len(expected)
    # English (which the extra model saw a little of) is not longer; Chinese gets much shorter; both decode back.
    en_old = sum(len(old.encode(t)) for t in tokenizers["en_text"])
    assert sum(len(new.encode(t)) for t in tokenizers["en_text"]) <= en_old
    for text in tokenizers["en_text"][:10]:
        assert new.decode(new.encode(text)) == text
    zh_old = sum(len(old.encode(t)) for t in tokenizers["zh_text"])
    zh_new = sum(len(new.encode(t)) for t in tokenizers["zh_text"])
    assert zh_new < 0.5 * zh_old
    for text in tokenizers["zh_text"][:10]:
        assert new.decode(new.encode(text)) == text
    # The Hugging Face files written beside it give SentencePiece's ids.
    hf = transformers.AutoTokenizer.from_pretrained(tokenizers["root"] / "merged")
    for text in tokenizers["zh_text"][:20] + tokenizers["en_text"][:20]:
        assert hf(text, add_special_tokens=False).input_ids == new.encode(text)


def test_merge_of_a_different_model_type_is_a_one_line_error(tokenizers, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(tokenizers["en_text"] * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "uni"), vocab_size=100,
                                   model_type="unigram", minloglevel=2)
    out = subprocess.run([sys.executable, "-m", "tokenizer.merge", "--base", str(tokenizers["base"]), "--extra",
                          str(tmp_path / "uni.model"), "--output_dir", str(tmp_path / "m")],
                         cwd=REPO, env=env(), capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "error: cannot merge" in out.stderr and "(UNIGRAM) into" in out.stderr and "(BPE)" in out.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_resized_model_keeps_logits_of_old_ids(tokenizers, tmp_path, tie):
    old_tok, new_tok = Tokenizer(tokenizers["base"]), Tokenizer(tokenizers["merged"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug", vocab_size=old_tok.vocab_size, tie_embeddings=tie,
                                                attn_impl="eager")).eval()
    model.to_hf(tmp_path / "hf", tokenizer_path=tokenizers["base"])
    resize_hf(tmp_path / "hf", tmp_path / "big", tokenizer=tokenizers["merged"], pad_to_multiple_of=64)
    big = Transformer.from_hf(tmp_path / "big", attn_impl="eager").eval()
    assert big.config.vocab_size == -(-new_tok.vocab_size // 64) * 64
    x = torch.tensor([old_tok.encode(t, bos=True)[:40] for t in tokenizers["en_text"][:3] if len(
        old_tok.encode(t, bos=True)) >= 40] or [list(range(40))])
    with torch.no_grad():
        before, after = model(x), big(x)
    assert torch.equal(after[..., :old_tok.vocab_size], before)  # every old id's logit is unchanged
    emb = big.tok_embeddings.weight
    assert torch.allclose(emb[old_tok.vocab_size:], model.tok_embeddings.weight.mean(0).expand(
        emb.shape[0] - old_tok.vocab_size, -1), atol=1e-6)  # new rows: the mean of the old ones
    # transformers agrees on the resized folder, and its tokenizer is the merged one.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "big", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(x).logits - after).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "big")
    assert hf_tok(tokenizers["zh_text"][0], add_special_tokens=False).input_ids == new_tok.encode(
        tokenizers["zh_text"][0])


def test_resize_refuses_to_drop_ids_in_use(tokenizers, tmp_path):
    tok = Tokenizer(tokenizers["merged"])
    Transformer(ModelConfig.from_preset("debug", vocab_size=tok.vocab_size)).to_hf(tmp_path / "hf",
                                                                                  tokenizer_path=tokenizers["merged"])
    out = subprocess.run([sys.executable, "-m", "model.resize", "--model", str(tmp_path / "hf"), "--output_dir",
                          str(tmp_path / "small"), "--vocab_size", str(tok.vocab_size - 1)],
                         cwd=REPO, env=env(), capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0
    assert f"uses ids up to {tok.vocab_size - 1}" in out.stderr and not (tmp_path / "small").exists()
    # Shrinking padding rows that no id uses is fine.
    resize_hf(tmp_path / "hf", tmp_path / "padded", vocab_size=tok.vocab_size + 10)
    resize_hf(tmp_path / "padded", tmp_path / "unpadded", vocab_size=tok.vocab_size)
    a = Transformer.from_hf(tmp_path / "hf").tok_embeddings.weight
    assert torch.equal(Transformer.from_hf(tmp_path / "unpadded").tok_embeddings.weight, a)
    # A sharded source: its shards are read, not copied beside the rewritten model.safetensors.
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    resize_hf(tmp_path / "sharded", tmp_path / "from_shards", vocab_size=tok.vocab_size + 64)
    assert [f.name for f in (tmp_path / "from_shards").glob("*.safetensors")] == ["model.safetensors"]
    assert not list((tmp_path / "from_shards").glob("*.index.json"))
    grown = Transformer.from_hf(tmp_path / "from_shards").tok_embeddings.weight
    assert torch.equal(grown[:tok.vocab_size], a)


def test_continued_pretraining_trains_only_embeddings_and_head_first(tokenizers, tmp_path):
    from pretrain.config import TrainConfig
    from pretrain.train import build_model, build_optimizer

    old_tok, new_tok = Tokenizer(tokenizers["base"]), Tokenizer(tokenizers["merged"])
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("debug", vocab_size=old_tok.vocab_size)).to_hf(tmp_path / "hf")
    resize_hf(tmp_path / "hf", tmp_path / "big", tokenizer=tokenizers["merged"])
    cfg = TrainConfig(init_from_hf=str(tmp_path / "big"), train_only_embeddings=True, seq_len=32, lr=1e-2)
    model = build_model(cfg, new_tok, resuming=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(cfg, model)
    ids = torch.tensor([new_tok.encode("".join(tokenizers["zh_text"]))[:33]])
    for _ in range(3):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"tok_embeddings.weight", "output.weight"}
    with pytest.raises(ValueError, match=r"seq_len=512 exceeds the model's max_seq_len=256; raise model.max_seq_len"):
        build_model(TrainConfig(init_from_hf=str(tmp_path / "big"), seq_len=512), new_tok, resuming=False)
    # ABF: a larger rope_theta and a longer context from the same folder (the long-context config's recipe).
    longer = build_model(TrainConfig(init_from_hf=str(tmp_path / "big"), seq_len=512,
                                     model={"rope_theta": 500000.0, "max_seq_len": 1024}), new_tok, resuming=False)
    assert (longer.config.rope_theta, longer.config.max_seq_len) == (500000.0, 1024)
