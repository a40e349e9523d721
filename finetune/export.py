"""Export a fine-tuning run as a Hugging Face LLaMA folder that carries its chat template.

    python -m finetune.export --run_dir runs/sample/sft --output_dir runs/sample/sft/hf [--tag step_000060]

The folder is pretrain.export's (config.json, model.safetensors, tokenizer files) plus, in tokenizer_config.json,
`chat_template` (the Jinja of the template the run was tuned with) and split_special_tokens=false, so that the
BOS/EOS the template writes between turns are read back as those tokens: `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` then gives the training prompt token for token. The folder is built under a
temporary name and renamed into place: a crash leaves no half-written export.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import run_main
from common.io import atomic_dir, check_output_dir, write_json
from common.tensors import DTYPES
from finetune.templates import CHAT_TEMPLATE_FILE
from pretrain.export import export as export_run
from artifacts.run_dir import resolve_tag


def add_chat_template(hf_dir: str | Path, template: str) -> None:
    """Store `template` as the chat template of the Hugging Face folder `hf_dir` (its tokenizer_config.json)."""
    path = Path(hf_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    # BOS/EOS written by the template must come back as their ids. Plain text is still encoded as SentencePiece
    # does; only the literal strings "<s>"/"</s>" in a message would now be read as the special tokens.
    config.update(chat_template=template, split_special_tokens=False)
    write_json(path, config)


def export(run_dir: str | Path, output_dir: str | Path, tag: str | None = None, dtype: str = "float32",
           overwrite: bool = False) -> Path:
    run_dir = Path(run_dir)
    template_file = run_dir / CHAT_TEMPLATE_FILE
    if not template_file.is_file():
        raise FileNotFoundError(f"{template_file} is missing: is {run_dir} a fine-tuning run directory? "
                                "(pretraining runs export with python -m pretrain.export)")
    tag = resolve_tag(run_dir, tag)
    check_output_dir(output_dir, overwrite)
    with atomic_dir(output_dir, overwrite=True) as tmp:
        export_run(run_dir, tmp, tag, dtype, overwrite=True)
        add_chat_template(tmp, template_file.read_text().rstrip("\n"))
    return Path(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="fine-tuning run directory (holds 'latest')")
    parser.add_argument("--tag", default=None, help="checkpoint to export, e.g. step_000060 (default: latest)")
    parser.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    args = parser.parse_args(argv)

    def go() -> None:
        out = export(args.run_dir, args.output_dir, args.tag, args.dtype, args.overwrite)
        print(f"exported {args.run_dir} ({resolve_tag(args.run_dir, args.tag)}) with its chat template to {out}")

    run_main(go)


if __name__ == "__main__":
    main()
