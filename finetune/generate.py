"""Batch generation: answer a list of instructions with a tuned model, in its own chat template, as JSONL.

    python -m finetune.generate --model runs/sample/sft/hf --input ../shared/data/sft/dreamer_test_data/*.json \\
        --output answers.jsonl [--temperature 0.7 --top_p 0.9 --max_new_tokens 256 --batch_size 8]

Inputs: JSON lists of prompt strings (DreamerGPT's test_data layout), or instruction files in any layout the
fine-tuning data accepts (.json/.jsonl, optionally .gz; alpaca, BELLE with --instruction_field/--output_field,
ShareGPT, OpenAI): the conversation up to its last user turn is the prompt and its last reply is kept as
`reference`. Each output line is {"source", "index", "messages", "answer"[, "reference"]}; the sampling settings,
model and template go to OUTPUT.meta.json. Both files are written atomically when all answers are done.

The template is the one stored with the model (run_dir/chat_template.jinja, or the HF folder's
tokenizer_config.json), so prompts are tokenized exactly as in training; --template NAME overrides it. Decoding
uses the KV cache, --batch_size prompts at a time (sorted by token length; prompts of different lengths share a
batch through model.generate.generate_ragged, which needs no padding, so greedy answers do not depend on the
batching). Answers are written in input order.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from tqdm import tqdm

from artifacts import add_quantize_args, check_device, default_device, default_dtype, load_tokenizer, open_model
from common.cli import parser as cli_parser
from common.cli import run_main
from common.errors import UserError
from common.io import atomic_write, write_json
from common.tensors import DTYPES
from finetune.data import BadRecord, Fields, read_records, to_messages
from finetune.templates import get_template, read_chat_template
from inference.constrained import Constraint, add_json_schema_arg, schema_from_arg
from model.generate import (SamplingParams, add_sampling_args, generate_ragged, length_sorted_batches,
                            sampling_from_args)
from tokenizer.chat_template import encode_chat


def read_prompts(path: str, fields: Fields) -> list[dict[str, Any]]:
    """[{"source", "index", "messages", "reference"?}] of one input file."""
    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):  # DreamerGPT: a list of prompts
            return [{"source": str(p), "index": i, "messages": [{"role": "user", "content": x}]}
                    for i, x in enumerate(data)]
    items = []
    for i, (where, record) in enumerate(read_records(p)):
        try:
            messages = to_messages(record, "auto", fields)
        except BadRecord as e:
            raise UserError(f"{where}: {e}") from None
        if messages and messages[-1]["role"] == "assistant":
            item = {"source": str(p), "index": i, "messages": messages[:-1], "reference": messages[-1]["content"]}
        else:
            item = {"source": str(p), "index": i, "messages": messages}
        if not item["messages"] or item["messages"][-1]["role"] != "user":
            raise UserError(f"{where}: the conversation must end with a user turn (or a reply to drop)")
        items.append(item)
    return items


def main(argv: list[str] | None = None) -> None:
    p = cli_parser("python -m finetune.generate", __doc__)
    p.add_argument("--model", required=True, help="Hugging Face folder or training run directory")
    p.add_argument("--input", required=True, nargs="+", help="JSON prompt lists or instruction files")
    p.add_argument("--output", required=True, help="JSONL file of answers (OUTPUT.meta.json gets the settings)")
    p.add_argument("--template", default=None, help="chat template name (default: the one stored with the model)")
    p.add_argument("--system", default=None, help="system text for every prompt (default: the template's)")
    add_sampling_args(p, SamplingParams(max_tokens=256, seed=0))
    p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--instruction_field", default="instruction", help="alpaca-layout key of the instruction")
    p.add_argument("--output_field", default="output", help="alpaca-layout key of the reference answer")
    p.add_argument("--adapter", default=None,
                   help="PEFT LoRA adapter folder merged into --model (e.g. a LoRA run's adapter/)")
    p.add_argument("--tag", default=None, help="checkpoint tag of a training run (default: latest)")
    add_quantize_args(p)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_json_schema_arg(p)
    args = p.parse_args(argv)
    run_main(generate, args)


def generate(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"--output {out} exists; pass --overwrite to replace it")
    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise UserError("--batch_size and --max_new_tokens must be positive")
    sampling = sampling_from_args(args)
    constrained, schema = schema_from_arg(getattr(args, "json_schema", None))
    fields = Fields(instruction=args.instruction_field, output=args.output_field)
    items = [item for path in args.input for item in read_prompts(path, fields)]
    if not items:
        raise UserError(f"{', '.join(args.input)}: no prompts")
    if args.system is not None:
        for item in items:
            item["messages"] = [{"role": "system", "content": args.system}] + \
                [m for m in item["messages"] if m["role"] != "system"]
    template = get_template(args.template).jinja() if args.template else read_chat_template(args.model)
    if template is None:
        raise UserError(f"{args.model} stores no chat template (no chat_template.jinja, no chat_template in "
                        "tokenizer_config.json); pass --template NAME")
    device = args.device or default_device()
    check_device(device)
    model = open_model(args.model, device, args.dtype or default_dtype(device), tag=args.tag, adapter=args.adapter,
                       quantize=args.quantize, group_size=args.group_size, quantize_head=args.quantize_head)
    tok = load_tokenizer(args.model, None, model)
    prompts = []
    for item in items:
        try:
            # Training encodes message contents as text (finetune/templates.py), so a "</s>" typed in a prompt
            # stays text here too.
            prompts.append(encode_chat(template, tok, item["messages"], sanitize_control_tokens=True))
        except TemplateError as e:  # e.g. the template's own raise_exception on roles it does not accept
            raise UserError(f"{item['source']} prompt {item['index']}: chat template error: {e}") from None
    too_long = [i for i, ids in enumerate(prompts) if len(ids) >= model.config.max_seq_len]
    if too_long:
        item = items[too_long[0]]
        raise UserError(f"{item['source']} prompt {item['index']} has {len(prompts[too_long[0]])} tokens; the "
                        f"model's context is {model.config.max_seq_len}")

    generator = torch.Generator(device=device)
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    answers: list[str | None] = [None] * len(items)
    start = time.perf_counter()
    new_tokens = 0
    eos_id = tok.eos_id if tok.eos_id >= 0 else None
    batches = length_sorted_batches([len(x) for x in prompts], args.batch_size)
    with tqdm(total=len(items), desc="generate", unit="prompt", dynamic_ncols=True) as bar:
        for batch in batches:
            outs = generate_ragged(model, [prompts[i] for i in batch], sampling.max_tokens, eos_id,
                                   sampling.temperature, sampling.top_k, sampling.top_p, generator,
                                   vocab_size=tok.vocab_size,
                                   constraints=[Constraint.json_schema(tok, model.config.vocab_size, schema)
                                                for _ in batch] if constrained else None)
            for i, new in zip(batch, outs):
                new_tokens += len(new)
                answers[i] = tok.decode(new)
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    meta = {"model": str(args.model), "tag": args.tag, "template": args.template or "stored with the model",
            "chat_template": template, "inputs": list(args.input), "prompts": len(items), "batches": len(batches),
            "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                         "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size},
            "json_schema": schema if constrained else None,
            "device": str(device), "dtype": args.dtype or default_dtype(device), "quantize": args.quantize,
            "new_tokens": new_tokens, "seconds": round(seconds, 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        for item, answer in zip(items, answers):
            f.write(json.dumps({**item, "answer": answer}, ensure_ascii=False) + "\n")
    write_json(out.with_name(out.name + ".meta.json"), meta)
    print(f"{len(items)} answers ({new_tokens:,} new tokens in {seconds:.1f} s, {len(batches)} batches) -> {out}; "
          f"settings in {out.name}.meta.json")


if __name__ == "__main__":
    main()
