"""LoRA fine-tuning (finetuning_type: lora) on the shared loop: only the adapter trains and is checkpointed, exact
resume after SIGKILL, a hot start from an adapter (init_adapter) as distinct from resuming, and the export (PEFT
adapter + merged Hugging Face folder) read back by peft and transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from artifacts import open_model
from artifacts.run_dir import weights_only_loading
from fixtures_finetune import (TINY_SFT, kill_after_step3_and_resume,
                               run_finetune, tiny_hf_model, train_tokenizer, write_sample_files)
from fixtures_train import run, train_losses, write_hostfile
from model.lora import is_lora_name

STEPS = 4
LORA = ["finetuning_type=lora", "lora.r=4", "lora.alpha=8", "lora.target_modules=all"]

# finetune/train.py that also writes the model's whole state (frozen base included) after the last step's save, so
# a test can compare the base it trained with the base it started from.
DUMP_STATE = """
import sys, torch
from finetune import train
import pretrain.train as core

save = core.save
def save_and_dump(run):
    tag = save(run)
    if run.step == run.cfg.max_steps:
        torch.save(run.engine.module.state_dict(), sys.argv[1])
    return tag
core.save = save_and_dump
train.main(sys.argv[2:])
"""



def load_states(path: Path) -> dict:
    with weights_only_loading():  # DeepSpeed's few pickled classes allow-listed
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("finetune_lora")
    base = tiny_hf_model(root, train_tokenizer(root))
    return base, write_sample_files(root)


def overrides(setup, run_dir: Path, *more: str, steps: int = STEPS) -> list[str]:
    base, files = setup
    return [*TINY_SFT, *LORA, f"model_path={base}", f"run_dir={run_dir}",
            f"data_files=[{', '.join(map(str, files))}]", f"max_steps={steps}", "eval_interval=0",
            f"save_interval={steps}", *more]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, setup) -> tuple[Path, Path]:
    """A 4-step LoRA run on one rank; returns (run dir, the model state dumped after training)."""
    root = tmp_path_factory.mktemp("lora_run")
    script = root / "dump_state.py"
    script.write_text(DUMP_STATE)
    dump = root / "state.pt"
    result = run_finetune([str(dump), *overrides(setup, root / "run")], script=str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", dump


@pytest.fixture(scope="module")
def exported(lora_run) -> Path:
    from finetune.export import export

    run_dir, _ = lora_run
    return export(run_dir, run_dir / "hf")


def test_only_the_adapter_trains(lora_run, setup):
    run_dir, dump = lora_run
    base, _ = setup
    state = torch.load(dump, map_location="cpu", weights_only=True)
    original = open_model(base, "cpu", "float32").state_dict()
    frozen = {k: v for k, v in state.items() if not is_lora_name(k)}
    assert frozen.keys() == original.keys()
    for name, tensor in frozen.items():
        assert torch.equal(tensor, original[name]), f"{name} moved"  # bit for bit
    adapters = {k: v for k, v in state.items() if is_lora_name(k)}
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 projections in each of the debug model's 2 layers
    assert all(v.abs().max() > 0 for k, v in adapters.items() if k.endswith(".B"))  # B left zero: it trained


def test_the_run_directory_opens_as_its_merged_export(lora_run, exported, setup):
    """--model RUN_DIR of a LoRA run: the opener merges the checkpoint's adapter into the base named in
    finetune.json, the same model finetune.export writes to hf/merged (and a tokenizer is found for it)."""
    from artifacts import load_tokenizer

    run_dir, _ = lora_run
    base, _ = setup
    tokens = torch.tensor([[1, 57, 300, 9, 812, 44, 5, 600]])
    opened = open_model(run_dir, "cpu", "float32")
    torch.testing.assert_close(opened(tokens), open_model(exported / "merged", "cpu", "float32")(tokens),
                               rtol=0, atol=1e-5)
    assert (opened(tokens) - open_model(base, "cpu", "float32")(tokens)).abs().max() > 1e-4
    assert load_tokenizer(run_dir, None, opened).vocab_size <= opened.config.vocab_size


def test_checkpoint_holds_only_the_adapter_and_its_optimizer_state(lora_run, setup):
    run_dir, dump = lora_run
    base, _ = setup
    ckpt = run_dir / f"step_{STEPS:06d}"
    files = list(ckpt.iterdir())
    assert [f.name for f in files] == ["mp_rank_00_model_states.pt"]  # ZeRO-0: module + optimizer in one file
    saved = load_states(files[0])
    assert saved["module"] and all(is_lora_name(k) for k in saved["module"])
    adapter_numel = sum(v.numel() for v in saved["module"].values())
    moments = [t for s in saved["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    assert sum(t.numel() for t in moments) == 2 * adapter_numel  # AdamW's two moments of the adapter, nothing else
    full_numel = sum(v.numel() for v in open_model(base, "cpu", "float32").state_dict().values())
    assert adapter_numel < full_numel / 5
    assert sum(f.stat().st_size for f in files) < 4 * full_numel  # smaller than the fp32 base alone


def test_export_writes_a_peft_adapter_and_a_merged_folder(exported, setup):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    base, _ = setup
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    tokens = torch.tensor([[1, 57, 300, 9, 812, 44, 5, 600]])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               exported / "adapter").eval()
        merged = LlamaForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32).eval()
        plain = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        ours, theirs, before = merged(tokens).logits, peft_model(tokens).logits, plain(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - before).abs().max() > 1e-4  # the adapter changed the model
    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    assert tokenizer.chat_template == (exported.parent / "chat_template.jinja").read_text().strip()
    # The adapter folder carries the tokenizer and the template too, and "</s>" between turns is the EOS token.
    for folder in ("adapter", "merged"):
        tokenizer = AutoTokenizer.from_pretrained(exported / folder)
        assert tokenizer.chat_template == (exported.parent / "chat_template.jinja").read_text().strip()
        ids = tokenizer("hi</s>there", add_special_tokens=False)["input_ids"]
        assert tokenizer.eos_token_id in ids, (folder, ids)



@pytest.mark.slow  # ~16 s: three fine-tuning runs (scripts/test.sh --fast skips it)
def test_hot_start_begins_at_the_adapters_loss_with_a_fresh_optimizer(exported, setup, tmp_path):
    """init_adapter: step 1's loss (before any update) is the loss of base + adapter, i.e. of the merged folder
    tuned in full on the same data; a fresh adapter's is the base's. The run records the adapter it started from."""
    base, files = setup
    first = {}
    for name, more in [("hot", [f"init_adapter={exported / 'adapter'}"]), ("fresh", [])]:
        result = run_finetune(overrides(setup, tmp_path / name, *more, steps=1))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed" not in result.stdout
        first[name] = train_losses(tmp_path / name)[1]
    merged_args = [a for a in overrides(setup, tmp_path / "merged", steps=1) if a not in LORA]
    result = run_finetune([*merged_args, f"model_path={exported / 'merged'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert first["hot"] == pytest.approx(train_losses(tmp_path / "merged")[1], rel=1e-5)
    assert abs(first["hot"] - first["fresh"]) > 1e-3
    meta = json.loads((tmp_path / "hot" / "finetune.json").read_text())
    assert meta["init_adapter"] == str((exported / "adapter").resolve())
    assert json.loads((tmp_path / "fresh" / "finetune.json").read_text())["init_adapter"] is None


def test_resume_with_other_lora_settings_is_refused(lora_run, setup):
    run_dir, _ = lora_run
    result = run_finetune([*overrides(setup, run_dir, steps=STEPS + 1), "lora.r=8"])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and "other settings (lora" in last, last


@pytest.mark.slow  # ~8 s: two refused fine-tuning starts (scripts/test.sh --fast skips it)
def test_hot_start_with_a_mismatched_adapter_is_one_line(exported, setup, tmp_path):
    result = run_finetune([*overrides(setup, tmp_path / "run", steps=1), f"init_adapter={exported / 'adapter'}",
                           "lora.r=8"])
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "does not match the LoRA config: r=4 (config: 8)" in last, last
    result = run_finetune([*overrides(setup, tmp_path / "run2", steps=1), "finetuning_type=full",
                           f"init_adapter={exported / 'adapter'}"])
    assert result.returncode == 2 and "needs finetuning_type=lora" in result.stderr


@pytest.mark.slow
def test_sigkill_resumes_exactly(setup, tmp_path):
    """kill -9 after the step-3 checkpoint of a LoRA run, restart the same command: every step's loss equals the
    uninterrupted run's, bit for bit (adapter, optimizer state and data position restored; the frozen base rebuilt
    from model_path)."""
    steps = 6
    hostfile = write_hostfile(tmp_path / "hostfile", ["localhost slots=1"])
    reference = tmp_path / "reference"
    run(hostfile, overrides(setup, reference, "save_interval=3", steps=steps), tmp_path / "ref.txt",
        script="finetune/train.py")
    run_dir = tmp_path / "run"
    args = overrides(setup, run_dir, "save_interval=3", steps=steps)
    log = kill_after_step3_and_resume(hostfile, args, run_dir, tmp_path, steps)
    assert f"resumed from {run_dir / 'step_000003'} at step 3" in log
    assert train_losses(run_dir) == train_losses(reference)  # exact equality, every step
    ckpt = load_states(next((run_dir / "step_000006").glob("*model_states.pt")))
    ref = load_states(next((reference / "step_000006").glob("*model_states.pt")))
    assert ckpt["module"].keys() == ref["module"].keys()
    for name, tensor in ref["module"].items():
        assert torch.equal(ckpt["module"][name], tensor), name
    ours, theirs = ckpt["optimizer"]["state"], ref["optimizer"]["state"]  # AdamW's moments and step counts
    assert ours.keys() == theirs.keys() and ours
    for index, state in theirs.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(ours[index][key]), torch.as_tensor(value)), (index, key)


@pytest.mark.slow
def test_zero3_on_two_ranks_matches_one_rank_resumes_and_exports_whole_tensors(setup, tmp_path):
    """LoRA under ZeRO-3 on 2 ranks: the same losses as 1 rank (ZeRO-0), a resume from its adapter-only sharded
    checkpoint continues them, and the export gathers whole adapter tensors equal to the 1-rank run's."""
    from safetensors.torch import load_file

    from finetune.export import export

    runs = {}
    for name, hosts, extra in [("one", "localhost slots=1", []), ("zero3", "localhost slots=2", ["zero_stage=3"])]:
        hostfile = write_hostfile(tmp_path / f"hosts_{name}", [hosts])
        run_dir = runs[name] = tmp_path / name
        run(hostfile, overrides(setup, run_dir, "save_interval=2", *extra, steps=4), tmp_path / f"{name}1.txt",
            script="finetune/train.py")
        log = run(hostfile, overrides(setup, run_dir, "save_interval=2", *extra, steps=6), tmp_path / f"{name}2.txt",
                  script="finetune/train.py")
        assert f"resumed from {run_dir / 'step_000004'} at step 4" in log
    ours, ref = train_losses(runs["zero3"]), train_losses(runs["one"])
    assert sorted(ours) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-5), f"step {step}: {ours[step]} vs {ref[step]}"
    assert sorted(p.name for p in (runs["zero3"] / "step_000006").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    adapters = {name: load_file(export(d, d / "hf") / "adapter" / "adapter_model.safetensors")
                for name, d in runs.items()}
    assert adapters["zero3"].keys() == adapters["one"].keys() and len(adapters["one"]) == 28
    for key, tensor in adapters["one"].items():
        torch.testing.assert_close(adapters["zero3"][key], tensor, rtol=0, atol=2e-5, msg=key)
