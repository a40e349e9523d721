"""A model folder with its tokenizer: HF export with tokenizer files, and the generate CLI."""
import subprocess
import sys

import pytest
import torch

from fixtures_tokenizer import train_small, write_corpus
from model import ModelConfig, Transformer
from inference.generate import main as generate_main
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    train_small(write_corpus(root / "corpus", n=60), root / "tok", vocab_size=600)
    tok = Tokenizer(root / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("debug", vocab_size=tok.vocab_size))
    model.to_hf(root / "hf", tokenizer_path=tok.path)
    return root / "hf", model, tok


def test_export_with_tokenizer_loads_in_transformers(hf_folder):
    path, model, tok = hf_folder
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "Order 12345 shipped 床前明月光\n    return  x"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert (hf_model.config.bos_token_id, hf_model.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        assert (hf_model(ids).logits - model.eval()(ids)).abs().max() < 1e-4


def test_generate_cli_prints_greedy_continuation(hf_folder, capsys):
    path, model, tok = hf_folder
    generate_main(["--model", str(path), "--prompt", "Order 12", "--max_new_tokens", "8"])
    printed = capsys.readouterr().out.removesuffix("\n")
    ids = tok.encode("Order 12", bos=True)
    expected = model.eval().generate(torch.tensor([ids]), 8, eos_id=tok.eos_id)[0].tolist()
    assert printed == tok.decode([i for i in expected if i not in (tok.bos_id, tok.eos_id)])
    assert printed.startswith("Order 12")


def test_generate_cli_bad_folder_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "inference.generate", "--model", str(tmp_path), "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and str(tmp_path) in proc.stderr


def test_sampling_flags_give_one_settings_type_and_errors_name_the_flag():
    import argparse

    from model.generate import SamplingParams, add_sampling_args, sampling_from_args

    p = argparse.ArgumentParser()
    add_sampling_args(p, SamplingParams(max_tokens=7, top_p=0.9, seed=0), engine=True)
    assert sampling_from_args(p.parse_args([])) == SamplingParams(max_tokens=7, top_p=0.9, seed=0)
    got = sampling_from_args(p.parse_args(["--temperature", "0.5", "--stop", "a", "--stop", "b", "--top_k", "3"]))
    assert (got.temperature, got.stop, got.top_k) == (0.5, ("a", "b"), 3)
    with pytest.raises(ValueError, match=r"^--max_new_tokens must be a positive integer, got 0$"):
        sampling_from_args(p.parse_args(["--max_new_tokens", "0"]))
    with pytest.raises(ValueError, match=r"^--top_p must be in \(0, 1\], got 0.0$"):
        sampling_from_args(p.parse_args(["--top_p", "0"]))
