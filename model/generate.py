"""Batched generation for prompts of different lengths, through the Transformer's KV cache.

The Transformer has no padding mask, so prompts of different lengths are batched the way Meta's original LLaMA
generate did: all rows are run together from position 0; up to the shortest prompt's length in one prefill, then
one token per step, where a row that still has prompt tokens is fed its own next prompt token instead of the
sampled one. Every row's positions stay contiguous, no padding is ever attended to, and greedy results equal
generating each prompt on its own with `Transformer.generate`. Sorting prompts by length first
(`length_sorted_batches`) keeps the steps spent feeding prompt tokens one at a time few.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .model import Transformer, sample


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, sorted by length and cut into batches of up to batch_size."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_ragged(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, generator: torch.Generator | None = None,
                    vocab_size: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (up to max_new_tokens, without the EOS that ends a row), all rows run together.

    Greedy when temperature is 0; a row also stops where the model's context (max_seq_len) is full.
    vocab_size: ids at or above it (the padding of a model vocabulary larger than the tokenizer's) are never picked.
    """
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate_ragged needs at least one prompt, and every prompt at least one token")
    device = model.tok_embeddings.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    shortest, longest = int(lengths.min()), int(lengths.max())
    if longest > model.config.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens exceeds max_seq_len={model.config.max_seq_len}")
    total = min(longest + max_new_tokens, model.config.max_seq_len)
    tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    cache = model.new_cache(len(prompts), total)
    last = torch.full((len(prompts),), shortest - 1, device=device)
    logits = model(tokens[:, :shortest], cache=cache, output_positions=last)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    pos = shortest - 1  # stays so when there is no room left: nothing is generated
    for pos in range(shortest, total):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        in_prompt = pos < lengths
        nxt = torch.where(in_prompt, tokens[:, pos], sample(logits, temperature, top_k, top_p, generator))
        tokens[:, pos] = nxt
        if eos_id is not None:
            done |= ~in_prompt & (nxt == eos_id)
        done |= pos + 1 - lengths >= max_new_tokens
        if bool(done.all()) or pos + 1 == total:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    out = []
    for row, p in enumerate(prompts):
        new = tokens[row, len(p):min(len(p) + max_new_tokens, pos + 1)].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new)
    return out
