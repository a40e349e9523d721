"""Calibrated quantization (inference/calibration.py): the calibration sample, the layer-by-layer GPTQ driver
against round-to-nearest on the whole model, and the command's one-line errors for a bad corpus."""
import json

import pytest
import torch

from fixtures_quant import tiny_model_dir, tiny_tokenizer
from common.errors import MissingFileError, UserError
from inference.calibration import calibration_tokens
from artifacts import open_model
from inference.calibration import quantize_model_gptq
from inference.quantize import main
from model.quant import quantize_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcal")
    tok = tiny_tokenizer(root)
    path, model = tiny_model_dir(root, tok)
    return root, path, model, tok


def test_calibration_tokens_are_distinct_windows_of_the_corpus(folder):
    root, _, _, tok = folder
    a = calibration_tokens([root / "corpus"], tok, n_sequences=12, seq_len=32, seed=0)
    assert a.shape == (12, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens([root / "corpus"], tok, 12, 32, seed=0))  # seeded
    assert not torch.equal(a, calibration_tokens([root / "corpus"], tok, 12, 32, seed=1))
    assert len({tuple(r.tolist()) for r in a}) == 12
    assert int(a.max()) < tok.vocab_size and int(a.min()) >= 0


def test_calibration_corpus_missing_or_too_small(folder, tmp_path):
    _, _, _, tok = folder
    with pytest.raises(MissingFileError, match="--calibration: .*nope.*no such file"):
        calibration_tokens([tmp_path / "nope.txt"], tok)
    small = tmp_path / "small.txt"
    small.write_text("only a few words here\n")
    with pytest.raises(UserError, match=r"small.txt: \d+ tokens, fewer than the 4 x 64 = 256 needed"):
        calibration_tokens([small], tok, 4, 64)


def _logit_error(model, ref, ids):
    with torch.no_grad():
        return ((model(ids) - ref) ** 2).mean().item()


def test_gptq_model_is_closer_to_fp32_than_round_to_nearest(folder):
    """The GPTQ model's logits are closer to the float model's than round-to-nearest's on the same grid: on the
    calibration windows (what GPTQ minimises, layer by layer) for int4 and int8, and for int4 on held-out windows
    of the same text too. Measured when written (error / RTN's): calibration 0.42 (int4), 0.42 (int8); held-out
    0.83 (int4), 0.96 (int8: its rounding error is tiny already and on this random tiny model the gain hardly
    carries over to other text, so it is not asserted; trained models: benchmarks/quantization.md)."""
    import copy

    root, _, model, tok = folder
    windows = calibration_tokens([root / "corpus"], tok, 40, 96, seed=0)
    calib, held_out = windows[:30], windows[32:]  # 30: the last batch of 8 is a short one
    for scheme in ("int4", "int8"):
        rtn = quantize_model(copy.deepcopy(model), scheme, 32, pack=False)
        gptq = quantize_model_gptq(copy.deepcopy(model), scheme, 32, False, calib)
        for m in (rtn, gptq):
            for layer in m.modules():
                if hasattr(layer, "path"):
                    layer.path = "reference"  # fp32 dequantized weights: the rounding alone is compared
        assert gptq.quantization.method == "gptq" and rtn.quantization.method == "rtn"
        checks = [(calib, 0.6)] + ([(held_out, 0.95)] if scheme == "int4" else [])
        for ids, bound in checks:
            with torch.no_grad():
                ref = model(ids)
            e_rtn, e_gptq = _logit_error(rtn, ref, ids), _logit_error(gptq, ref, ids)
            assert e_gptq < bound * e_rtn, (scheme, bound, e_gptq, e_rtn)


def test_cli_gptq_default_calibration_writes_a_folder(folder, tmp_path, capsys):
    _, path, _, tok = folder
    main(["--model", str(path), "--scheme", "int4", "--method", "gptq", "--calibration_sequences", "16",
          "--calibration_seq_len", "64", "--output_dir", str(tmp_path / "q4")])
    assert "(gptq, native format)" in capsys.readouterr().out
    assert json.loads((tmp_path / "q4" / "quantization_config.json").read_text())["method"] == "gptq"
    ids = torch.tensor([tok.encode("hello", bos=True)])
    assert torch.isfinite(open_model(tmp_path / "q4", "cpu")(ids)).all()


def test_cli_bad_calibration_is_one_line_and_writes_nothing(folder, tmp_path, capsys):
    _, path, _, _ = folder
    small = tmp_path / "small.txt"
    small.write_text("too short\n")
    cases = [
        (["--calibration", str(tmp_path / "missing")], "--calibration: "),
        (["--calibration", str(small)], "fewer than the"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit):
            main(["--model", str(path), "--scheme", "int4", "--method", "gptq", *extra, "--output_dir",
                  str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--scheme", "int4", "--calibration", str(small), "--output_dir",
              str(tmp_path / "o")])
    assert "--method gptq" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--scheme", "fp8", "--output_dir", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == "error: unknown quantization scheme 'fp8'; choose one of: int8, int4"
    assert not (tmp_path / "o").exists()
