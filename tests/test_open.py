"""artifacts.open_model, the one opener of every command: each kind of folder opens to the same model, --adapter and
--quantize apply on load, runtime settings are build-time settings, and every folder a command cannot use is refused
in one line that says what it is and what to pass instead."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from artifacts import load_tokenizer, open_model
from artifacts.quantized import FORMATS, quantized_format
from common.errors import UserError
from finetune.lora import prepare_lora
from fixtures_quant import tiny_model_dir, tiny_tokenizer
from model import Transformer
from model.lora import LoRAConfig, lora_state_dict
from model.lora_peft import save_adapter
from model.quant import Int4Linear, Int8Linear, quantize_model


def write_run_dir(path, model: Transformer, tok, extra_state: dict | None = None, step: int = 5):
    """A training run directory as DeepSpeed writes it at ZeRO stage 0: step_N/mp_rank_00_model_states.pt holding
    the module's full state under "module", a `latest` file, model_config.json and tokenizer.model."""
    tag = f"step_{step:06d}"
    (path / tag).mkdir(parents=True)
    state = {**{k: v.clone() for k, v in model.state_dict().items()}, **(extra_state or {})}
    torch.save({"module": state}, path / tag / "mp_rank_00_model_states.pt")
    (path / "latest").write_text(tag)
    model.config.save(path / "model_config.json")
    shutil.copyfile(tok.path, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("open")
    tok = tiny_tokenizer(root)
    hf, model = tiny_model_dir(root, tok)
    ids = torch.tensor([tok.encode("the city of music and people", bos=True)])
    # A LoRA adapter with random (non-zero) weights, as a PEFT folder and as a LoRA run's checkpoint.
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    tuned = prepare_lora(Transformer.from_hf(hf), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(tuned, cfg, root / "adapter", hf)
    lora_run = write_run_dir(root / "lora_run", Transformer.from_hf(hf), tok, lora_state_dict(tuned))
    (lora_run / "finetune.json").write_text(json.dumps({"finetuning_type": "lora", "model_path": str(hf),
                                                        "lora": dataclasses.asdict(cfg)}))
    run = write_run_dir(root / "run", model, tok)
    from inference.quantize import main as quantize_main

    quantize_main(["--model", str(hf), "--scheme", "int8", "--output_dir", str(root / "q8")])
    return dict(root=root, tok=tok, hf=hf, model=model, ids=ids, run=run, lora_run=lora_run, q8=root / "q8",
                adapter=root / "adapter")


def test_every_kind_of_folder_opens(folders):
    f = folders
    ref = f["model"](f["ids"])
    assert torch.equal(open_model(f["hf"], "cpu", "float32")(f["ids"]), ref)
    assert torch.equal(open_model(f["run"], "cpu", "float32")(f["ids"]), ref)
    assert torch.equal(open_model(f["run"], "cpu", "float32", tag="step_000005")(f["ids"]), ref)
    # a LoRA run directory: its base with the checkpoint's adapter merged, the same as the base + --adapter
    with_adapter = open_model(f["hf"], "cpu", "float32", adapter=f["adapter"])(f["ids"])
    lora_run = open_model(f["lora_run"], "cpu", "float32")
    torch.testing.assert_close(lora_run(f["ids"]), with_adapter, rtol=0, atol=1e-5)
    assert (with_adapter - ref).abs().max() > 1e-3  # the adapter really changes the model
    assert not any(".lora." in k for k in lora_run.state_dict())  # merged, not a branch
    assert load_tokenizer(f["lora_run"], None, lora_run).path.read_bytes() == f["tok"].path.read_bytes()
    # a quantized folder as saved, and the float folder quantized on load: the same model
    q = open_model(f["q8"], "cpu")
    assert isinstance(q.layers[0].attention.wqkv, Int8Linear)
    assert torch.equal(q(f["ids"]), open_model(f["hf"], "cpu", "float32", quantize="int8")(f["ids"]))


def test_adapter_and_quantize_together_on_a_run_directory(folders):
    f = folders
    m = open_model(f["run"], "cpu", "float32", adapter=f["adapter"], quantize="int4", group_size=32)
    assert isinstance(m.layers[1].feed_forward.w2, Int4Linear) and m.layers[1].feed_forward.w2.layout == "cpu_kernel"
    float_ = open_model(f["hf"], "cpu", "float32", adapter=f["adapter"])(f["ids"])
    out = m(f["ids"])
    assert 0 < (out - float_).abs().max() / float_.abs().max() < 0.15


def test_runtime_settings_are_given_at_build_time(folders):
    f = folders
    for path in (f["hf"], f["run"], f["lora_run"], f["q8"]):
        m = open_model(path, "cpu", "float32" if path != f["q8"] else None,
                       runtime={"attn_impl": "eager", "fused_kernels": False})
        assert m.config.attn_impl == "eager" and m.config.fused_kernels is False
        assert all(not layer.attention_norm.use_fused for layer in m.layers)  # read when the blocks were built
    with pytest.raises(ValueError, match=r"\['dim'\] are not runtime fields"):
        open_model(f["hf"], "cpu", runtime={"dim": 32})


def test_int4_forward_changes_nothing(folders):
    """A forward pass never converts an INT4 layer: an unpacked one runs the reference path and stays portable."""
    f = folders
    m = quantize_model(open_model(f["hf"], "cpu", "float32"), "int4", 32, pack=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="before pack"):
        m(f["ids"])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {layer.layout for layer in m.modules() if isinstance(layer, Int4Linear)} == {"portable"}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refusals_say_what_the_folder_is_and_what_to_pass(folders, tmp_path):
    f = folders
    with pytest.raises(UserError) as e:
        open_model(f["q8"], "cpu", needs_float="python -m finetune.merge")
    message = one_line(e)
    assert message.startswith(f"{f['q8']} is a quantized folder (int8") and "needs the float weights" in message
    with pytest.raises(UserError, match="already quantized: merge --adapter .* into the float model first"):
        open_model(f["q8"], "cpu", adapter=f["adapter"])
    with pytest.raises(UserError, match="already quantized to int8; --quantize int4 needs the original float"):
        open_model(f["q8"], "cpu", quantize="int4")
    with pytest.raises(UserError, match="is a PEFT LoRA adapter, not a model: pass its base model as --model and "
                                        "this folder as --adapter"):
        open_model(f["adapter"], "cpu")
    (tmp_path / "export" / "hf").mkdir(parents=True)
    shutil.copyfile(f["hf"] / "config.json", tmp_path / "export" / "hf" / "config.json")
    with pytest.raises(UserError) as e:
        open_model(tmp_path / "export", "cpu")
    assert f"did you mean {tmp_path / 'export' / 'hf'}?" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a Hugging Face model folder .* nor a training run directory"):
        open_model(tmp_path / "empty", "cpu")
    with pytest.raises(UserError, match="is a file; pass the model folder that holds it"):
        open_model(f["hf"] / "config.json", "cpu")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        open_model(tmp_path / "nowhere", "cpu")
    with pytest.raises(UserError, match="--tag selects a checkpoint of a training run directory"):
        open_model(f["hf"], "cpu", tag="step_000005")


def test_a_lora_run_whose_base_is_gone_points_to_the_export_and_adapter(folders, tmp_path):
    f = folders
    moved = shutil.copytree(f["lora_run"], tmp_path / "lora_run")
    meta = json.loads((moved / "finetune.json").read_text())
    (moved / "finetune.json").write_text(json.dumps({**meta, "model_path": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError) as e:
        open_model(moved, "cpu")
    message = one_line(e)
    assert f"{moved} is a LoRA fine-tuning run whose base model" in message
    assert f"pass {moved}/hf/merged as --model (written by python -m finetune.export)" in message
    assert f"as --model with --adapter {moved}/hf/adapter" in message


def test_merge_refuses_a_quantized_base_in_one_line(folders, tmp_path, capsys):
    from finetune import merge

    f = folders
    with pytest.raises(SystemExit) as exit_:
        merge.main(["--model", str(f["q8"]), "--adapter", str(f["adapter"]), "--output_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1
    assert err[0].startswith(f"error: {f['q8']} is a quantized folder (int8") and "python -m finetune.merge" in err[0]
    assert not (tmp_path / "m").exists()


def test_a_new_quantized_format_plugs_in_with_one_table_entry(folders, tmp_path, monkeypatch):
    """The opener dispatches on artifacts.quantized.FORMATS: one entry makes a new folder layout open everywhere."""
    from artifacts.quantized import QuantizedFormat

    f = folders
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "test"}}))
    calls = []

    def load(path, device, dtype, overrides):
        calls.append((path, device, dtype, overrides))
        return open_model(f["q8"], device)

    fmt = QuantizedFormat("test", lambda p: "quantization_config" in json.loads((p / "config.json").read_text())
                          if (p / "config.json").is_file() else False, lambda p: "a test-format folder", load)
    monkeypatch.setattr("artifacts.quantized.FORMATS", [*FORMATS, fmt])
    assert quantized_format(folder) is fmt and quantized_format(f["hf"]) is None
    assert isinstance(open_model(folder, "cpu").layers[0].attention.wo, Int8Linear)
    assert calls == [(folder, "cpu", "float32", {})]
    with pytest.raises(UserError, match="is a test-format folder; python -m inference.gguf needs the float"):
        open_model(folder, "cpu", needs_float="python -m inference.gguf")


@pytest.mark.slow  # ~10 s: eight command runs (scripts/test.sh --fast skips it)
def test_finetune_generate_and_passkey_take_adapter_and_quantize(folders, tmp_path, capsys):
    """The commands that lacked them: finetune.generate --quantize, evaluation.passkey --adapter and --quantize. The
    flag on the float model gives what the prepared folder (quantized, or merged) gives."""
    from evaluation.passkey import main as passkey_main
    from finetune.generate import main as generate_main
    from finetune.merge import main as merge_main
    from inference.quantize import main as quantize_main

    f = folders
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["hello there", "the city of music"]))
    answers = []
    for model, extra in ((f["hf"], ["--quantize", "int8"]), (f["q8"], [])):
        out = tmp_path / f"answers{len(answers)}.jsonl"
        generate_main(["--model", str(model), "--input", str(prompts), "--output", str(out), "--template", "alpaca",
                       "--max_new_tokens", "5", *extra])
        answers.append([json.loads(line)["answer"] for line in out.read_text().splitlines()])
    assert answers[0] == answers[1] and len(answers[0]) == 2
    assert json.loads((tmp_path / "answers0.jsonl.meta.json").read_text())["quantize"] == "int8"

    # passkey prompts need a longer context than the fixture's 128 positions: the same shapes at 256
    long, _ = tiny_model_dir(tmp_path, f["tok"], name="long", seed=2, max_seq_len=256)
    merge_main(["--model", str(long), "--adapter", str(f["adapter"]), "--output_dir", str(tmp_path / "merged")])
    quantize_main(["--model", str(long), "--scheme", "int8", "--output_dir", str(tmp_path / "q8")])
    runs = {}
    for name, model, extra in (("adapter", long, ["--adapter", str(f["adapter"])]),
                               ("merged", tmp_path / "merged", []),
                               ("quantize", long, ["--quantize", "int8"]), ("q8", tmp_path / "q8", [])):
        passkey_main(["--model", str(model), "--lengths", "256", "--depths", "0", "1", "--trials", "2", "--quiet",
                      "--output_json", str(tmp_path / f"{name}.json"), *extra])
        runs[name] = [r["predicted_ids"] for r in json.loads((tmp_path / f"{name}.json").read_text())["records"]]
    capsys.readouterr()
    assert runs["adapter"] == runs["merged"] and runs["quantize"] == runs["q8"] and len(runs["q8"]) == 4
    assert runs["adapter"] != runs["q8"]  # different models: the comparison can fail


def test_chat_folders_read_eos_between_turns_as_the_eos_token(folders, tmp_path):
    """The base_hf export of a LoRA run on a run directory, and finetune.merge's output, turn transformers'
    split_special_tokens off: a multi-turn prompt's "</s>" encodes as the EOS id, not as the characters < / s >;
    the merged folder carries the adapter's chat template."""
    from transformers import AutoTokenizer

    from finetune.export import base_hf_folder
    from finetune.merge import merge

    f = folders
    adapter = tmp_path / "adapter"
    shutil.copytree(f["adapter"], adapter)
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    base = base_hf_folder(tmp_path / "ft_run", str(f["run"]), None)
    merged = merge(f["hf"], [adapter], tmp_path / "merged")
    eos = f["tok"].eos_id
    for folder in (base, merged):
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["split_special_tokens"] is False
        ids = AutoTokenizer.from_pretrained(folder)("hello</s>again", add_special_tokens=False)["input_ids"]
        assert ids.count(eos) == 1
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == template
