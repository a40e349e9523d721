"""Mistakes in the user's input raise common.errors.UserError (MissingFileError for what is not there), which
common.cli.run_main prints as one line; these check raise sites outside the config layer, one or two per module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import run_main
from common.errors import MissingFileError, UserError


def one_line_error(capsys: pytest.CaptureFixture[str], fn, *args) -> str:
    """The `error: ...` line run_main prints for fn(*args), checked to be the only output and exit status 1."""
    with pytest.raises(SystemExit) as exit_:
        run_main(fn, *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_evaluation_data_errors_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation.data import read_jsonl

    bad = tmp_path / "x.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"x\.jsonl, line 2: malformed JSON"):
        list(read_jsonl(bad))
    assert "x.jsonl, line 2" in one_line_error(capsys, lambda: list(read_jsonl(bad)))


def test_run_dir_without_checkpoints_is_a_missing_file(tmp_path: Path) -> None:
    from artifacts.run_dir import resolve_tag

    with pytest.raises(MissingFileError, match="no checkpoint found"):
        resolve_tag(tmp_path, None)
    (tmp_path / "step_1").mkdir()
    with pytest.raises(MissingFileError, match=r"step_2: no such checkpoint; available: step_1"):
        resolve_tag(tmp_path, "step_2")
    (tmp_path / "latest").write_text("step_9\n")
    with pytest.raises(MissingFileError, match="names checkpoint 'step_9'"):
        resolve_tag(tmp_path, None)


def test_peft_adapter_config_errors_are_user_errors(tmp_path: Path) -> None:
    from model.lora_peft import read_adapter, read_adapter_config

    with pytest.raises(MissingFileError, match="adapter folder not found"):
        read_adapter(tmp_path / "absent")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(UserError, match="only LORA adapters are supported"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="LoRA rank r must be a positive integer"):
        read_adapter_config(tmp_path)


def test_gguf_output_checks_are_user_errors(tmp_path: Path) -> None:
    from inference.gguf import check_output_file

    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, overwrite=False)
    with pytest.raises(UserError, match="does not exist; create it first"):
        check_output_file(tmp_path / "absent" / "m.gguf", overwrite=False)


def test_config_json_values_the_model_refuses_name_the_file(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from model import ModelConfig, Transformer

    Transformer(ModelConfig.from_preset("debug", vocab_size=64)).to_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rms_norm_eps"] = -1.0  # ModelConfig's own check refuses it, not hf.py's
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, Transformer.from_hf, tmp_path)
    assert f"{tmp_path / 'config.json'}:" in err and "norm_eps must be > 0" in err
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'hidden_size' is missing"):
        Transformer.from_hf(tmp_path)


def test_chat_template_file_errors_are_user_errors(tmp_path: Path) -> None:
    from tokenizer.chat_template import find_chat_template

    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer_config\.json: not valid JSON"):
        find_chat_template(tmp_path)
