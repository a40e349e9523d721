"""Quantized folders that travel: compressed-tensors pack-quantized (transformers' own integration gives our
logits), and our native folder, which transformers must refuse rather than load as random weights."""
import json
import shutil

import pytest
import torch

from fixtures_quant import tiny_model_dir, tiny_tokenizer
from artifacts.quant_formats import pack_int32, unpack_int32
from common.errors import UserError
from artifacts import open_model
from artifacts.quant_formats import load_compressed_tensors
from inference.quantize import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qformats")
    tok = tiny_tokenizer(root)
    path, model = tiny_model_dir(root, tok)
    return root, path, model, tok


def _quantize(path, out, *extra):
    main(["--model", str(path), "--output_dir", str(out), *extra])


def _ids(tok):
    return torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog", bos=True)])


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_int32_round_trips_and_matches_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (24, 40), generator=gen)
    for dim in (0, 1):
        packed = pack_int32(codes, bits, dim)
        assert packed.dtype == torch.int32
        assert torch.equal(unpack_int32(packed, bits, codes.shape[dim], dim), codes)
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_int32(codes, bits, dim), helpers.pack_to_int32(signed, bits, packed_dim=dim))


@pytest.mark.slow  # ~10 s: four quantize runs and four transformers loads
@pytest.mark.parametrize("scheme,method", [("int4", "rtn"), ("int4", "gptq"), ("int8", "gptq")])
def test_transformers_opens_compressed_tensors_folder_with_our_logits(folder, tmp_path, scheme, method, capsys):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    root, path, model, tok = folder
    out = tmp_path / "ct"
    calibration = (["--calibration", str(root / "corpus"), "--calibration_sequences", "16",
                    "--calibration_seq_len", "64"] if method == "gptq" else [])
    _quantize(path, out, "--scheme", scheme, "--group_size", "64", "--format", "compressed-tensors",
              "--method", method, *calibration)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    ids = _ids(tok)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = open_model(out, "cpu")
    assert ours.quantization.scheme == scheme and len(ours.quantization.layers) == 8
    exact = load_compressed_tensors(out, "cpu", pack=False)
    for m in exact.modules():  # the same folder on the dequantize-then-matmul path: fp32 throughout
        if hasattr(m, "path"):
            m.path = "reference"
    with torch.no_grad():
        theirs = hf(ids).logits
        kernel = ours(ids)
        reference = exact(ids)
        fp32 = model(ids)
    scale = fp32.abs().max()
    assert (reference - theirs).abs().max() <= 1e-5 * scale
    # The CPU kernels take bf16 activations (inference/quantize.py): within bf16 rounding of the logits.
    assert (kernel - theirs).abs().max() <= 0.02 * scale
    assert 0 < (theirs - fp32).abs().max() <= 0.15 * scale  # really quantized, and still the model


def test_transformers_refuses_our_native_folder(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    _, path, _, tok = folder
    _quantize(path, tmp_path / "q4", "--scheme", "int4")
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["format"] == "llama-native"
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q4")
    open_model(tmp_path / "q4", "cpu")(_ids(tok))  # our own commands still open it


def test_folder_quantized_by_an_unknown_tool_is_one_line(folder, tmp_path, capsys):
    _, path, _, _ = folder
    other = tmp_path / "awq"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized by 'awq', which this project cannot read"):
        open_model(other, "cpu")
    with pytest.raises(SystemExit):
        _quantize(other, tmp_path / "o", "--scheme", "int4")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized by 'awq'" in err[0]
    assert not (tmp_path / "o").exists()


def test_compressed_tensors_scheme_without_a_kernel_is_one_line(folder, tmp_path, capsys):
    _, path, _, _ = folder
    out = tmp_path / "ct"
    _quantize(path, out, "--scheme", "int8", "--format", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"  # FP8 weights
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no kernel here"):
        open_model(out, "cpu")


def test_compressed_tensors_needs_one_group_size(folder, tmp_path, capsys):
    # The tiny model's default group sizes are 64 (dim 64) and 128 (hidden 128): that format stores one.
    _, path, _, _ = folder
    with pytest.raises(SystemExit):
        _quantize(path, tmp_path / "o", "--scheme", "int4", "--format", "compressed-tensors")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --group_size N" in err[0] and "64/128" in err[0]
    with pytest.raises(SystemExit):
        _quantize(path, tmp_path / "o", "--scheme", "int4", "--group_size", "48")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not divide in_features 64 of layer layers.0.attention.wqkv" in err[0]
    assert not (tmp_path / "o").exists()


def test_our_commands_open_a_compressed_tensors_folder(folder, tmp_path, capsys):
    """INT8 has the same grid in both formats (symmetric, per row): the compressed-tensors folder and our native
    one hold the same codes and scales, so `inference.generate` gives the same greedy text from either."""
    from inference import generate

    _, path, _, _ = folder
    _quantize(path, tmp_path / "native", "--scheme", "int8")
    _quantize(path, tmp_path / "ct", "--scheme", "int8", "--format", "compressed-tensors")
    capsys.readouterr()
    texts = []
    for model in (tmp_path / "native", tmp_path / "ct"):
        generate.main(["--model", str(model), "--prompt", "hello", "--max_new_tokens", "8"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tmp_path / "ct"), "--prompt", "hello", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert "compressed-tensors" in err and "already quantized" in err
