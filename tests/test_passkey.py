"""Passkey retrieval: the table's logic against a model whose reach is known exactly, and the CLI end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from evaluation.passkey import INTRO, NEEDLE, QUESTION, build_trial, format_table, passkey_table
from fixtures_tokenizer import train_small, write_corpus
from fixtures_train import REPO, env
from model import ModelConfig, Transformer
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey")
    train_small(write_corpus(root / "corpus", n=200), root / "tok", vocab_size=800, num_threads=1)
    return Tokenizer(root / "tok")


class WindowedCopier:
    """A stand-in language model that retrieves by copying, but only within `window` tokens.

    At each position it finds the latest earlier place (at most `window` back) where the last 3 tokens occurred
    and predicts the token that followed there (an induction head with a bounded reach); else token 0. So it
    answers the passkey question exactly when "pass key is" in the needle is within `window` tokens of the
    question's end, and the table must show that boundary.
    """

    def __init__(self, vocab: int, window: int, max_seq_len: int):
        self.vocab, self.window = vocab, window
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def new_cache(self, batch_size: int, max_len: int) -> list[int]:
        return []

    def __call__(self, tokens, cache, output_positions=None):
        cache.extend(tokens[0].tolist())
        start = len(cache) - tokens.shape[1] if output_positions is None else len(cache) - 1
        logits = torch.zeros(1, len(cache) - start, self.vocab)
        for t in range(start, len(cache)):
            nxt = 0
            for s in range(t - 1, max(t - self.window, 2) - 1, -1):
                if cache[s - 2:s + 1] == cache[t - 2:t + 1]:
                    nxt = cache[s + 1]
                    break
            logits[0, t - start, nxt] = 1.0
        return logits[:, -1] if output_positions is not None else logits  # only the rows asked for


def expected_retrieval(tok, length: int, depth: float, key: str, window: int) -> bool:
    """Independently of the evaluator: is the needle's "... is" token within `window` of the prompt's end?"""
    trial = build_trial(tok, length, depth, key)
    needle = tok.encode(NEEDLE.format(key=key))
    at = next(i for i in range(len(trial.prompt)) if trial.prompt[i:i + len(needle)] == needle)
    first_answer = next(i for i in range(len(needle)) if needle[i:i + len(trial.answer)] == trial.answer)
    return (len(trial.prompt) - 1) - (at + first_answer - 1) < window


def test_table_marks_exactly_the_cells_within_the_models_reach(tok):
    lengths, depths, window = [250, 500, 1000], [0.0, 0.5, 1.0], 400
    model = WindowedCopier(tok.vocab_size, window, max_seq_len=1024)
    result = passkey_table(model, tok, lengths, depths, trials=2, digits=5, seed=1, progress=False)
    keys = sorted({r["passkey"] for r in result["records"]})
    expected = [[sum(expected_retrieval(tok, n, d, k, window) for k in keys) / 2 for n in lengths] for d in depths]
    assert result["accuracy"] == expected
    flat = [a for row in expected for a in row]
    assert 0.0 in flat and 1.0 in flat  # the boundary lies inside the table
    assert expected[-1] == [1.0, 1.0, 1.0]  # needle next to the question: always in reach
    assert expected[0][-1] == 0.0  # needle at the start of the longest prompt: out of reach
    for r in result["records"]:
        assert r["prompt_tokens"] <= r["length"]
        assert r["retrieved"] == (r["predicted_ids"] == r["answer_ids"])
    table = format_table(result)
    assert table.splitlines()[0] == "| depth \\ length | 250 | 500 | 1000 |"
    assert table.splitlines()[2].startswith("| 0% | 100% | ")


def test_needle_depth_and_length_are_placed_as_asked(tok):
    short, deep = build_trial(tok, 300, 0.0, "12345"), build_trial(tok, 300, 1.0, "12345")
    needle = tok.encode(NEEDLE.format(key="12345"))
    assert len(short.prompt) == len(deep.prompt) <= 300
    assert len(short.prompt) > 300 - len(tok.encode("The grass is green. The sky is blue. The sun is yellow. "
                                                     "Here we go. There and back again.")) - 10
    pos = [next(i for i in range(len(t.prompt)) if t.prompt[i:i + len(needle)] == needle) for t in (short, deep)]
    assert pos[0] == len(tok.encode(INTRO, bos=True))  # depth 0: right after the introduction
    assert pos[1] == len(deep.prompt) - len(tok.encode(QUESTION)) - len(needle)  # depth 1: right before the question
    with pytest.raises(ValueError, match="--lengths 20 is too short"):
        build_trial(tok, 20, 0.5, "12345")


def test_cli_runs_a_real_model_and_rejects_lengths_beyond_its_context(tok, tmp_path, capsys):
    from evaluation.passkey import main

    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("debug", vocab_size=tok.vocab_size, max_seq_len=512)).to_hf(
        tmp_path / "hf", tokenizer_path=tok.path)
    args = ["--model", str(tmp_path / "hf"), "--lengths", "256", "512", "--depths", "0", "1", "--trials", "2",
            "--quiet", "--output_json", str(tmp_path / "out.json")]
    out = subprocess.run([sys.executable, "-m", "evaluation.passkey", *args], cwd=REPO, env=env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| depth \\ length | 256 | 512 |" in out.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert len(result["records"]) == 8 and result["rope"]["max_seq_len"] == 512
    # An untrained model: whatever it predicts, the verdict must agree with its predictions.
    assert all(r["retrieved"] == (r["predicted_ids"] == r["answer_ids"]) for r in result["records"])

    longer = args[:3] + ["1024"] + args[4:]
    with pytest.raises(SystemExit) as exit_:
        main(longer)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.strip().count("\n") == 0
    assert "--lengths 1024 exceeds the model's max_seq_len=512" in err
    # Inference-time scaling opens the longer length.
    main(longer + ["--rope_type", "dynamic", "--rope_factor", "2", "--rope_original_max_seq_len", "512",
                   "--max_seq_len", "1024"])
    assert json.loads((tmp_path / "out.json").read_text())["rope"]["rope_type"] == "dynamic"
    with pytest.raises(SystemExit):
        main(args + ["--rope_type", "linear", "--rope_factor", "0.5"])
    assert "rope_factor must be >= 1" in capsys.readouterr().err
