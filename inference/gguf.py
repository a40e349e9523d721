"""Export a model to GGUF for llama.cpp (and llama-cpp-python), with its SentencePiece tokenizer.

    python -m inference.gguf --model runs/sample/train/hf --outtype q8_0 --output out/model-q8_0.gguf

--outtype: f16 or bf16 (every matrix in that type), q8_0, or q4_0 (matrices in llama.cpp's 32-weight blocks,
quantized with the gguf package's own quants module). Norm weights always stay f32, as llama.cpp's converter keeps
them. With q4_0 the embedding and the output head are written as q8_0, the extra precision llama.cpp's quantizer
also gives those two tensors. A matrix whose rows are not a multiple of 32 weights cannot be blocked and is
written as f16 (a note says which).

The file holds the `llama` architecture metadata (sizes, rms eps, rope base and dimension), the tokenizer as a
SentencePiece `llama` vocabulary (pieces, scores, token types; bos/eos/unk/pad ids read from the tokenizer) and
the chat template of tokenizer_config.json when the folder has one.

Rotary layout: our model (like transformers) rotates the two halves of each head (rotate-half), llama.cpp's llama
rotates adjacent pairs. The q and k projections are therefore written with each head's rows reordered so that
rows (i, i + d/2) become rows (2i, 2i + 1): the same function of the input, in llama.cpp's order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts import load_tokenizer, open_model
from common.cli import entry_point, parser as make_parser
from common.errors import UserError
from common.io import replace_file, tmp_path_for
from model import Transformer
from model.hf import to_hf_state_dict

OUTTYPES = ("f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # weights per block of q8_0 and q4_0


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows of a q or k projection [n_heads * d, in] from rotate-half to adjacent pairs."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rotate_half_to_interleaved."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, index, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{index}.{_LAYER[rest]}"


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> fp32 tensors, q/k rows in llama.cpp's rotary order."""
    config = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for hf_name, tensor in to_hf_state_dict(state, config).items():
        name = gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_heads)
        elif name.endswith("attn_k.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_kv_heads)
        out[name] = tensor.contiguous()
    return out


def tensor_type(name: str, tensor: torch.Tensor, outtype: str):
    """The GGML type a tensor is written in (see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if tensor.dim() == 1:
        return T.F32
    if outtype in ("f16", "bf16"):
        return T.F16 if outtype == "f16" else T.BF16
    if tensor.shape[-1] % BLOCK:
        return T.F16
    if outtype == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        return T.Q4_0
    return T.Q8_0


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    data = tensor.numpy().astype(np.float32)
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def tokenizer_metadata(tokenizer_path: Path, vocab_size: int) -> dict[str, Any]:
    """Pieces, scores and token types of a SentencePiece model, padded with unused pieces to the model's vocab."""
    from tokenizer.hf import load_model_proto

    proto = load_model_proto(tokenizer_path)
    pieces = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's type numbers are GGUF's TokenType values
    for i in range(len(pieces), vocab_size):  # the embedding was padded beyond the tokenizer
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    spec = proto.trainer_spec
    return {"tokens": pieces, "scores": scores, "types": types, "bos": spec.bos_id, "eos": spec.eos_id,
            "unk": spec.unk_id, "pad": spec.pad_id, "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}


def chat_template(model_dir: Path) -> str | None:
    file = model_dir / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if template is not None and not isinstance(template, str):
        raise UserError(f"{file}: chat_template must be a string (named templates are not supported)")
    return template


def check_output_file(path: Path, overwrite: bool) -> None:
    """A GGUF target must be a writable file path: a clear error before any work."""
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file path such as {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise UserError(f"--output {path} already exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"--output {path}: folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"--output {path}: {parent} is not a folder")
    probe = tmp_path_for(path)
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--output {path}: cannot write in {parent} ({e.strerror})") from None


def export_gguf(model: Transformer, tokenizer_path: str | Path, output: str | Path, outtype: str,
                name: str = "model", template: str | None = None, overwrite: bool = False) -> list[str]:
    """Write `model` as GGUF to `output` atomically; returns notes (tensors that fell back to f16)."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    output = Path(output)
    check_output_file(output, overwrite)
    config = model.config
    tok = tokenizer_metadata(Path(tokenizer_path), config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]
    tmp = tmp_path_for(output)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    notes = []
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        if outtype.startswith("q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.dim)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tok["tokens"])
        writer.add_token_scores(tok["scores"])
        writer.add_token_types(tok["types"])
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
            if tok[key] >= 0:
                add(tok[key])
        writer.add_add_bos_token(tok["bos"] >= 0)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(tok["add_space_prefix"])
        if template is not None:
            writer.add_chat_template(template)
        for tensor_name, tensor in gguf_tensors(model).items():
            qtype = tensor_type(tensor_name, tensor, outtype)
            if outtype.startswith("q") and tensor.dim() == 2 and qtype == gguf.GGMLQuantizationType.F16:
                notes.append(f"{tensor_name}: rows of {tensor.shape[-1]} weights are not a multiple of {BLOCK}; "
                             "written as f16")
            writer.add_tensor(tensor_name, _encode(tensor, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        replace_file(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return notes


# The folders the export commands write inside a run directory (scripts/train.sh: RUN/hf; finetune.export: RUN/hf
# and, for LoRA, RUN/hf/merged and RUN/hf/base_hf): their names say nothing about the model.
EXPORT_FOLDER_NAMES = ("hf", "merged", "base_hf")


def model_name(model_dir: str | Path) -> str:
    """The model's name for general.name: the folder's name, or for an export folder (RUN/hf, RUN/hf/merged) the
    run directory's, which is what a user named."""
    path = Path(model_dir).resolve()
    while path.name in EXPORT_FOLDER_NAMES and path.parent != path:
        path = path.parent
    return path.name or "model"


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = make_parser("python -m inference.gguf", __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("--model", required=True, help="Hugging Face LLaMA folder or training run directory (float)")
    p.add_argument("--outtype", default="f16", help=f"one of: {', '.join(OUTTYPES)}")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run directory (default: latest)")
    p.add_argument("--name", default=None, help="general.name in the file (default: the model folder's name, or "
                   "its run directory's for the export folders hf, hf/merged, hf/base_hf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = p.parse_args(argv)
    if args.outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype {args.outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    model_dir = Path(args.model)
    output = Path(args.output)
    check_output_file(output, args.overwrite)
    model = open_model(model_dir, "cpu", "float32", tag=args.tag,
                       needs_float="python -m inference.gguf (which quantizes with --outtype q8_0 or q4_0)")
    tokenizer = load_tokenizer(model_dir, args.tokenizer, model)
    notes = export_gguf(model, tokenizer.path, output, args.outtype, args.name or model_name(model_dir),
                        chat_template(model_dir), args.overwrite)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {output} ({args.outtype}, {os.path.getsize(output) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
