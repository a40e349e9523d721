"""Resize the vocabulary of a Hugging Face LLaMA folder: the embedding and output matrices gain (or lose) rows.

    python -m model.resize --model llama-hf --tokenizer merged/ --output_dir llama-hf-zh [--pad_to_multiple_of 64]

The step between `python -m tokenizer.merge` and continued pretraining (`init_from_hf` in the training config).
Existing rows are copied unchanged, so every old id keeps its embedding and its output logit; new rows are the mean
of the old rows (the default: a new token starts out as an "average" token, so it neither dominates the softmax nor
sits far from the distribution the layers were trained on) or drawn from N(0, initializer_range). Shrinking is
allowed down to the ids the tokenizer uses, never below. Works on the tensors directly: no model is built.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from common.cli import entry_point, parser
from common.errors import MissingFileError, UserError
from common.io import atomic_dir

from .hf import read_hf_state_dict

INITS = ("mean", "normal")
EMBEDDING, OUTPUT = "model.embed_tokens.weight", "lm_head.weight"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
"""Files not copied from the source folder: its weights (single or sharded) are rewritten as model.safetensors."""


def resize_rows(weight: torch.Tensor, new_rows: int, init: str, std: float, generator: torch.Generator) -> torch.Tensor:
    """`weight` [old, dim] cut or extended to [new_rows, dim]; new rows per `init`, computed in fp32."""
    old = weight.shape[0]
    if new_rows <= old:
        return weight[:new_rows].clone()
    w32 = weight.float()
    if init == "mean":
        extra = w32.mean(dim=0, keepdim=True).expand(new_rows - old, -1)
    elif init == "normal":
        extra = torch.randn(new_rows - old, weight.shape[1], generator=generator) * std
    else:
        raise UserError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    return torch.cat([w32, extra]).to(weight.dtype)


def resize_hf(model: str | Path, output_dir: str | Path, vocab_size: int | None = None,
              tokenizer: str | Path | None = None, pad_to_multiple_of: int = 1, init: str = "mean",
              seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write a copy of the HF folder `model` whose vocabulary is `vocab_size` (default: the tokenizer's, rounded up
    to pad_to_multiple_of). Given a tokenizer, its files replace the folder's and config.json gets its special ids."""
    from tokenizer import Tokenizer

    src = Path(model)
    if not (src / "config.json").is_file():
        raise MissingFileError(f"{src}: no config.json; expected a Hugging Face LLaMA folder")
    if init not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if pad_to_multiple_of < 1:
        raise UserError(f"--pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    config = json.loads((src / "config.json").read_text())
    old_vocab = config["vocab_size"]
    tok = Tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None and (src / "tokenizer.model").is_file():
        tok_in_use = Tokenizer(src / "tokenizer.model")
    else:
        tok_in_use = tok
    if vocab_size is None:
        if tok is None:
            raise UserError("give --vocab_size or --tokenizer (the new vocabulary size is taken from it)")
        vocab_size = tok.vocab_size
    vocab_size = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    if vocab_size < old_vocab:
        if tok_in_use is None:
            raise UserError(f"shrinking {src} from {old_vocab} to {vocab_size} rows needs --tokenizer, to know "
                            "which ids are in use")
    if tok_in_use is not None and vocab_size < tok_in_use.vocab_size:
        raise UserError(f"cannot resize to {vocab_size} rows: tokenizer {tok_in_use.path} uses ids up to "
                        f"{tok_in_use.vocab_size - 1}; give --vocab_size >= {tok_in_use.vocab_size}")
    state = read_hf_state_dict(src)
    tied = config.get("tie_word_embeddings", False)
    if EMBEDDING not in state or (not tied and OUTPUT not in state):
        raise UserError(f"{src}: no {EMBEDDING} / {OUTPUT} tensor; is this a LLaMA folder?")
    generator = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    for name in (EMBEDDING,) if tied else (EMBEDDING, OUTPUT):
        state[name] = resize_rows(state[name], vocab_size, init, std, generator).contiguous()
    if tied:
        state.pop(OUTPUT, None)
    config["vocab_size"] = vocab_size
    if tok is not None:
        config.update(bos_token_id=tok.bos_id if tok.bos_id >= 0 else None,
                      eos_token_id=tok.eos_id if tok.eos_id >= 0 else None,
                      pad_token_id=tok.pad_id if tok.pad_id >= 0 else None)
    with atomic_dir(output_dir, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES) \
                    and not f.name.startswith("."):
                if tok is not None and f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
                    continue  # the old tokenizer's files would contradict the new one
                shutil.copyfile(f, tmp / f.name)
        if tok is not None:
            from tokenizer.hf import save_hf_tokenizer

            save_hf_tokenizer(tok.path, tmp)
    return {"model": str(src), "output_dir": str(output_dir), "old_vocab_size": old_vocab,
            "vocab_size": vocab_size, "init": init, "tied": tied}


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m model.resize", __doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face LLaMA folder to resize")
    p.add_argument("--output_dir", required=True, help="where the resized folder goes")
    p.add_argument("--tokenizer", default=None, help="the new tokenizer.model (or its folder), e.g. from "
                   "tokenizer.merge; its files are written into --output_dir")
    p.add_argument("--vocab_size", type=int, default=None, help="rows to resize to (default: the tokenizer's)")
    p.add_argument("--pad_to_multiple_of", type=int, default=1, help="round the row count up to a multiple of this")
    p.add_argument("--init", choices=INITS, default="mean", help="new rows: mean of the old rows, or N(0, std)")
    p.add_argument("--seed", type=int, default=0, help="seed of --init normal")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = p.parse_args(argv)
    out = resize_hf(args.model, args.output_dir, args.vocab_size, args.tokenizer, args.pad_to_multiple_of,
                    args.init, args.seed, args.overwrite)
    print(f"wrote {out['output_dir']}: vocabulary {out['old_vocab_size']} -> {out['vocab_size']} rows "
          f"(new rows: {out['init']})")


if __name__ == "__main__":
    main()
