"""Turn a training checkpoint (any ZeRO stage, any number of ranks) into a model or a Hugging Face LLaMA folder.

    python -m pretrain.export --checkpoint_dir runs/sample/train [--tag step_000300] --output_dir runs/sample/hf

The folder (config.json, model.safetensors, tokenizer files) loads with transformers'
AutoModelForCausalLM/AutoTokenizer.from_pretrained, no trust_remote_code. In Python, `load_checkpoint_model`
returns our own Transformer with the consolidated fp32 weights (what the evaluator uses).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifacts.run_dir import consolidated_state_dict, load_checkpoint_model, resolve_tag  # noqa: F401 (re-exported)
from common.tensors import DTYPES

def export(run_dir: str | Path, output_dir: str | Path, tag: str | None = None, dtype: str = "float32",
           overwrite: bool = False) -> Path:
    """Write checkpoint `tag` of run_dir as a Hugging Face LLaMA folder, tokenizer included; returns output_dir."""
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} exists and is not empty; pass --overwrite to replace it")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = load_checkpoint_model(run_dir, tag)
    tokenizer = run_dir / "tokenizer.model"
    return model.to_hf(output_dir, tokenizer_path=tokenizer if tokenizer.is_file() else None, dtype=DTYPES[dtype])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="training run directory (holds 'latest')")
    parser.add_argument("--tag", default=None, help="checkpoint to export, e.g. step_000300 (default: latest)")
    parser.add_argument("--output_dir", required=True, help="Hugging Face folder to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weight dtype (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists")
    args = parser.parse_args(argv)
    try:
        tag = resolve_tag(args.checkpoint_dir, args.tag)
        out = export(args.checkpoint_dir, args.output_dir, tag, args.dtype, args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {Path(args.checkpoint_dir) / tag} to {out}")


if __name__ == "__main__":
    main()
