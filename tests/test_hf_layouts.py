"""Released layouts that are LLaMA underneath (Baichuan-7B, XVERSE-13B) open onto our decoder with the logits of
transformers' LlamaForCausalLM on a LLaMA-layout copy of the same weights; Baichuan-7B is written back
(--layout baichuan); variants our decoder cannot represent (ALiBi, NormHead) and broken folders are refused in one
line naming the file and tensor. The folders here are built by hand from the released conventions, not by our
writer, so the reader is checked against the layout itself."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts import load_tokenizer, open_model
from common.errors import MissingFileError, UserError
from fixtures_quant import tiny_model_dir, tiny_tokenizer
from model import ModelConfig, Transformer
from model.hf import config_from_hf

# Full multi-head attention: Baichuan-7B's W_pack stacks q, k and v of the same size.
MHA = dict(n_kv_heads=4)
MARKER = "remote_code_ran"


def remote_code(folder: Path, *names: str) -> None:
    """Stand-ins for the release's remote code: importing one writes a marker file beside it."""
    for name in names:
        (folder / name).write_text(f"open({str(folder / MARKER)!r}, 'w').write('ran')\n")


def baichuan_folder(llama: Path, out: Path) -> Path:
    """Baichuan-7B's released layout of the weights in the LLaMA folder `llama`: W_pack = cat(q, k, v) rows,
    its config.json keys, tokenizer.model with a tokenization_baichuan.py-style tokenizer_config.json."""
    out.mkdir()
    hf = json.loads((llama / "config.json").read_text())
    state = load_file(llama / "model.safetensors")
    for i in range(hf["num_hidden_layers"]):
        parts = [state.pop(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv"]
        state[f"model.layers.{i}.self_attn.W_pack.weight"] = torch.cat(parts, dim=0)
    save_file(state, out / "model.safetensors")
    config = {
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"], "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": hf["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": hf["intermediate_size"], "max_position_embeddings": hf["max_position_embeddings"],
        "model_max_length": hf["max_position_embeddings"], "model_type": "baichuan",
        "num_attention_heads": hf["num_attention_heads"], "num_hidden_layers": hf["num_hidden_layers"],
        "rms_norm_eps": hf["rms_norm_eps"], "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.29.1", "use_cache": True, "vocab_size": hf["vocab_size"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(llama / "tokenizer.model", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaiChuanTokenizer", None]},
        "add_bos_token": False, "add_eos_token": False, "tokenizer_class": "BaiChuanTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}))
    remote_code(out, "configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
    return out


def xverse_folder(llama: Path, out: Path) -> Path:
    """XVERSE-13B's layout: LLaMA's tensor names, model_type xverse, tokenizer.json without tokenizer.model."""
    out.mkdir()
    hf = json.loads((llama / "config.json").read_text())
    shutil.copyfile(llama / "model.safetensors", out / "model.safetensors")
    config = {
        "architectures": ["XverseForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_xverse.XverseConfig",
                     "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3, "hidden_act": "silu",
        "hidden_size": hf["hidden_size"], "initializer_range": 0.02, "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf["max_position_embeddings"], "max_tokenizer_truncation": 96,
        "model_type": "xverse", "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf["num_key_value_heads"], "num_hidden_layers": hf["num_hidden_layers"],
        "rms_norm_eps": hf["rms_norm_eps"], "rope_theta": 10000, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": hf["vocab_size"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama / name).is_file():
            shutil.copyfile(llama / name, out / name)
    remote_code(out, "configuration_xverse.py", "modeling_xverse.py")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tok = tiny_tokenizer(root)
    llama, model = tiny_model_dir(root, tok, "llama", **MHA)
    gqa, _ = tiny_model_dir(root, tok, "llama_gqa", seed=1)  # 2 kv heads for 4 query heads
    ids = torch.tensor([tok.encode("the city of music and people", bos=True)])
    return dict(root=root, tok=tok, llama=llama, model=model, gqa=gqa, ids=ids,
                baichuan=baichuan_folder(llama, root / "baichuan"), xverse=xverse_folder(gqa, root / "xverse"))


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()(ids).logits


def our_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return open_model(folder, "cpu", "float32")(ids)


def test_baichuan_opens_with_llama_logits_and_runs_no_remote_code(folders):
    ids = folders["ids"]
    torch.testing.assert_close(our_logits(folders["baichuan"], ids), transformers_logits(folders["llama"], ids),
                               rtol=0, atol=1e-4)
    model = Transformer.from_hf(folders["baichuan"])  # init_from_hf (pretraining) and model_path (fine-tuning)
    assert model.config.max_seq_len == 128 and model.config.rope_theta == 10000.0
    tok = load_tokenizer(folders["baichuan"], None, model)
    assert tok.encode("the city", bos=True) == folders["tok"].encode("the city", bos=True)
    assert not (folders["baichuan"] / MARKER).exists()


def test_baichuan_export_round_trip(folders, tmp_path):
    ids = folders["ids"]
    model = open_model(folders["baichuan"], "cpu", "float32")
    out = model.to_hf(tmp_path / "out", tokenizer_path=folders["tok"].path, layout="baichuan")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "baichuan" and config["architectures"] == ["BaiChuanForCausalLM"]
    assert config["model_max_length"] == 128 and "rope_theta" not in config
    written = load_file(out / "model.safetensors")
    original = load_file(folders["baichuan"] / "model.safetensors")
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    torch.testing.assert_close(our_logits(out, ids), transformers_logits(folders["llama"], ids), rtol=0, atol=1e-4)


def test_export_cli_writes_baichuan_layout_sharded(folders, tmp_path):
    """pretrain.export --layout baichuan --max_shard_size: W_pack in shards with an index, opening the same."""
    from pretrain.export import main

    run = tmp_path / "run"
    (run / "step_000001").mkdir(parents=True)
    model = Transformer.from_hf(folders["llama"])
    torch.save({"module": model.state_dict()}, run / "step_000001" / "mp_rank_00_model_states.pt")
    (run / "latest").write_text("step_000001")
    model.config.save(run / "model_config.json")
    shutil.copyfile(folders["tok"].path, run / "tokenizer.model")
    main(["--model", str(run), "--output_dir", str(tmp_path / "hf"), "--layout", "baichuan",
          "--max_shard_size", "100KB"])
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.W_pack.weight" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    torch.testing.assert_close(our_logits(out, folders["ids"]), transformers_logits(folders["llama"],
                               folders["ids"]), rtol=0, atol=1e-4)


def test_xverse_opens_with_llama_logits_and_refuses_its_tokenizer_json(folders):
    ids = folders["ids"]
    torch.testing.assert_close(our_logits(folders["xverse"], ids), transformers_logits(folders["gqa"], ids),
                               rtol=0, atol=1e-4)
    model = Transformer.from_hf(folders["xverse"])
    assert model.config.n_kv_heads == 2
    with pytest.raises(MissingFileError, match=r"tokenizer\.json.*--tokenizer") as err:
        load_tokenizer(folders["xverse"], None, model)
    assert "\n" not in str(err.value)
    assert load_tokenizer(folders["xverse"], folders["tok"].path, model).vocab_size == folders["tok"].vocab_size
    assert not (folders["xverse"] / MARKER).exists()


def edited(folder: Path, out: Path, **changes) -> Path:
    """A copy of `folder` with config.json keys changed (None removes one)."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return out


@pytest.mark.parametrize("changes, words", [
    (dict(architectures=["BaichuanForCausalLM"], max_position_embeddings=None), "ALiBi"),
    (dict(architectures=["BaichuanForCausalLM"], hidden_size=5120), "ALiBi"),
    (dict(architectures=["BaichuanForCausalLM"], z_loss_weight=0), "NormHead"),
    (dict(vocab_size=125696), "NormHead"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
])
def test_baichuan_variants_are_refused_naming_the_difference(folders, tmp_path, changes, words):
    folder = edited(folders["baichuan"], tmp_path / "variant", **changes)
    with pytest.raises(UserError, match=words) as err:
        open_model(folder, "cpu", "float32")
    assert str(folder / "config.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("changes, words", [
    (dict(num_experts=8, moe_top_k=2), r"(moe_top_k=2|num_experts=8) makes this a mixture-of-experts model"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_xverse_variants_are_refused_naming_the_difference(folders, tmp_path, changes, words):
    folder = edited(folders["xverse"], tmp_path / "variant", **changes)
    with pytest.raises(UserError, match=words) as err:
        open_model(folder, "cpu", "float32")
    assert str(folder / "config.json") in str(err.value)


def test_unsupported_model_type_names_it_and_the_supported_ones(folders, tmp_path):
    folder = edited(folders["llama"], tmp_path / "bloom", model_type="bloom", architectures=["BloomForCausalLM"])
    with pytest.raises(UserError, match=r"'bloom' \(BloomForCausalLM\).*baichuan \(BaiChuanForCausalLM"):
        open_model(folder, "cpu", "float32")
    with pytest.raises(ValueError, match="bloom"):
        config_from_hf(json.loads((folder / "config.json").read_text()))


def test_w_pack_of_the_wrong_size_names_file_and_tensor(folders, tmp_path):
    folder = edited(folders["baichuan"], tmp_path / "bad")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.self_attn.W_pack.weight"] = state["model.layers.1.self_attn.W_pack.weight"][:128]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.W_pack\.weight "
                                        r"has shape \(128, 64\).*\(192, 64\).*3 x hidden_size 64"):
        open_model(folder, "cpu", "float32")


def test_config_contradicting_weights_names_file_and_tensor(folders, tmp_path):
    folder = edited(folders["baichuan"], tmp_path / "layers", num_hidden_layers=1)
    with pytest.raises(UserError, match=r"model\.safetensors: tensor model\.layers\.1\..* no place"):
        open_model(folder, "cpu", "float32")
    folder = edited(folders["baichuan"], tmp_path / "more", num_hidden_layers=3)
    with pytest.raises(UserError, match=r"model\.safetensors: tensor model\.layers\.2\..* missing"):
        open_model(folder, "cpu", "float32")


def test_baichuan_export_of_what_it_cannot_hold_is_refused_writing_nothing(folders, tmp_path):
    model = Transformer.from_hf(folders["gqa"])
    with pytest.raises(UserError, match="key/value heads.*--layout llama"):
        model.to_hf(tmp_path / "out", layout="baichuan")
    with pytest.raises(UserError, match="--layout 'bloom'"):
        model.to_hf(tmp_path / "out", layout="bloom")
    rope = Transformer(ModelConfig.from_dict({**model.config.to_dict(), "n_kv_heads": 4, "rope_theta": 5e5}))
    with pytest.raises(UserError, match="rope_theta 500000"):
        rope.to_hf(tmp_path / "out", layout="baichuan")
    assert list(tmp_path.iterdir()) == []


def test_merge_cli_writes_the_layout_asked(folders, tmp_path):
    """finetune.merge --layout baichuan on a Baichuan base: the merged folder is Baichuan-7B's layout, sharded."""
    from finetune.lora import prepare_lora
    from finetune.merge import main
    from model.lora import LoRAConfig
    from model.lora_peft import save_adapter

    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    tuned = prepare_lora(Transformer.from_hf(folders["baichuan"]), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        expected = open_model(folders["baichuan"], "cpu", "float32")
    save_adapter(tuned, cfg, tmp_path / "adapter", folders["baichuan"])
    main(["--model", str(folders["baichuan"]), "--adapter", str(tmp_path / "adapter"), "--output_dir",
          str(tmp_path / "merged"), "--layout", "baichuan", "--max_shard_size", "60KB"])
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["model_type"] == "baichuan"
    assert "model.layers.0.self_attn.W_pack.weight" in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = our_logits(out, folders["ids"])
    with torch.no_grad():
        torch.testing.assert_close(merged, tuned.eval()(folders["ids"]), rtol=0, atol=1e-4)
        assert not torch.allclose(merged, expected(folders["ids"]), atol=1e-3)  # the adapter did change it


@pytest.mark.slow
def test_a_command_refuses_an_alibi_baichuan_in_one_line(folders, tmp_path):
    """As a user sees it: python -m inference.generate --model on a Baichuan-13B folder exits 1 with one line."""
    import os
    import subprocess
    import sys

    from fixtures_time import limit

    folder = edited(folders["baichuan"], tmp_path / "b13", architectures=["BaichuanForCausalLM"], hidden_size=5120,
                    max_position_embeddings=None)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "inference.generate", "--model", str(folder), "--prompt", "hi"],
                          cwd=root, capture_output=True, text=True, timeout=limit(60),
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ALiBi" in last and str(folder / "config.json") in last
    assert "Traceback" not in proc.stderr


def test_continued_pretraining_starts_from_a_baichuan_folder(folders):
    """pretrain.train.build_model with init_from_hf naming a Baichuan-7B folder: its weights, our architecture."""
    from pretrain.config import TrainConfig
    from pretrain.train import build_model

    model = build_model(TrainConfig(init_from_hf=str(folders["baichuan"]), activation_checkpointing=True),
                        folders["tok"], False)
    reference = folders["model"].state_dict()
    assert model.config.activation_checkpointing and model.state_dict().keys() == reference.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_released_baichuan_7b_config_reads_as_the_baichuan_7b_preset():
    """Baichuan-7B's config.json keys as released (BaiChuanForCausalLM, no rope_theta, no num_key_value_heads)."""
    released = {
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "baichuan",
        "num_attention_heads": 32, "num_hidden_layers": 32, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "vocab_size": 64000,
    }
    assert config_from_hf(released) == ModelConfig.from_preset("baichuan-7b")


def test_evaluation_runs_xverse_on_our_decoder_with_its_tokenizer_json(folders):
    """The evaluation commands read a tokenizer.json-only folder with transformers' tokenizer (no remote code) and
    run the XVERSE weights on our decoder."""
    from evaluation.backends import HFTokenizer, load

    loaded = load(folders["xverse"], None, "cpu", "float32")
    assert loaded.backend == "ours" and isinstance(loaded.tokenizer, HFTokenizer)
    text = "the city of music and people"
    assert loaded.tokenizer.encode(text) == folders["tok"].encode(text)
    assert not (folders["xverse"] / MARKER).exists()
