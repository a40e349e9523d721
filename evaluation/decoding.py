"""Generating replies for the generative benchmarks (GSM8K, HumanEval): the one place they reach the project's
decoding path, with stop sequences handled here.

Our Transformer decodes through model.generate.generate_ragged (batched prompts of different lengths, KV cache),
in one run per batch: a row ends at the step its text first holds a stop sequence (`until`), and the prompts'
common prefix (GSM8K's 4 shots: most of every prompt) is prefilled once for all batches (`shared_prefix`), each
row's cache starting from a copy of it (a batch whose prompts share more, as HumanEval's n samples of one problem,
prefills its own). A transformers model (evaluation.generation.generate_transformers) does not
stop at a text sequence, so its replies are generated in rounds of growing length: after each round the rows whose
text holds a stop sequence (or that ended with EOS, or reached max_new_tokens) are finished, and only the others go
on, from their prompt plus what they have so far. Greedy replies are the same as one uninterrupted run, cut at the
first stop.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm import tqdm

from model.generate import common_prefix_length, generate_ragged, length_sorted_batches, prefill_prefix

FIRST_ROUND = 64
"""New tokens of the first round; each later round doubles it (most replies stop early)."""


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text up to the earliest stop sequence, whether one was found)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


MIN_SHARED_PREFIX = 16
"""Fewer common leading tokens than this are prefilled with each prompt (copying them would gain nothing)."""


def _generate_ours(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: Sequence[str],
                   batch_size: int, eos: int | None, temperature: float, top_p: float | None,
                   generator: torch.Generator | None, progress: tqdm) -> list[list[int]]:
    """New tokens of every prompt, each row ending at the first stop sequence in its text (or EOS, or the limit)."""
    tok = loaded.tokenizer
    shared = common_prefix_length(prompts) if len(prompts) > 1 else 0
    # every prompt keeps at least its last token to prefill: its logits start the reply
    shared = min(shared, min(len(p) for p in prompts) - 1)
    prefix = prefill_prefix(loaded.model, prompts[0][:shared]) if shared >= MIN_SHARED_PREFIX else None
    new: list[list[int]] = [[] for _ in prompts]
    for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
        rows = [prompts[i] for i in batch]
        # A batch's own longer common prefix (HumanEval's n samples of one problem share the whole prompt)
        own = min(common_prefix_length(rows), min(len(r) for r in rows) - 1) if len(rows) > 1 else 0
        use = prefill_prefix(loaded.model, rows[0][:own]) if own >= shared + MIN_SHARED_PREFIX else prefix
        outs = generate_ragged(loaded.model, rows, max_new_tokens, eos, temperature, None, top_p, generator,
                               tok.vocab_size, shared_prefix=use,
                               until=lambda row, got: cut_at_stop(tok.decode(got), stops)[1])
        for i, got in zip(batch, outs):
            new[i] = got
        progress.update(len(batch))
    return new


def _generate(loaded, rows: list[list[int]], max_new: int, eos: int | None, temperature: float, top_p: float | None,
              generator: torch.Generator | None) -> list[list[int]]:
    """One round of the transformers path."""
    tok = loaded.tokenizer
    from evaluation.generation import generate_transformers  # the transformers path, only for such models

    pad = next((i for i in (tok.pad_id, tok.eos_id) if i >= 0), 0)
    return generate_transformers(loaded.model, rows, max_new, eos, pad, temperature, None, top_p, tok.vocab_size)


def generate_until(loaded, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: Sequence[str],
                   batch_size: int, temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
                   desc: str = "generating") -> list[dict]:
    """Per prompt {"text": the reply cut before the first stop sequence, "new_tokens", "stopped": "stop" | "eos" |
    "length"}, in input order. Prompts must leave max_new_tokens of room in the model's context."""
    tok = loaded.tokenizer
    eos = tok.eos_id if tok.eos_id >= 0 else None
    generator = torch.Generator(device=loaded.device).manual_seed(seed) if temperature > 0 else None
    out: list[dict] = [{} for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="reply") as progress:
        if loaded.backend == "ours":
            replies = _generate_ours(loaded, prompts, max_new_tokens, stops, batch_size, eos, temperature, top_p,
                                     generator, progress)
            for i, got in enumerate(replies):
                text, stopped = cut_at_stop(tok.decode(got), stops)
                why = "stop" if stopped else "length" if len(got) >= max_new_tokens else "eos"
                out[i] = {"text": text, "new_tokens": len(got), "stopped": why}
            return out
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            new: dict[int, list[int]] = {i: [] for i in batch}
            active = list(batch)
            step = FIRST_ROUND
            while active:
                budget = min(step, max_new_tokens - len(new[active[0]]))
                outs = _generate(loaded, [list(prompts[i]) + new[i] for i in active], budget, eos, temperature,
                                 top_p, generator)
                still = []
                for i, got in zip(active, outs):
                    new[i] += got
                    text, stopped = cut_at_stop(tok.decode(new[i]), stops)
                    if stopped or len(got) < budget or len(new[i]) >= max_new_tokens:
                        why = "stop" if stopped else "length" if len(new[i]) >= max_new_tokens else "eos"
                        out[i] = {"text": text, "new_tokens": len(new[i]), "stopped": why}
                        progress.update(1)
                    else:
                        still.append(i)
                active = still
                step *= 2
    return out
