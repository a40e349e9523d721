"""Batched answer generation for open questions: chat-template prompts (tokenizer/chat_template.py, with its
Human/Assistant fallback), our model with a KV cache, or transformers.

Prompts are sorted by length and batched. Our Transformer runs a batch of prompts of different lengths with
model.generate.generate_ragged (no padding, greedy results equal one prompt at a time); transformers models use
their own generate() with left padding and an attention mask.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from common.errors import UserError
from model.generate import SamplingParams, generate_ragged, length_sorted_batches
from tokenizer import Tokenizer
from tokenizer.chat_template import (ChatTemplate, encode_rendered, find_chat_template, load_chat_template,
                                     special_tokens)

def question_template(model_dir: str | Path, tokenizer: Any) -> ChatTemplate:
    """The model folder's chat template (else the plain Human/Assistant fallback) for one-question prompts.

    Its special-token variables come from tokenizer_config.json beside the template (or in the folder), so that
    models with a transformers tokenizer (no SentencePiece model) render as transformers does; without that file,
    from our SentencePiece tokenizer."""
    found = find_chat_template(model_dir)
    config_path = (Path(found[1]).parent if found else Path(model_dir)) / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{config_path}: not valid JSON ({e})") from None
        specials = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = config.get(key)
            specials[key] = value.get("content", "") if isinstance(value, dict) else (value or "")
    else:
        specials = special_tokens(tokenizer) if isinstance(tokenizer, Tokenizer) else {}
    return load_chat_template(model_dir, specials=specials)


def encode_prompts(tokenizer, template: ChatTemplate, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of every question's prompt, each the template rendered for one user message.

    A rendered chat template carries its own special tokens, encoded without adding any, as apply_chat_template
    does: a transformers tokenizer maps their text to their ids itself; SentencePiece would spell "<s>" out as
    text, so its prompts go through tokenizer.chat_template.encode_rendered, as fine-tuning's and the server's do.
    """
    texts = [template.render([{"role": "user", "content": q}]) for q in questions]
    if isinstance(tokenizer, Tokenizer):
        return [encode_rendered(tokenizer, text) for text in texts]
    return tokenizer.encode_batch(texts)


@torch.inference_mode()
def generate_transformers(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None,
                          pad_id: int, temperature: float = 0.0, top_k: int | None = None,
                          top_p: float | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """New tokens of each prompt through transformers' generate (left padding, attention mask)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    model_vocab = model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size < model_vocab:
        kwargs["suppress_tokens"] = list(range(vocab_size, model_vocab))
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)[:, width:].tolist()
    result = []
    for new in out:
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        while new and new[-1] == pad_id:  # rows that stopped early are padded to the batch's length
            new.pop()
        result.append(new)
    return result


def generate_answers(loaded, template: ChatTemplate, questions: Sequence[str], sampling: SamplingParams,
                     batch_size: int = 8) -> list[dict[str, Any]]:
    """{"answer", "prompt_tokens", "new_tokens", "truncated"} per question, in input order; `sampling.max_tokens` new
    tokens at most (required), `batch_size` prompts generated together."""
    if sampling.max_tokens is None:
        raise ValueError("generate_answers needs sampling.max_tokens")
    tok = loaded.tokenizer
    prompts = encode_prompts(tok, template, questions)
    room = loaded.max_len - sampling.max_tokens
    if room < 1:
        raise UserError(f"--max_new_tokens {sampling.max_tokens} leaves no room for a prompt in the model's "
                        f"context of {loaded.max_len} tokens")
    truncated = [len(p) > room for p in prompts]
    prompts = [p[-room:] for p in prompts]  # a prompt longer than the room keeps its end (the generation cue)
    eos = tok.eos_id if tok.eos_id >= 0 else None
    pad = next((i for i in (tok.pad_id, tok.eos_id) if i >= 0), 0)
    generator = torch.Generator(device=loaded.device).manual_seed(0 if sampling.seed is None else sampling.seed)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc="generating", unit="answer") as progress:
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            rows = [prompts[i] for i in batch]
            if loaded.backend == "ours":
                outs = generate_ragged(loaded.model, rows, sampling.max_tokens, eos, sampling.temperature, sampling.top_k,
                                       sampling.top_p, generator, tok.vocab_size)
            else:
                outs = generate_transformers(loaded.model, rows, sampling.max_tokens, eos, pad, sampling.temperature,
                                             sampling.top_k, sampling.top_p, tok.vocab_size)
            for i, new in zip(batch, outs):
                new_tokens[i] = new
            progress.update(len(batch))
    records = []
    for i, new in enumerate(new_tokens):
        text = tok.decode(new)
        for stop in template.stop:  # a base model often goes on with the next turn; the answer ends there
            if stop in text:
                text = text[:text.index(stop)]
        records.append({"answer": text.strip(), "prompt_tokens": len(prompts[i]), "new_tokens": len(new),
                        "truncated": truncated[i]})
    return records
