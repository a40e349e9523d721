"""Export a SentencePiece BPE model as Hugging Face tokenizer files that reproduce its ids exactly.

The stock transformers conversion is not used: in transformers 5 a LlamaTokenizer rebuilds its own pipeline
(Metaspace pre-tokenizer, merges derived from piece ids including control and byte pieces) and can disagree with
SentencePiece on leading/repeated spaces, on text next to user-defined symbols, and on strings such as "<s>".
Instead tokenizer.json is built here with the `tokenizers` library, mirroring what SentencePiece does:

- normalizer: every " " becomes "▁", then the dummy prefix "▁" is prepended once to the whole text (when the model
  uses add_dummy_prefix); identity normalisation otherwise, no whitespace collapsing;
- no pre-tokenizer: SentencePiece's BPE runs over the whole normalised text, so "▁▁▁▁" pieces can form;
- model: BPE whose merges are every split of every NORMAL piece into two NORMAL pieces, ranked by the piece's score
  (SentencePiece merges the highest-scoring piece first), with byte fallback;
- added tokens: only the user-defined pieces, matched on the normalised text (normalized=True) as SentencePiece
  does, so "<sym>hi" gives "▁", "<sym>", "hi";
- special tokens are never parsed out of raw text, as in SentencePiece: "<s>" in a document is three ordinary
  pieces, not the BOS id (control pieces are not added tokens, and tokenizer_config.json sets split_special_tokens
  for transformers, which registers bos/eos/unk/pad as special tokens from it);
- post-processor: BOS prepended by default (add_special_tokens=True), like the original LLaMA tokenizer.

tokenizer_class is PreTrainedTokenizerFast so that transformers loads tokenizer.json as written instead of rebuilding
it. Two inherent differences remain, both vanishingly rare in real text: a text that is exactly one user-defined
symbol loses SentencePiece's lone leading "▁" (the normaliser cannot tell it from the symbol itself), and when two
different splits of the same piece overlap ("ab"+"a" vs "a"+"ba") SentencePiece merges the leftmost while Hugging
Face BPE merges the lower rank. Decoding differs only for <unk> (models without byte fallback): SentencePiece
writes " ⁇ ", transformers "<unk>" (or nothing with skip_special_tokens).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from common.errors import UserError
from common.io import replace_file, write_json
from tokenizer.tokenizer import MODEL_FILENAME, resolve_model_path

_Piece = sp_pb2.ModelProto.SentencePiece
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MODEL_FILENAME)


def load_model_proto(model_path: str | os.PathLike) -> sp_pb2.ModelProto:
    """Parse a SentencePiece .model file (or a directory holding tokenizer.model) into its protobuf."""
    path = resolve_model_path(model_path)
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError, but its class depends on the protobuf backend
        raise UserError(f"{path}: not a valid SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"{path}: not a valid SentencePiece model (no pieces)")
    return proto


def _check_supported(proto: sp_pb2.ModelProto, path: Path) -> None:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        kind = sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)
        raise UserError(f"{path}: only BPE SentencePiece models can be exported, this one is {kind}")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise UserError(
            f"{path}: only identity normalisation without whitespace collapsing can be exported exactly "
            "(train with normalization_rule_name=identity, remove_extra_whitespaces=false)"
        )
    if spec.treat_whitespace_as_suffix:
        raise UserError(f"{path}: treat_whitespace_as_suffix models cannot be exported")


def build_hf_tokenizer(proto: sp_pb2.ModelProto) -> HFTokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly like the SentencePiece BPE model `proto` (see module doc)."""
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: p.score for p in pieces if p.type == _Piece.NORMAL}
    merges: list[tuple[float, int, int, tuple[str, str]]] = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, vocab[left], vocab[right], (left, right)))
    merges.sort()
    unk = next((p.piece for p in pieces if p.type == _Piece.UNKNOWN), None)
    model = BPE(
        vocab=vocab,
        merges=[m[-1] for m in merges],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
        dropout=None,
    )
    tok = HFTokenizer(model)
    user_defined = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    steps = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
        # transformers/tokenizers also run the normaliser over each added token's own text, which would turn
        # "<sym>" into "▁<sym>"; undo the prefix only when the whole string is exactly one symbol.
        steps += [normalizers.Replace(Regex(rf"\A▁{re.escape(s)}\z"), s) for s in user_defined]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>, <unk>, <pad>) are deliberately not added tokens: the `tokenizers` library would
    # then cut "<s>" out of raw text (its encode_special_tokens switch is not saved in tokenizer.json), whereas
    # SentencePiece never produces a control id from text. transformers registers them from tokenizer_config.json.
    tok.add_tokens([AddedToken(s, special=False, normalized=True) for s in user_defined])  # keeps their vocab ids
    bos_id = proto.trainer_spec.bos_id
    if 0 <= bos_id < len(pieces):
        bos = pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _special_piece(proto: sp_pb2.ModelProto, idx: int) -> str | None:
    return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None


def save_hf_tokenizer(model_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and a copy of tokenizer.model into out_dir.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` then gives exactly SentencePiece's ids:
    `tok(text, add_special_tokens=False).input_ids == Tokenizer(model_path).encode(text)`, and with the default
    add_special_tokens=True the BOS id is prepended. Files already in out_dir with other names are left alone.
    """
    src = resolve_model_path(model_path)
    proto = load_model_proto(src)
    _check_supported(proto, src)
    hf = build_hf_tokenizer(proto)
    spec = proto.trainer_spec
    specials = {
        "bos_token": _special_piece(proto, spec.bos_id),
        "eos_token": _special_piece(proto, spec.eos_id),
        "unk_token": _special_piece(proto, spec.unk_id),
        "pad_token": _special_piece(proto, spec.pad_id),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        "split_special_tokens": True,  # "<s>" written in a document is text, as in SentencePiece
        "model_max_length": 1 << 30,
        "padding_side": "right",
    }
    # User-defined symbols stay ordinary added tokens: listing them as special would make transformers re-add them
    # un-normalised, which changes how they match next to spaces.
    special_map = dict(specials)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write everything into a sibling temp dir, then move each file into place: no half-written tokenizer.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".hf_tokenizer_") as tmp:
        tmp = Path(tmp)
        hf.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        shutil.copyfile(src, tmp / MODEL_FILENAME)
        for name in HF_FILES:
            target = out_dir / name
            if name == MODEL_FILENAME and target.exists() and target.resolve() == src.resolve():
                continue
            replace_file(tmp / name, target)
    return out_dir


def add_chat_template(hf_dir: str | os.PathLike, template: str | None) -> None:
    """Store `template` as the chat template of the Hugging Face folder `hf_dir` (its tokenizer_config.json) and
    turn split_special_tokens off; with template None, only the latter. For a chat model's folder: fine-tuning's
    export, its LoRA adapter and merged folders, and finetune.merge's output."""
    path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    # BOS/EOS written by the template must come back as their ids. Plain text is still encoded as SentencePiece
    # does; only the literal strings "<s>"/"</s>" in a message would now be read as the special tokens.
    config["split_special_tokens"] = False
    if template is not None:
        config["chat_template"] = template
    write_json(path, config)
