"""finetune.generate's batching: prompts grouped by equal token length + Transformer.generate (what it did before)
against prompts sorted by length in fixed batches + model.generate.generate_ragged (what it does now).

    python benchmarks/bench_sft_generate.py --tokenizer ../shared/data/weights/llama2c_tokenizer.model \\
        --input ../shared/data/sft/dreamer_test_data/*.json [--batch_size 8 --max_new_tokens 32]

A random model of --dim/--layers with the tokenizer's vocabulary, fp32 on the CPU, greedy; prompts are rendered
with the vicuna template as finetune.generate renders them. Both ways run in this one process, one after the other,
and must give the same answers (checked). Prints batches, decode steps (single-token forward passes after each
batch's prefill; for ragged batches these include the prompt tokens past the batch's shortest prompt) and seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from finetune.templates import get_template
from model import ModelConfig, Transformer
from model.generate import generate_ragged, length_sorted_batches
from tokenizer import Tokenizer
from tokenizer.chat_template import encode_chat


def equal_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The former grouping: a batch holds prompts of one token length only."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    return [g[s:s + batch_size] for n in sorted(groups) for g in [groups[n]] for s in range(0, len(g), batch_size)]


def run_equal(model: Transformer, prompts: list[list[int]], batch_size: int, max_new: int, eos: int):
    answers: list[list[int]] = [[] for _ in prompts]
    batches = equal_length_batches([len(p) for p in prompts], batch_size)
    steps = 0
    for batch in batches:
        idx = torch.tensor([prompts[i] for i in batch])
        out = model.generate(idx, max_new, eos_id=eos)[:, idx.shape[1]:].tolist()
        steps += len(out[0])
        for i, row in zip(batch, out):
            answers[i] = row[:row.index(eos)] if eos in row else row
    return answers, len(batches), steps


def run_ragged(model: Transformer, prompts: list[list[int]], batch_size: int, max_new: int, eos: int):
    answers: list[list[int]] = [[] for _ in prompts]
    batches = length_sorted_batches([len(p) for p in prompts], batch_size)
    steps = 0
    for batch in batches:
        rows = [prompts[i] for i in batch]
        steps += max(len(p) for p in rows) - min(len(p) for p in rows) + max_new  # prompt tail fed token by token
        for i, new in zip(batch, generate_ragged(model, rows, max_new, eos)):
            answers[i] = new
    return answers, len(batches), steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", required=True, nargs="+", help="JSON lists of prompt strings")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer(args.tokenizer)
    template = get_template("vicuna").jinja()
    questions = [q for path in args.input for q in json.load(open(path, encoding="utf-8"))]
    prompts = [encode_chat(template, tok, [{"role": "user", "content": q}]) for q in questions]
    torch.manual_seed(0)
    config = ModelConfig.from_preset("debug", vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers,
                                     n_heads=args.dim // 64, n_kv_heads=args.dim // 64,
                                     hidden_dim=int(args.dim * 8 / 3) // 16 * 16,
                                     max_seq_len=max(len(x) for x in prompts) + args.max_new_tokens)
    model = Transformer(config).eval()
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; model dim {args.dim}, "
          f"{args.layers} layers, vocab {tok.vocab_size}; batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s)")
    results = {}
    for name, fn in (("equal-length groups + Transformer.generate", run_equal),
                     ("length-sorted + generate_ragged", run_ragged)):
        start = time.perf_counter()
        answers, batches, steps = fn(model, prompts, args.batch_size, args.max_new_tokens, tok.eos_id)
        seconds = time.perf_counter() - start
        results[name] = answers
        print(f"{name:45s} {batches:4d} batches {steps:6d} decode steps {seconds:7.1f} s")
    first, second = results.values()
    assert first == second, "the two batchings gave different greedy answers"
    print("same greedy answers: yes")


if __name__ == "__main__":
    main()
