"""Vocabulary extension: append the pieces of a second SentencePiece model to an existing one.

    python -m tokenizer.merge --base llama/tokenizer.model --extra zh_tok/tokenizer.model --output_dir merged

What the Chinese LLaMA/Alpaca line does to the LLaMA tokenizer before continued pretraining, with two rules made
explicit: every piece of the base keeps its id, type and score (so a model's existing embedding rows stay valid),
and the new pieces (normal and user-defined pieces of --extra not already in the base, in --extra's order) are
appended with scores below every base merge, in their original order. SentencePiece BPE applies the highest-scoring
merge first, so text the base already covered is split as before wherever no new piece applies, and among the new
pieces --extra's own priority is kept. Control, unknown and byte pieces of --extra are never copied: the base has
its own. Both models must be the same type (BPE, as our trainer writes).

Writes tokenizer.model, the Hugging Face files (tokenizer/hf.py: ids equal SentencePiece's) and merge.json.
"""
from __future__ import annotations

import os
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from common.cli import entry_point, parser
from common.errors import UserError
from common.io import atomic_dir, write_json
from tokenizer.hf import load_model_proto, save_hf_tokenizer
from tokenizer.tokenizer import MODEL_FILENAME, Tokenizer

_Piece = sp_pb2.ModelProto.SentencePiece
NEVER_MERGED = -1e8
"""Scores at or below this mark pieces a model keeps out of merging (LLaMA's "▁▁" has -1e9); they do not set the
floor under which new pieces are placed."""


def merge_protos(base: sp_pb2.ModelProto, extra: sp_pb2.ModelProto, base_name: str = "base",
                 extra_name: str = "extra", max_new_pieces: int | None = None) -> tuple[sp_pb2.ModelProto, dict]:
    """A copy of `base` with `extra`'s new pieces appended; returns it and counts of what was added/skipped."""
    base_type, extra_type = base.trainer_spec.model_type, extra.trainer_spec.model_type
    if base_type != extra_type:
        name = sp_pb2.TrainerSpec.ModelType.Name
        raise UserError(f"cannot merge {extra_name} ({name(extra_type)}) into {base_name} ({name(base_type)}): "
                        "both tokenizers must be the same model type")
    merged = sp_pb2.ModelProto()
    merged.CopyFrom(base)
    existing = {p.piece for p in base.pieces}
    scores = [p.score for p in base.pieces if p.type == _Piece.NORMAL and p.score > NEVER_MERGED]
    floor = min(scores, default=0.0)
    added, duplicates, skipped_special = 0, 0, 0
    for p in sorted((p for p in extra.pieces), key=lambda p: -p.score if p.type == _Piece.NORMAL else 0.0):
        if p.type not in (_Piece.NORMAL, _Piece.USER_DEFINED):
            skipped_special += 1
            continue
        if p.piece in existing:
            duplicates += 1
            continue
        if max_new_pieces is not None and added >= max_new_pieces:
            break
        added += 1
        # Strictly decreasing below the base's lowest merge: new pieces rank after every base merge, in order.
        merged.pieces.append(_Piece(piece=p.piece, score=floor - added if p.type == _Piece.NORMAL else 0.0,
                                    type=p.type))
        existing.add(p.piece)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged, {"base_vocab_size": len(base.pieces), "extra_vocab_size": len(extra.pieces),
                    "added": added, "duplicates_skipped": duplicates,
                    "special_or_byte_skipped": skipped_special, "vocab_size": len(merged.pieces)}


def merge_tokenizers(base: str | os.PathLike, extra: str | os.PathLike, output_dir: str | os.PathLike,
                     max_new_pieces: int | None = None, overwrite: bool = False) -> dict:
    """Merge `extra` into `base` and write tokenizer.model, the Hugging Face files and merge.json to output_dir."""
    base_path, extra_path = Tokenizer(base).path, Tokenizer(extra).path
    merged, counts = merge_protos(load_model_proto(base_path), load_model_proto(extra_path), str(base_path),
                                  str(extra_path), max_new_pieces)
    with atomic_dir(output_dir, overwrite) as tmp:
        (tmp / MODEL_FILENAME).write_bytes(merged.SerializeToString())
        tok = Tokenizer(tmp / MODEL_FILENAME)  # SentencePiece must accept the result
        save_hf_tokenizer(tmp / MODEL_FILENAME, tmp)
        card = {"base": str(base_path), "extra": str(extra_path), **counts, "sha256": tok.sha256,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id}
        write_json(tmp / "merge.json", card)
    return card


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m tokenizer.merge", __doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the tokenizer.model to extend (its ids are kept)")
    p.add_argument("--extra", required=True, help="tokenizer.model whose new pieces are appended (e.g. ours)")
    p.add_argument("--output_dir", required=True, help="where the merged tokenizer.model and HF files go")
    p.add_argument("--max_new_pieces", type=int, default=None, help="append at most this many pieces")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = p.parse_args(argv)
    if args.max_new_pieces is not None and args.max_new_pieces < 0:
        raise UserError(f"--max_new_pieces must be >= 0, got {args.max_new_pieces}")
    card = merge_tokenizers(args.base, args.extra, args.output_dir, args.max_new_pieces, args.overwrite)
    print(f"wrote {Path(args.output_dir) / MODEL_FILENAME}: {card['base_vocab_size']} base + {card['added']} new "
          f"pieces = {card['vocab_size']} ({card['duplicates_skipped']} duplicates skipped)")


if __name__ == "__main__":
    main()
