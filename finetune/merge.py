"""Merge LoRA adapters into their base model and write a Hugging Face folder.

    python -m finetune.merge --model BASE --adapter ADAPTER [--adapter ADAPTER2 ...] --output_dir OUT

Adapters (PEFT folders: adapter_config.json + adapter_model.safetensors) are applied and merged one after the
other, in the order given (an incremental round's adapter was trained on top of the previous rounds' merge). All
arithmetic is fp32; the folder is written in the base's dtype unless --dtype says otherwise. Tokenizer files come
from the base; the chat template from the last adapter folder that has one, else from the base.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from artifacts import open_model
from common.cli import entry_point, parser
from common.errors import MissingFileError, UserError
from common.io import atomic_dir, check_output_dir
from common.tensors import DTYPES, dtype_from_name
from model.hf_layouts import DEFAULT_LAYOUT, add_layout_args
from model.hf_shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from tokenizer.hf import add_chat_template

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def base_dtype(path: Path) -> str:
    """The dtype a Hugging Face folder's config.json declares (float32 when it says nothing we know)."""
    config = path / "config.json"
    if config.is_file():
        try:
            hf = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config}: not valid JSON ({e})") from None
        name = hf.get("dtype") or hf.get("torch_dtype")
        if name in DTYPES:
            return name
    return "float32"


def find_chat_template(folders: list[Path]) -> str | None:
    """The chat template of the first folder that has one (tokenizer_config.json's chat_template, or the
    chat_template.jinja file transformers 5 writes)."""
    for folder in folders:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text()
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                template = json.loads(config.read_text()).get("chat_template")
            except json.JSONDecodeError as e:
                raise UserError(f"{config}: not valid JSON ({e})") from None
            if template:
                return template
    return None


def write_tokenizer(out: Path, base: Path, tokenizer: Path | None, chat_template: str | None) -> None:
    """Tokenizer files beside the weights (save_hf wrote them from tokenizer.model when there is one; otherwise the
    base's Hugging Face tokenizer files are copied), with the chat template set in tokenizer_config.json and
    split_special_tokens off (tokenizer.hf.add_chat_template)."""
    if tokenizer is None:
        copied = [name for name in HF_TOKENIZER_FILES if (base / name).is_file()]
        for name in copied:
            shutil.copyfile(base / name, out / name)
        if not copied:
            print(f"warning: {base} has no tokenizer.model or tokenizer files; the merged folder has no tokenizer "
                  "(pass --tokenizer)", file=sys.stderr)
    if (out / "tokenizer_config.json").is_file() or chat_template is not None:
        # the chat template, and "</s>" between turns read back as the EOS token (split_special_tokens off)
        add_chat_template(out, chat_template)


def merge(model_path: str | Path, adapters: list[str | Path], output_dir: str | Path, dtype: str | None = None,
          tokenizer: str | Path | None = None, overwrite: bool = False, layout: str = DEFAULT_LAYOUT,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Base + adapters (merged in order, fp32) written as a Hugging Face folder at output_dir in `layout` (weights
    sharded above max_shard_size); returns it."""
    base, out = Path(model_path), Path(output_dir)
    if not adapters:
        raise UserError("give at least one --adapter to merge")
    check_output_dir(out, overwrite)
    parse_size(max_shard_size)  # refused before any work
    if out.resolve() == base.resolve() or any(out.resolve() == Path(a).resolve() for a in adapters):
        raise UserError(f"--output_dir {out} is one of the inputs; write the merged model to a new folder")
    out_dtype = dtype_from_name(dtype or base_dtype(base))
    model = open_model(base, "cpu", "float32", adapter=adapters, merge_adapter=True,
                       needs_float="python -m finetune.merge")
    tok = Path(tokenizer) if tokenizer else base / "tokenizer.model"
    tok = tok if tok.is_file() else None
    if tokenizer and tok is None:
        raise MissingFileError(f"--tokenizer {tokenizer}: file not found")
    template = find_chat_template([Path(a) for a in reversed(adapters)] + [base])
    with atomic_dir(out, overwrite) as tmp:
        model.to_hf(tmp, tokenizer_path=tok, dtype=out_dtype, layout=layout, max_shard_size=max_shard_size)
        write_tokenizer(tmp, base, tok, template)
        (tmp / "merge_info.json").write_text(json.dumps(
            {"base": str(base.resolve()), "adapters": [str(Path(a).resolve()) for a in adapters],
             "dtype": str(out_dtype).removeprefix("torch.")}, indent=2) + "\n")
    return out


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m finetune.merge", __doc__)
    p.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                   help="base model: a Hugging Face LLaMA folder or a training run directory")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH",
                   help="PEFT LoRA adapter folder; repeat to merge several, in order")
    p.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype of the output; unset: the base's (from its config.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model; unset: the one in --model")
    p.add_argument("--overwrite", action="store_true", help="replace --output_dir if it is not empty")
    add_layout_args(p)
    args = p.parse_args(argv)
    out = merge(args.model, args.adapter, args.output_dir, args.dtype, args.tokenizer, args.overwrite, args.layout,
                args.max_shard_size)
    print(f"merged {len(args.adapter)} adapter(s) into {args.model}; wrote {out}")


if __name__ == "__main__":
    main()
