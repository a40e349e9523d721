"""The training config: loading YAML/TOML with overrides, the derived DeepSpeed JSON, batch arithmetic, the LR
schedule. Nothing here needs DeepSpeed (tests/test_train.py has the engine-side pieces)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pretrain.config import TrainConfig, deepspeed_config, grad_accum_steps, load_config, lr_at, resolve_precision

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_debug_yaml_spells_out_the_defaults():
    assert load_config(REPO / "config" / "debug.yaml") == TrainConfig()


@pytest.mark.parametrize("name", ["1b.yaml", "7b.yaml"])
def test_example_configs_load_and_derive_a_deepspeed_config(name):
    cfg = load_config(REPO / "config" / name)
    mc = cfg.model_config(vocab_size=64000)
    assert mc.num_params() > 1e9
    ds = deepspeed_config(cfg, world_size=8, precision="bf16")
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8


def test_precedence_defaults_file_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nzero_stage: 2\nmodel:\n  dim: 128\n  n_layers: 4\n")
    cfg = load_config(path, ["zero_stage=3", "model.n_layers=6", "tokenizer=null", "nan_policy=stop"])
    assert cfg.lr == 1e-3  # PyYAML reads 1e-3 as a string; it is coerced to the field's type
    assert cfg.zero_stage == 3 and cfg.nan_policy == "stop" and cfg.tokenizer is None
    assert cfg.model == {"dim": 128, "n_layers": 6}
    assert cfg.warmup_steps == TrainConfig().warmup_steps
    mc = cfg.model_config(vocab_size=777)
    assert (mc.dim, mc.n_layers, mc.vocab_size, mc.n_heads) == (128, 6, 777, 4)


def test_toml_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('run_dir = "runs/x"\nglobal_batch_size = 64\n[model]\nn_layers = 3\n')
    cfg = load_config(path)
    assert (cfg.run_dir, cfg.global_batch_size, cfg.model) == ("runs/x", 64, {"n_layers": 3})


@pytest.mark.parametrize("content, overrides, message", [
    ("lr: 1e-3\nlearning_rate: 2\n", [], "c.yaml: unknown config key 'learning_rate'"),
    ("model:\n  width: 3\n", [], "c.yaml: unknown model field 'model.width'"),
    ("", ["zero_stage=two"], "command line: zero_stage: expected int, got 'two'"),
    ("", ["max_steps"], "must look like key=value"),
    ("", ["zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
    ("", ["precision=fp8"], "precision must be one of"),
    ("", ["offload_params=true"], "offload_params needs zero_stage 3"),
    ("- a\n- b\n", [], "config must be a mapping"),
    ("a: [\n", [], "cannot parse config"),
])
def test_bad_config_is_a_clear_error(tmp_path, content, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, overrides)


def test_grad_accumulation_and_precision():
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=32)
    assert grad_accum_steps(cfg, 1) == 8 and grad_accum_steps(cfg, 4) == 2
    with pytest.raises(ValueError, match=r"global_batch_size \(32\) must be divisible by .* \(4\) x world size \(3\)"):
        grad_accum_steps(cfg, 3)
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cuda=False, bf16_supported=False)


def test_deepspeed_config_is_derived_and_user_json_merged(tmp_path):
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=16, zero_stage=2, grad_clip=0.5, offload_optimizer=True)
    ds = deepspeed_config(cfg, world_size=2, precision="bf16")
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (16, 2, 4)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                                "train_batch_size": "auto", "comms_logger": {"enabled": True}}))
    cfg = dataclasses.replace(cfg, deepspeed_config=str(user))  # configs are immutable once built
    merged = deepspeed_config(cfg, world_size=2, precision="bf16")
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["comms_logger"] == {"enabled": True}
    assert merged["train_batch_size"] == 16 and merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    for bad, message in [({"train_micro_batch_size_per_gpu": 4}, "set micro_batch_size in the training config"),
                         ({"zero_optimization": {"stage": 3}}, "'zero_optimization.stage' is 3 .* set zero_stage"),
                         ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'")]:
        user.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            deepspeed_config(cfg, world_size=2, precision="bf16")
    user.write_text("{oops")
    with pytest.raises(ValueError, match="ds.json: invalid JSON at line 1"):
        deepspeed_config(cfg, world_size=2, precision="bf16")


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: (lr + min_lr) / 2
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # decay is monotone
    assert lrs[110:] == [0.1] * 20
    assert lr_at(60, TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=500, lr_decay_steps=110)) == lrs[60]
