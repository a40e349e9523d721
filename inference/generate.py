"""Continue a prompt with a model folder (Hugging Face LLaMA folder or training run) that has a tokenizer.

    python -m inference.generate --model out/hf --prompt "床前明月光" --max_new_tokens 64
"""
from __future__ import annotations

import torch

from artifacts import add_quantize_args, default_device, load_tokenizer, open_model
from common import cli
from common.errors import UserError
from common.tensors import DTYPES
from model.config import ATTN_IMPLS
from model.generate import SamplingParams, add_sampling_args, sampling_from_args


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    p = cli.parser("python -m inference.generate", __doc__)
    p.add_argument("--model", required=True,
                   help="Hugging Face folder, training or LoRA fine-tuning run directory, or quantized folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_args(p, SamplingParams(max_tokens=100, seed=0))
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run (default: latest)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to apply on top of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in --model)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn_impl", default="auto", choices=ATTN_IMPLS, help="attention kernel")
    add_quantize_args(p)
    args = p.parse_args(argv)
    sampling = sampling_from_args(args)
    device = args.device or default_device()
    try:
        model = open_model(args.model, device, args.dtype, tag=args.tag, adapter=args.adapter, quantize=args.quantize,
                           group_size=args.group_size, quantize_head=args.quantize_head,
                           runtime={"attn_impl": args.attn_impl})
    except RuntimeError as e:  # torch/DeepSpeed reading a damaged or foreign checkpoint
        raise UserError(f"{args.model}: cannot load the model ({e})") from None
    tok = load_tokenizer(args.model, args.tokenizer, model)
    ids = tok.encode(args.prompt, bos=True)
    if len(ids) >= model.config.max_seq_len:
        raise UserError(f"the prompt is {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    out = model.generate(torch.tensor([ids], device=device), sampling.max_tokens, sampling.temperature,
                         sampling.top_k, sampling.top_p, eos_id=tok.eos_id, generator=generator)
    # Decode prompt and continuation together: SentencePiece drops a word's leading space at the start.
    print(tok.decode([i for i in out[0].tolist() if i not in (tok.bos_id, tok.eos_id)]))


if __name__ == "__main__":
    main()
