"""Export a fine-tuning run as a Hugging Face LLaMA folder that carries its chat template.

    python -m finetune.export --model runs/sample/sft --output_dir runs/sample/sft/hf [--tag step_000060]

The folder is pretrain.export's (config.json, model.safetensors, tokenizer files) plus, in tokenizer_config.json,
`chat_template` (the Jinja of the template the run was tuned with) and split_special_tokens=false, so that the
BOS/EOS the template writes between turns are read back as those tokens: `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` then gives the training prompt token for token. The folder is built under a
temporary name and renamed into place: a crash leaves no half-written export.

A LoRA run (finetuning_type lora) exports two folders instead: OUTPUT_DIR/adapter, the PEFT adapter
(adapter_config.json + adapter_model.safetensors, whole tensors whatever the ZeRO stage, base_model_name_or_path
the base's Hugging Face folder as the run's model_path spells it, relative when that is) with the tokenizer files
and chat template, and OUTPUT_DIR/merged, the adapter merged into the base (fp32 arithmetic, finetune.merge) with
the same tokenizer files and template. A base that is one of our training run directories is first exported as a
Hugging Face folder into RUN_DIR/base_hf (python -m pretrain.export, split_special_tokens off as above), since
PEFT's base_model_name_or_path must name one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.cli import parser as cli_parser
from common.cli import run_main
from common.errors import MissingFileError, UserError
from common.io import atomic_dir, check_output_dir, write_json
from common.tensors import DTYPES
from tokenizer.hf import add_chat_template
from tokenizer.chat_template import CHAT_TEMPLATE_FILE
from pretrain.export import export as export_run
from model.hf_layouts import DEFAULT_LAYOUT, add_layout_args
from model.hf_shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from artifacts.run_dir import consolidated_state_dict, is_run_dir, resolve_tag

ADAPTER_DIR, MERGED_DIR, BASE_HF_DIR = "adapter", "merged", "base_hf"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
"""A Hugging Face folder's tokenizer files (those that exist are copied)."""


def export(run_dir: str | Path, output_dir: str | Path, tag: str | None = None, dtype: str = "float32",
           overwrite: bool = False, layout: str = DEFAULT_LAYOUT,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    run_dir = Path(run_dir)
    template_file = run_dir / CHAT_TEMPLATE_FILE
    if not template_file.is_file():
        raise MissingFileError(f"{template_file} is missing: is {run_dir} a fine-tuning run directory? "
                               "(pretraining runs export with python -m pretrain.export)")
    tag = resolve_tag(run_dir, tag)
    check_output_dir(output_dir, overwrite)
    meta_file = run_dir / "finetune.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    with atomic_dir(output_dir, overwrite=True) as tmp:
        if meta.get("finetuning_type") == "lora":
            export_lora(run_dir, meta, tmp, tag, dtype, template_file.read_text().rstrip("\n"), layout,
                        max_shard_size)
        else:
            export_run(run_dir, tmp, tag, dtype, overwrite=True, layout=layout, max_shard_size=max_shard_size)
            add_chat_template(tmp, template_file.read_text().rstrip("\n"))
    return Path(output_dir)


def base_hf_folder(run_dir: Path, model_path: str, model_tag: str | None) -> Path:
    """The base as a Hugging Face folder: model_path itself, or, for a training run directory, its export into
    run_dir/base_hf (made once: the base never changes during a fine-tuning run)."""
    base = Path(model_path)
    if (base / "config.json").is_file():
        return base
    if not is_run_dir(base):
        raise MissingFileError(f"{base}: the base model (model_path of {run_dir}) is gone; it is needed to merge "
                               "the adapter")
    out = run_dir / BASE_HF_DIR
    if not (out / "config.json").is_file():
        print(f"exporting the base {base} as a Hugging Face folder to {out} (the adapter's base_model_name_or_path)")
        with atomic_dir(out, overwrite=True) as tmp:
            export_run(base, tmp, model_tag, "float32", overwrite=True)
            add_chat_template(tmp, None)  # the base of a chat adapter: "</s>" between turns is the EOS token
    return out


def export_lora(run_dir: Path, meta: dict, out: Path, tag: str, dtype: str, template: str,
                layout: str = DEFAULT_LAYOUT, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """OUT/adapter (PEFT, with the tokenizer and chat template) and OUT/merged (Hugging Face in `layout`, the same)
    of checkpoint `tag` of a LoRA run tuned with chat template `template`."""
    from finetune.merge import merge
    from model.lora import LoRAConfig, is_lora_name
    from model.lora_peft import CONFIG_FILE, save_adapter

    state = {k: v for k, v in consolidated_state_dict(run_dir, tag).items() if is_lora_name(k)}
    if not state:
        raise UserError(f"{run_dir / tag}: no adapter tensors in the checkpoint")
    base = base_hf_folder(run_dir, meta["model_path"], meta.get("model_tag"))
    adapter, merged = out / ADAPTER_DIR, out / MERGED_DIR
    save_adapter(state, LoRAConfig(**meta["lora"]), adapter, base_model_name_or_path=base, dtype=DTYPES[dtype])
    # The base as the run spelled it (save_adapter writes it resolved): a relative path stays relative, so the
    # folder still names its base after the project directory moves, as PEFT users expect.
    config = json.loads((adapter / CONFIG_FILE).read_text())
    write_json(adapter / CONFIG_FILE, {**config, "base_model_name_or_path": str(base)})
    merge(base, [adapter], merged, dtype=dtype, layout=layout, max_shard_size=max_shard_size)
    add_chat_template(merged, template)
    # The adapter folder carries the tokenizer too (chat --adapter, PEFT users): the merged folder's files.
    for name in TOKENIZER_FILES:
        if (merged / name).is_file():
            shutil.copyfile(merged / name, adapter / name)
    add_chat_template(adapter, template)


def main(argv: list[str] | None = None) -> None:
    parser = cli_parser("python -m finetune.export", __doc__)
    parser.add_argument("--model", "--run_dir", dest="run_dir", required=True,
                        help="fine-tuning run directory (holds 'latest')")
    parser.add_argument("--tag", default=None, help="checkpoint to export, e.g. step_000060 (default: latest)")
    parser.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    add_layout_args(parser)
    args = parser.parse_args(argv)

    def go() -> None:
        parse_size(args.max_shard_size)  # refused before the checkpoint is read
        out = export(args.run_dir, args.output_dir, args.tag, args.dtype, args.overwrite, args.layout,
                     args.max_shard_size)
        tag = resolve_tag(args.run_dir, args.tag)
        if (out / ADAPTER_DIR).is_dir():
            print(f"exported {args.run_dir} ({tag}): adapter {out / ADAPTER_DIR}, merged model with its chat "
                  f"template {out / MERGED_DIR}")
        else:
            print(f"exported {args.run_dir} ({tag}) with its chat template to {out}")

    run_main(go)


if __name__ == "__main__":
    main()
