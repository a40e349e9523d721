"""Turn a training run directory's checkpoint (any ZeRO stage, any number of ranks) into a Hugging Face LLaMA folder.

    python -m pretrain.export --model runs/sample/train [--tag step_000300] --output_dir runs/sample/hf

The folder (config.json, model.safetensors, tokenizer files) loads with transformers'
AutoModelForCausalLM/AutoTokenizer.from_pretrained, no trust_remote_code. --layout baichuan writes Baichuan-7B's
released layout instead (fused W_pack; transformers needs Baichuan's own modeling files for it, our commands do
not); weights above --max_shard_size (default 5GB) are split into shards with model.safetensors.index.json.
Reading the checkpoint back as our own Transformer (consolidated fp32 weights) is
artifacts.run_dir.load_checkpoint_model.
"""
from __future__ import annotations

from pathlib import Path

from artifacts.run_dir import load_checkpoint_model, resolve_tag
from common import cli
from common.io import check_output_dir
from common.tensors import DTYPES, dtype_from_name
from model.hf_layouts import DEFAULT_LAYOUT, add_layout_args
from model.hf_shards import DEFAULT_MAX_SHARD_SIZE, parse_size


def export(run_dir: str | Path, output_dir: str | Path, tag: str | None = None, dtype: str = "float32",
           overwrite: bool = False, layout: str = DEFAULT_LAYOUT,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write checkpoint `tag` of run_dir as a Hugging Face folder in `layout`, tokenizer included, weights sharded
    above max_shard_size; returns output_dir."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    check_output_dir(output_dir, overwrite)
    torch_dtype = dtype_from_name(dtype)
    model = load_checkpoint_model(run_dir, tag)
    tokenizer = run_dir / "tokenizer.model"
    return model.to_hf(output_dir, tokenizer_path=tokenizer if tokenizer.is_file() else None, dtype=torch_dtype,
                       layout=layout, max_shard_size=max_shard_size)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python -m pretrain.export", __doc__)
    parser.add_argument("--model", "--checkpoint_dir", dest="model", required=True,
                        help="training run directory (holds 'latest' and step_* checkpoints)")
    parser.add_argument("--tag", default=None, help="checkpoint to export, e.g. step_000300 (default: latest)")
    parser.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace what a non-empty --output_dir holds")
    add_layout_args(parser)
    args = parser.parse_args(argv)
    tag = resolve_tag(args.model, args.tag)
    parse_size(args.max_shard_size)  # a bad size is refused before the checkpoint is read
    out = export(args.model, args.output_dir, tag, args.dtype, args.overwrite, args.layout, args.max_shard_size)
    print(f"exported {Path(args.model) / tag} to {out}")


if __name__ == "__main__":
    main()
