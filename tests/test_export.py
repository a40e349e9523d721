"""Export: DeepSpeed checkpoints of every ZeRO stage (fp32 and bf16) -> our Transformer and a Hugging Face folder.

The checkpoints come from real DeepSpeed engines in one helper process (world size 1, a couple of steps each), with
the engine's own fp32 weights saved beside them as the expected result. Sharding over several ranks is covered by
tests/test_train_launch.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from artifacts.run_dir import consolidated_state_dict, load_checkpoint_model
from pretrain.export import main
from fixtures_time import limit
from fixtures_train import REPO, env, free_port

pytestmark = pytest.mark.slow  # DeepSpeed engines and launches

# name: (ZeRO stage, bf16)
SETUPS = {"zero0": (0, False), "zero1_bf16": (1, True), "zero2": (2, False), "zero3": (3, False),
          "zero3_bf16": (3, True)}

MAKE_CHECKPOINTS = """
import json, sys
from pathlib import Path
import deepspeed, sentencepiece as spm, torch
from safetensors.torch import save_file
from common.distributed import init_deepspeed_distributed
from model import ModelConfig, Transformer
from pretrain import checkpoint
from pretrain.train import AdamW, param_groups

out = Path(sys.argv[1])
setups = json.loads(sys.argv[2])
lines = [f"sample line {i}: the quick brown fox jumps over {i % 7} lazy dogs" for i in range(300)]
(out / "text.txt").write_text("\\n".join(lines))
spm.SentencePieceTrainer.train(input=str(out / "text.txt"), model_prefix=str(out / "tokenizer"), vocab_size=300,
                               model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1,
                               normalization_rule_name="identity", remove_extra_whitespaces=False)
init_deepspeed_distributed()
config = ModelConfig.from_preset("debug", vocab_size=320, tie_embeddings=False)
for name, (stage, bf16) in setups.items():
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-2)
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
          "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        engine.backward(engine(tokens, targets=tokens))
        engine.step()
    run = out / name
    run.mkdir()
    config.save(run / "model_config.json")
    (run / "tokenizer.model").write_bytes((out / "tokenizer.model").read_bytes())
    checkpoint.save_checkpoint(engine, run, 3, {"step": 3}, keep_last=2)
    # The engine's fp32 master weights: the module's own in fp32 runs, the optimizer's with bf16.
    if bf16 and stage == 3:
        expected = {}
        for n, p in engine.module.named_parameters():
            expected[n] = engine.optimizer.get_full_hp_param(p).detach().float().clone()
    elif bf16:
        from deepspeed.utils import safe_get_full_fp32_param
        expected = {n: safe_get_full_fp32_param(p).detach().float().clone()
                    for n, p in engine.module.named_parameters()}
    else:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            expected = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    save_file(expected, str(run / "expected.safetensors"))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    e = {**env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINTS, str(root), json.dumps(SETUPS)], cwd=REPO,
                            env=e, capture_output=True, text=True, timeout=limit(300))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", list(SETUPS))
def test_consolidated_weights_equal_the_engines_fp32_weights(checkpoints, name):
    expected = load_file(checkpoints / name / "expected.safetensors")
    state = consolidated_state_dict(checkpoints / name)
    assert state.keys() == expected.keys()
    for key in expected:
        assert state[key].dtype == torch.float32
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=key)
    model = load_checkpoint_model(checkpoints / name)
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_cli_export_loads_in_transformers_with_identical_logits(checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = checkpoints / "zero0"
    main(["--checkpoint_dir", str(run_dir), "--output_dir", str(tmp_path / "hf")])
    assert f"exported {run_dir / 'step_000003'}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= \
        {p.name for p in (tmp_path / "hf").iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok("sample line 12: the quick brown fox")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_checkpoint_model(run_dir)(ids), rtol=0, atol=1e-4)


def test_cli_export_tag_and_dtype(checkpoints, tmp_path):
    main(["--checkpoint_dir", str(checkpoints / "zero3"), "--tag", "step_000003", "--output_dir", str(tmp_path / "hf"),
          "--dtype", "bfloat16"])
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_cli_export_errors_are_one_line(checkpoints, tmp_path):
    cases = [
        (["--checkpoint_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")], "no checkpoint found"),
        (["--checkpoint_dir", str(checkpoints / "zero2"), "--tag", "step_000009", "--output_dir", str(tmp_path / "o")],
         "no such checkpoint; available: step_000003"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases.append((["--checkpoint_dir", str(checkpoints / "zero2"), "--output_dir", str(tmp_path / "full")],
                  "exists and is not empty; pass --overwrite"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert str(exc.value).startswith("error: ") and message in str(exc.value) and "\n" not in str(exc.value)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
