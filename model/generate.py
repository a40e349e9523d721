"""Decoding: sampling a token from logits, and generating continuations of a batch of prompts.

`generate_ragged` is the one decoding loop of Transformer.generate, batch generation (evaluation, finetune.generate)
and anything else that continues prompts to the end: all prompts are prefilled together (right-padded), then
every unfinished row is continued by one token per step, each row at its own position in the KV cache
(Transformer.forward with `cache_rows`: per-row rotary angles, cache writes and attention masks). No padding is ever
attended to, so greedy results equal generating each prompt on its own. The engine (inference/engine.py) runs the
same forward and `sample` under its own scheduler, which admits requests while others run.
Sorting prompts by length first (`length_sorted_batches`) keeps the padding of the prefill small.

Prompts that start with the same tokens (a k-shot prompt: evaluation's GSM8K shares ~600 of ~700 tokens) can share
that prefix's keys and values: `prefill_prefix` runs it once into a batch-1 cache, and generate_ragged given it
(`shared_prefix`) copies its rows into every row's cache and prefills only each prompt's own rest. The keys and
values are those a whole-prompt prefill computes (the same forward, causal), so greedy replies are the same
(tests/test_generate.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn

from common.errors import UserError

from .cache import KVCache
from .rope import dynamic_length

# `model` below is a model.model.Transformer; it is typed nn.Module because model.py imports this module
# (Transformer.generate), and model/ has no import cycles (tests/test_model_imports.py).


@dataclass
class SamplingParams:
    """How a continuation is decoded: the one sampling-settings type of the engine, the server, chat, web and the
    generation commands (their flags: add_sampling_args)."""

    max_tokens: int | None = None
    """Most new tokens (None: until EOS, a stop string or the end of the context)."""
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """> 1 makes tokens already in the prompt or reply less likely (CTRL / transformers' definition)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the reply already holds (OpenAI's definition; > 0: new topics)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the reply already holds it (OpenAI's definition)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply; they are not part of it."""
    seed: int | None = None
    """Seed of this request's own random generator (None: a random seed)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks: a fixed number of tokens)."""

    def check(self) -> "SamplingParams":
        """Raise ValueError naming the first parameter out of range."""
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise UserError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise UserError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise UserError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop must be a list of non-empty strings")
        return self

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (the engine's all-greedy fast path needs none)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> torch.Tensor:
    """logits [1, V] with params' penalties applied (a new tensor): the repetition penalty over prompt and reply
    (transformers' RepetitionPenaltyLogitsProcessor), then presence and frequency over the reply only
    (OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0))."""
    row = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        scores = row[0, seen]
        row[0, seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if output_ids and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        ids, counts = torch.tensor(list(output_ids), dtype=torch.long, device=row.device).unique(return_counts=True)
        row[0, ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    return row


class TokenConstraint(Protocol):
    """A per-sequence grammar applied before sampling (constrained decoding; inference/constrained.py Constraint is
    the implementation): `mask` sets the logits of tokens it forbids to -inf, `accept` records the sampled token,
    `done` says the grammar is complete and the sequence ends."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


def add_sampling_args(p: argparse.ArgumentParser, defaults: SamplingParams, engine: bool = False) -> None:
    """The sampling flags of a command, with its defaults: --max_new_tokens, --temperature, --top_k, --top_p, --seed;
    engine: also --repetition_penalty and --stop (the engine's; generate_ragged has neither)."""
    p.add_argument("--max_new_tokens", type=int, default=defaults.max_tokens, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=defaults.top_k, help="sample from the k likeliest tokens only")
    p.add_argument("--top_p", type=float, default=defaults.top_p,
                   help="sample from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the sampler (None: a random one)")
    if engine:
        p.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty,
                       help="> 1 makes tokens already in the prompt or reply less likely")
        p.add_argument("--stop", action="append", default=list(defaults.stop),
                       help="stop string (repeat for several)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of flags made by add_sampling_args; ValueError naming the flag of a value out of range."""
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=getattr(args, "repetition_penalty", 1.0),
                            stop=tuple(getattr(args, "stop", ())), seed=args.seed)
    try:
        return params.check()
    except ValueError as e:  # check() names the field; the user typed the flag
        raise UserError("--" + str(e).replace("max_tokens", "max_new_tokens", 1)) from None


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension (the first index among ties, as torch's argmax).

    torch's CPU argmax reduces a [8, 32000] fp32 row block ~20x slower than numpy's (~460 us against ~18 us,
    torch 2.13), which is a few percent of a small model's batched decode step, so CPU fp32 goes through numpy."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.contiguous().numpy().argmax(-1))
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [B, V]."""
    if temperature <= 0:
        return greedy(logits)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, sorted by length and cut into batches of up to batch_size."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values of a token prefix, computed once for many prompts that start with it (prefill_prefix)."""

    tokens: tuple[int, ...]
    cache: KVCache
    """Batch-1 cache holding the keys and values of `tokens`."""


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every prompt shares."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


@torch.inference_mode()
def prefill_prefix(model: nn.Module, tokens: Sequence[int]) -> SharedPrefix:
    """Run `tokens` once through the model into a batch-1 cache, for generate_ragged's shared_prefix."""
    if not tokens or len(tokens) > model.config.max_seq_len:
        raise ValueError(f"a shared prefix needs 1 to max_seq_len={model.config.max_seq_len} tokens, "
                         f"got {len(tokens)}")
    cache = model.new_cache(1, len(tokens))
    device = model.tok_embeddings.weight.device
    # Only the last position's logits are made (the prefix's own logits are not needed, its keys and values are).
    model(torch.tensor([list(tokens)], dtype=torch.long, device=device), cache=cache,
          output_positions=[len(tokens) - 1])
    return SharedPrefix(tuple(tokens), cache)


def _reusable_length(model: nn.Module, prefix: SharedPrefix, prompts: list[Sequence[int]]) -> int:
    """How many of the prefix's positions every prompt can take from it: the tokens all of them share with it,
    leaving each at least its last token to prefill (its logits start the reply). 0 where the rotary angles of a
    whole-prompt prefill would differ (rope_type dynamic rotates by each sequence's own length)."""
    n = min(len(prefix.tokens), min(len(p) for p in prompts) - 1)
    for p in prompts:
        n = next((i for i in range(n) if p[i] != prefix.tokens[i]), n)
    ends = [len(prefix.tokens)] + [len(p) for p in prompts]  # the prefix's keys were rotated for its own length
    if n > 0 and len({dynamic_length(model.config, m) for m in ends}) != 1:
        return 0
    return n


@torch.inference_mode()
def generate_ragged(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    eos_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, generator: torch.Generator | None = None,
                    vocab_size: int | None = None, *, keep_eos: bool = False,
                    use_cache: bool = True, shared_prefix: SharedPrefix | None = None,
                    until: Callable[[int, list[int]], bool] | None = None,
                    constraints: Sequence[TokenConstraint | None] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (up to max_new_tokens, without the EOS that ends a row unless keep_eos).

    Greedy when temperature is 0; a row also stops where the model's context (max_seq_len) is full.
    vocab_size: ids at or above it (the padding of a model vocabulary larger than the tokenizer's) are never picked.
    use_cache=False recomputes every sequence from its start at each step (a check of the cache; prompts of one
    length only).
    constraints: one per prompt (or None): that row's grammar masks its logits before each token and ends the row
    when it is complete (constrained decoding).
    """
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate_ragged needs at least one prompt, and every prompt at least one token")
    context = model.config.max_seq_len
    lengths = [len(p) for p in prompts]
    if max(lengths) > context:
        raise ValueError(f"a prompt of {max(lengths)} tokens exceeds max_seq_len={context}")
    if not use_cache and len(set(lengths)) != 1:
        raise ValueError("use_cache=False needs prompts of one length")
    if constraints is not None and len(constraints) != len(prompts):
        raise ValueError(f"constraints: one per prompt ({len(prompts)}), got {len(constraints)}")
    device = model.tok_embeddings.weight.device
    out: list[list[int]] = [[] for _ in prompts]
    # Rows with room for a new token: below max_new_tokens, and the token's position inside the context.
    active = [r for r, n in enumerate(lengths) if n < context] if max_new_tokens > 0 else []
    if not active:
        return out
    reuse = _reusable_length(model, shared_prefix, [prompts[r] for r in active]) if (
        shared_prefix is not None and use_cache) else 0
    tokens = torch.zeros(len(active), max(lengths[r] for r in active) - reuse, dtype=torch.long, device=device)
    for i, r in enumerate(active):
        tokens[i, :lengths[r] - reuse] = torch.tensor(list(prompts[r][reuse:]), dtype=torch.long)
    if use_cache:
        cache = model.new_cache(len(prompts), min(max(lengths) + max_new_tokens, context))
        if reuse:
            cache.k[:, :, :reuse] = shared_prefix.cache.k[:, :, :reuse]  # broadcast over the rows
            cache.v[:, :, :reuse] = shared_prefix.cache.v[:, :, :reuse]
            for r in active:
                cache.lengths[r] = reuse
        logits = model(tokens, cache=cache, cache_rows=active, input_lengths=[lengths[r] - reuse for r in active],
                       output_positions=[lengths[r] - reuse - 1 for r in active])
    else:
        logits = model(tokens)[:, -1]
    while True:
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        if constraints is not None:
            for i, r in enumerate(active):
                if constraints[r] is not None:
                    logits[i] = constraints[r].mask(logits[i])
        nxt = sample(logits, temperature, top_k, top_p, generator).tolist()
        going = []
        for r, token in zip(active, nxt):
            if eos_id is not None and token == eos_id:
                if keep_eos:
                    out[r].append(token)
                continue
            out[r].append(token)
            if constraints is not None and constraints[r] is not None:
                constraints[r].accept(token)
                if constraints[r].done:
                    continue
            if until is not None and until(r, out[r]):
                continue
            if len(out[r]) < max_new_tokens and lengths[r] + len(out[r]) < context:
                going.append(r)
        active = going
        if not active:
            return out
        if use_cache:
            step = torch.tensor([[out[r][-1]] for r in active], device=device)
            logits = model(step, cache=cache, cache_rows=active)[:, -1]
        else:
            logits = model(torch.tensor([list(prompts[r]) + out[r] for r in active], device=device))[:, -1]
