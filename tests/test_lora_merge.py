"""Merging adapters into a base (finetune.merge), `--adapter` on open_model and the CLIs, and delta weights
(finetune.delta): parity within fp32 rounding, provenance checks, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts import open_model
from finetune import delta as delta_cli
from finetune import merge as merge_cli
from fixtures_eval import eval_assets  # noqa: F401 (a fixture)
from fixtures_tokenizer import train_small, write_corpus
from fixtures_train import REPO, env
from model import ModelConfig, Transformer
from inference.generate import main as generate_main
from finetune.lora import prepare_lora
from model.lora import LoRAConfig
from model.lora_peft import save_adapter
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def random_adapter(model: Transformer, cfg: LoRAConfig, seed: int) -> Transformer:
    prepare_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base HF folder with a tokenizer and two adapters, the second with a chat template beside it."""
    root = tmp_path_factory.mktemp("merge")
    train_small(write_corpus(root / "corpus", n=60), root / "tok", vocab_size=600)
    tok = Tokenizer(root / "tok")
    config = ModelConfig.from_preset("debug", vocab_size=tok.vocab_size, attn_impl="eager")
    torch.manual_seed(0)
    Transformer(config).to_hf(root / "base", tokenizer_path=tok.path)
    cfgs = [LoRAConfig(r=4, alpha=8, target_modules=["all"]), LoRAConfig(r=2, alpha=2, target_modules=["v_proj"])]
    for n, cfg in enumerate(cfgs):
        model = random_adapter(Transformer.from_hf(root / "base"), cfg, seed=n + 1)
        save_adapter(model, cfg, root / f"adapter{n}", root / "base")
    (root / "adapter1" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return root, tok


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))


def test_merge_cli_matches_base_plus_adapters_and_keeps_the_chat_template(setup, tmp_path):
    root, tok = setup
    merge_cli.main(["--model", str(root / "base"), "--adapter", str(root / "adapter0"),
                    "--adapter", str(root / "adapter1"), "--output_dir", str(tmp_path / "merged")])
    x = tokens(tok.vocab_size)
    # Reference: the adapters applied one after the other as separate branches, never merged.
    ref_model = open_model(root / "base", "cpu", "float32", adapter=root / "adapter0", merge_adapter=False)
    with torch.no_grad():
        after_first = ref_model(x)
        ref_model = open_model(root / "base", "cpu", "float32", adapter=[root / "adapter0", root / "adapter1"],
                               merge_adapter=False)
        ref = ref_model(x)
    assert (after_first - ref).abs().max() > 1e-3  # the second adapter matters
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        ours = Transformer.from_hf(tmp_path / "merged", attn_impl="eager").eval()(x)
    assert (ours - ref).abs().max() < 1e-5
    assert (theirs - ref).abs().max() < 1e-4  # transformers' own kernels, as in test_model's parity test
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert hf_tok.chat_template == TEMPLATE
    assert hf_tok("Order 12", add_special_tokens=False)["input_ids"] == tok.encode("Order 12")
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in info["adapters"]] == ["adapter0", "adapter1"]


def test_merge_cli_errors_are_one_line(setup, tmp_path):
    root, _ = setup
    (tmp_path / "empty_adapter").mkdir()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    cases = [(["--adapter", str(tmp_path / "empty_adapter"), "--output_dir", str(tmp_path / "o1")],
              "no adapter_config.json"),
             (["--adapter", str(root / "adapter0"), "--output_dir", str(tmp_path / "busy")], "--overwrite")]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "-m", "finetune.merge", "--model", str(root / "base"), *extra],
                              cwd=REPO, env=env(), capture_output=True, text=True)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o1").exists()


def test_generate_cli_takes_an_adapter(setup, capsys):
    root, tok = setup
    generate_main(["--model", str(root / "base"), "--adapter", str(root / "adapter0"), "--prompt", "Order 12",
                   "--max_new_tokens", "6"])
    printed = capsys.readouterr().out.removesuffix("\n")
    model = open_model(root / "base", "cpu", "float32", adapter=root / "adapter0", merge_adapter=False)
    ids = tok.encode("Order 12", bos=True)
    expected = model.generate(torch.tensor([ids]), 6, eos_id=tok.eos_id)[0].tolist()
    assert printed == tok.decode([i for i in expected if i not in (tok.bos_id, tok.eos_id)])


