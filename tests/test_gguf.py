"""GGUF export: read back with gguf's own GGUFReader (metadata, tokenizer, tensor names/shapes/types, values),
and a forward pass written in llama.cpp's conventions (adjacent-pair rotary) over the file's tensors gives our
model's logits, which checks the q/k row permutation."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from fixtures_quant import tiny_model_dir, tiny_tokenizer
from fixtures_time import limit
from fixtures_train import REPO, env
from inference.gguf import gguf_tensors, interleaved_to_rotate_half, main, model_name, rotate_half_to_interleaved
from reference_gguf import read_tensors, reference_logits
from tokenizer.hf import load_model_proto

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok = tiny_tokenizer(root)
    path, model = tiny_model_dir(root, tok)
    cfg_file = path / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": TEMPLATE}))
    files = {}
    for outtype in ("f16", "bf16", "q8_0", "q4_0"):
        files[outtype] = root / f"m-{outtype}.gguf"
        main(["--model", str(path), "--outtype", outtype, "--output", str(files[outtype])])
    return path, model, tok, files


def read(file):
    reader = gguf.GGUFReader(str(file))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def values(t) -> torch.Tensor:
    rows_cols = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).reshape(rows_cols)


def test_general_name_is_the_models_not_the_export_folders(exported, tmp_path):
    path, _, _, files = exported
    assert path.name == "hf"  # RUN/hf, as scripts/train.sh writes it: the name is the run's
    for file in files.values():
        assert read(file)[0]["general.name"] == path.parent.name
    assert model_name(tmp_path / "sft" / "hf" / "merged") == model_name(tmp_path / "sft" / "hf") == "sft"
    assert model_name(tmp_path / "llama-zh-7b") == "llama-zh-7b"
    assert model_name(tmp_path / "runs" / "x" / "base_hf") == "x"
    main(["--model", str(path), "--outtype", "f16", "--output", str(tmp_path / "named.gguf"), "--name", "my-model"])
    assert read(tmp_path / "named.gguf")[0]["general.name"] == "my-model"


def test_permutation_is_a_reordering_that_inverts():
    w = torch.randn(4 * 8, 5)
    p = rotate_half_to_interleaved(w, 4)
    assert torch.equal(interleaved_to_rotate_half(p, 4), w)
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[4]) and torch.equal(p[2], w[1])  # head 0, d = 8


def test_metadata_and_tokenizer(exported):
    path, model, tok, files = exported
    fields, _ = read(files["q8_0"])
    c = model.config
    assert fields["general.architecture"] == "llama"
    expected = {"llama.vocab_size": c.vocab_size, "llama.context_length": c.max_seq_len,
                "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
                "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
                "llama.attention.head_count_kv": c.n_kv_heads, "llama.rope.dimension_count": c.head_dim,
                "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    assert {k: fields[k] for k in expected} == expected
    assert math.isclose(fields["llama.rope.freq_base"], c.rope_theta)
    assert math.isclose(fields["llama.attention.layer_norm_rms_epsilon"], c.norm_eps, rel_tol=1e-6)
    proto = load_model_proto(tok.path)
    n = tok.vocab_size
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][:n] == [p.piece for p in proto.pieces]
    assert fields["tokenizer.ggml.scores"][:n] == pytest.approx([p.score for p in proto.pieces])
    assert fields["tokenizer.ggml.token_type"][:n] == [int(p.type) for p in proto.pieces]
    assert len(fields["tokenizer.ggml.tokens"]) == c.vocab_size  # padded rows: unused pieces
    assert set(fields["tokenizer.ggml.token_type"][n:]) <= {int(gguf.TokenType.UNUSED)}
    assert fields["tokenizer.ggml.token_type"][tok.bos_id] == int(gguf.TokenType.CONTROL)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert fields["tokenizer.ggml.unknown_token_id"] == tok.unk_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == TEMPLATE


@pytest.mark.parametrize("outtype,matrix_type,tol_per_block_max", [
    ("f16", T.F16, 1e-3), ("bf16", T.BF16, 8e-3), ("q8_0", T.Q8_0, 1 / 127 + 1e-3), ("q4_0", T.Q4_0, 1 / 8 + 1e-3)])
def test_tensors_names_shapes_types_and_values(exported, outtype, matrix_type, tol_per_block_max):
    _, model, _, files = exported
    _, tensors = read(files[outtype])
    ref = gguf_tensors(model)
    c = model.config
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(c.n_layers) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names == set(ref)
    assert list(tensors["blk.0.attn_k.weight"].shape) == [c.dim, c.n_kv_heads * c.head_dim]  # ggml order: ne0 first
    assert list(tensors["token_embd.weight"].shape) == [c.dim, c.vocab_size]
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            assert t.tensor_type == T.F32
        elif outtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
            assert t.tensor_type == T.Q8_0
        else:
            assert t.tensor_type == matrix_type, name
        w, got = ref[name], values(t)
        assert got.shape == w.shape
        if w.dim() == 1:
            assert torch.equal(got, w)
            continue
        # error bound relative to the largest |weight| of each 32-weight block
        block_max = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True)
        err = (got - w).reshape(w.shape[0], -1, 32).abs()
        assert (err <= block_max * tol_per_block_max + 1e-7).all(), name


def test_llama_cpp_style_forward_over_the_file_gives_our_logits(exported, tmp_path):
    path, _, tok, _ = exported
    # larger weights than the default init, so that attention (and with it the rotary order) matters
    path, model = tiny_model_dir(tmp_path, tok, name="sharp", init_std=0.3)
    main(["--model", str(path), "--outtype", "f16", "--output", str(tmp_path / "sharp.gguf")])
    t = read_tensors(tmp_path / "sharp.gguf")
    assert set(t) == set(read(tmp_path / "sharp.gguf")[1])
    ids = tok.encode("the city of music 床前明月光 and people went", bos=True)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    theirs = reference_logits(t, model.config, ids)
    scale = ours.abs().max()
    assert (theirs - ours).abs().max() < 0.02 * scale  # f16 rounding only
    # the check can fail: reading the same rows with rotate-half (no permutation undone) is far off
    assert (reference_logits(t, model.config, ids, pairs=False) - ours).abs().max() > 0.05 * scale


@pytest.mark.parametrize("outtype, tolerance", [("f16", 0.02), ("q8_0", 0.06), ("q4_0", 0.1)])
def test_llama_cpp_reads_the_file_tokenizes_alike_and_computes_its_model(exported, tmp_path, outtype, tolerance):
    """llama.cpp itself (llama-cpp-python, where it is installed: `pip install -c constraints.txt
    llama-cpp-python` builds it from source) loads the file, its tokenizer gives our ids, and its logits are
    those of the model the file holds (the forward pass over the file's dequantized tensors) within its own
    rounding (f16 KV cache; activations quantized to 8 bits against q8_0/q4_0 weights). For f16 that model is
    ours to f16 rounding; the quantized files' distance from ours is the weights' quantization error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, _, tok, _ = exported
    path, model = tiny_model_dir(tmp_path, tok, name="sharp", init_std=0.3)  # attention (and rotary order) matters
    out = tmp_path / f"sharp-{outtype}.gguf"
    main(["--model", str(path), "--outtype", outtype, "--output", str(out)])
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        for text in ("the city of music 床前明月光 and people went", "  two  spaces, 12 + 35 = 47\n"):
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, bos=True), text
        ids = tok.encode("the city of music 床前明月光 and people went", bos=True)
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    scale = ours.abs().max()
    held = reference_logits(read_tensors(out), model.config, ids)
    assert (theirs - held).abs().max() < tolerance * scale
    if outtype == "f16":
        assert (theirs - ours).abs().max() < tolerance * scale
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "inference.gguf", *args], capture_output=True, text=True, cwd=REPO,
                       env=env(), timeout=limit(120))
    return r.returncode, r.stderr.strip().splitlines()


@pytest.mark.slow  # ~22 s: several CLI processes (scripts/test.sh --fast skips it)
def test_bad_targets_and_inputs_are_one_line_errors(exported, tmp_path):
    path, _, _, files = exported
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--output", str(blocker / "m.gguf")], "is not a folder"),
        (["--output", str(tmp_path / "missing" / "m.gguf")], "does not exist"),
        (["--output", str(tmp_path)], "is a folder"),
        (["--output", str(files["f16"])], "already exists; pass --overwrite"),
        (["--output", str(tmp_path / "m.gguf"), "--outtype", "q2_k"], "unknown --outtype 'q2_k'"),
    ]
    for extra, message in cases:
        rc, err = _cli("--model", str(path), *extra)
        assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
    quantized = tmp_path / "quantized"
    shutil.copytree(path, quantized)
    (quantized / "quantization_config.json").write_text("{}")
    rc, err = _cli("--model", str(quantized), "--output", str(tmp_path / "m.gguf"))
    assert rc == 1 and "is a quantized folder" in err[0]
    assert not (tmp_path / "m.gguf").exists() and [p.name for p in tmp_path.iterdir()] != []
    assert not list(tmp_path.glob(".*.tmp"))
