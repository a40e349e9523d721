"""Turn a training checkpoint (any ZeRO stage, any number of ranks) into a model or a Hugging Face LLaMA folder.

    python -m pretrain.export --checkpoint_dir runs/sample/train [--tag step_000300] --output_dir runs/sample/hf

The folder (config.json, model.safetensors, tokenizer files) loads with transformers'
AutoModelForCausalLM/AutoTokenizer.from_pretrained, no trust_remote_code. In Python, `load_checkpoint_model`
returns our own Transformer with the consolidated fp32 weights (what the evaluator uses).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model import ModelConfig, Transformer
from pretrain.checkpoint import resolve_tag, weights_only_loading

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag` (default: latest) merged from all ranks' shards."""
    run_dir = Path(run_dir)
    tag = resolve_tag(run_dir, tag)
    ckpt = run_dir / tag
    with weights_only_loading():
        if any(ckpt.glob("*optim_states.pt")):
            # ZeRO 1-3 (and bf16): the fp32 master weights live, partitioned, in the optimizer shards.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=tag)
        else:
            # ZeRO-0 fp32: the module's full weights are in the model-states file.
            files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise FileNotFoundError(f"{ckpt}: no DeepSpeed model-states file; is the checkpoint complete?")
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def load_checkpoint_model(run_dir: str | Path, tag: str | None = None) -> Transformer:
    """Our Transformer (fp32, CPU, eval mode) with the weights of checkpoint `tag` (default: latest) of run_dir."""
    run_dir = Path(run_dir)
    config_path = run_dir / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; pass the run directory that pretrain/train.py wrote")
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    config.activation_checkpointing = False
    model = Transformer(config)
    state = consolidated_state_dict(run_dir, tag)
    if config.tie_embeddings:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{run_dir}: checkpoint does not match model_config.json "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model.eval()


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