def test_evaluation_takes_an_adapter(eval_assets, tmp_path):  # noqa: F811
    from evaluation import evaluate_mmlu

    cfg = LoRAConfig(r=4, alpha=16, target_modules=["all"])
    save_adapter(random_adapter(Transformer.from_hf(eval_assets["model"]), cfg, seed=5), cfg, tmp_path / "adapter",
                 eval_assets["model"])
    merge_cli.main(["--model", str(eval_assets["model"]), "--adapter", str(tmp_path / "adapter"),
                    "--output_dir", str(tmp_path / "merged")])
    probs = {}
    for name, model, extra in (("base", eval_assets["model"], []),
                               ("adapter", eval_assets["model"], ["--adapter", str(tmp_path / "adapter")]),
                               ("merged", tmp_path / "merged", [])):
        evaluate_mmlu.main(["--model_name_or_path", str(model), "--data_dir", str(eval_assets["mmlu"]),
                            "--output_dir", str(tmp_path / f"eval_{name}"), "--subjects", "anatomy", *extra])
        lines = (tmp_path / f"eval_{name}" / "predictions.jsonl").read_text().splitlines()
        probs[name] = torch.tensor([json.loads(line)["probs"] for line in lines])
    assert (probs["adapter"] - probs["base"]).abs().max() > 1e-3
    assert (probs["adapter"] - probs["merged"]).abs().max() < 1e-5
    settings = json.loads((tmp_path / "eval_adapter" / "results.json").read_text())["settings"]
    assert settings["adapter"] == str((tmp_path / "adapter").resolve())


# ---- delta weights ----

def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of b (fp32)."""
    spacing = torch.nextafter(b.abs(), torch.full_like(b, float("inf"))) - b.abs()
    return (a - b).abs() / spacing


def test_delta_round_trip_is_within_one_ulp(setup, tmp_path, monkeypatch):
    root, _ = setup
    merge_cli.main(["--model", str(root / "base"), "--adapter", str(root / "adapter0"),
                    "--output_dir", str(tmp_path / "target")])
    monkeypatch.setattr(delta_cli, "SHARD_BYTES", 200_000)  # several shards even for the tiny model
    delta_cli.main(["make", "--base", str(root / "base"), "--target", str(tmp_path / "target"),
                    "--output_dir", str(tmp_path / "delta")])
    assert len(list((tmp_path / "delta").glob("delta-*.safetensors"))) > 1
    cfg = json.loads((tmp_path / "delta" / "delta_config.json").read_text())
    assert cfg["base_vocab_size"] == 600 and len(cfg["base_sha256"]) == 64
    delta_cli.main(["apply", "--base", str(root / "base"), "--delta", str(tmp_path / "delta"),
                    "--output_dir", str(tmp_path / "rebuilt")])
    target = load_file(str(tmp_path / "target" / "model.safetensors"))
    rebuilt = {}
    for f in (tmp_path / "rebuilt").glob("model*.safetensors"):
        rebuilt.update(load_file(str(f)))
    assert rebuilt.keys() == target.keys()
    changed = 0
    for name, t in target.items():
        assert rebuilt[name].dtype == t.dtype == torch.float32
        assert ulps_apart(rebuilt[name], t).max() <= 1, name
        changed += int(not torch.equal(load_file(str(root / "base" / "model.safetensors"))[name], t))
    assert changed > 0  # the adapter did move weights, so the delta is not trivially zero
    # The rebuilt folder is a complete model: transformers opens it, tokenizer and all.
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "rebuilt")


def test_delta_refuses_the_wrong_base(setup, tmp_path):
    root, _ = setup
    base = load_file(str(root / "base" / "model.safetensors"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((root / "base" / "config.json").read_text())
    save_file({k: v + (1e-3 if k.endswith("norm.weight") else 0) for k, v in base.items()},
              str(other / "model.safetensors"))
    delta_cli.main(["make", "--base", str(other), "--target", str(root / "base"), "--output_dir",
                    str(tmp_path / "delta")])
    wider = tmp_path / "wider"
    wider.mkdir()
    save_file({k: torch.zeros(640, v.shape[1]) if v.shape[0] == 600 else v for k, v in base.items()},
              str(wider / "model.safetensors"))
    for wrong, message in ((root / "base", "made from a base with weights sha256"),
                           (wider, "600-token vocabulary, but base")):
        proc = subprocess.run([sys.executable, "-m", "finetune.delta", "apply", "--base", str(wrong), "--delta",
                               str(tmp_path / "delta"), "--output_dir", str(tmp_path / "out")],
                              cwd=REPO, env=env(), capture_output=True, text=True)
        last = proc.stderr.strip().splitlines()[-1]  # progress bars may come before it
        assert proc.returncode == 1 and last.startswith("error: ") and message in last, proc.stderr
        assert str(wrong) in last and str(tmp_path / "delta") in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_delta_make_needs_the_same_shapes(setup, tmp_path):
    root, _ = setup
    base = load_file(str(root / "base" / "model.safetensors"))
    wider = tmp_path / "wider"
    wider.mkdir()
    save_file({k: torch.zeros(640, v.shape[1]) if v.shape[0] == 600 else v for k, v in base.items()},
              str(wider / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        delta_cli.make_delta(root / "base", wider, tmp_path / "delta")
    assert "has shape (600, 64) in base" in str(e.value) and "(640, 64) in target" in str(e.value)
    assert not (tmp_path / "delta").exists()
