"""Turning few-shot prompts into token requests, and scoring them: the plain path and the prefix-cache path.

A question's score is the model's next-token logits, at the end of its prompt, of the four answer letters.
The plain path runs every prompt on its own. The fast path runs the tokens that all prompts of a group (one
subject, one number of shots) share once into a batch-1 KV cache, then, for batches of questions, copies that
cache B times and runs only the right-padded question suffixes. Both paths read the very same token lists
(every prompt is encoded whole; the shared prefix is the longest common prefix of those lists), so they differ
only by floating-point rounding.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError

from .data import LETTERS, Question


@dataclass
class SubjectPrompts:
    """The text pieces of one subject's prompts: header + first k shots + the question item."""

    subject: str
    header: str
    """The instruction line(s) that open every prompt."""
    shots: list[str]
    """Formatted dev examples with their answers, in file order (at most the requested number)."""
    items: list[str]
    """Formatted questions to score, each ending with the answer cue."""
    answer_sep: str
    """What the examples put between the cue and the letter (" " for MMLU's "Answer: A", "" for C-Eval)."""

    @classmethod
    def build(cls, subject: str, header: str, shots: Sequence[Question], questions: Sequence[Question], cue: str,
              answer_sep: str) -> SubjectPrompts:
        """Each question as both reference scripts write it (question, lettered choices, cue); a shot goes on
        with answer_sep, its letter and a blank line."""
        def body(q: Question) -> str:
            return q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + cue

        return cls(subject, header, [f"{body(q)}{answer_sep}{q.answer}\n\n" for q in shots],
                   [body(q) for q in questions], answer_sep)

    def prompt(self, i: int, k: int) -> str:
        return self.header + "".join(self.shots[:k]) + self.items[i]


@dataclass
class Request:
    """One prompt, tokenized, ready to score."""

    subject: str
    index: int
    """Position of the question in its subject's list."""
    tokens: np.ndarray
    """int64 token ids of the whole prompt."""
    shots: int
    """Few-shot examples kept (fewer than asked when the prompt did not fit the context)."""
    truncated: bool
    """Even the zero-shot prompt was too long: only its last max_length tokens are read."""
    choice_ids: tuple[int, ...]
    """Token ids of the answer letters right after the cue."""


def answer_letter_ids(tokenizer, prompt: str, answer_sep: str, bos: bool) -> tuple[int, ...]:
    """The id each letter gets in context: encode(prompt + sep + letter) must be encode(prompt) plus one token.

    Encoding a letter alone gives the wrong id with SentencePiece ("A" alone becomes "▁A", but after "答案：" it is
    "A"), which is the bug of Baichuan-7B's evaluation scripts; this reads the id off the real prompt.
    """
    base = tokenizer.encode(prompt, bos=bos)
    ids = []
    for letter in LETTERS:
        ext = tokenizer.encode(prompt + answer_sep + letter, bos=bos)
        if len(ext) != len(base) + 1 or ext[:len(base)] != base:
            tail = [tokenizer.id_to_piece(t) for t in ext[max(0, len(base) - 2):]]
            raise UserError(
                f"tokenizer {tokenizer.path}: the answer letter {letter!r} is not one token of its own right after "
                f"the answer cue {prompt[-8:]!r} (the prompt with the letter ends in pieces {tail}); scoring needs "
                "each of A, B, C, D to be a single token in that position")
        ids.append(ext[-1])
    if len(set(ids)) != len(ids):
        raise UserError(f"tokenizer {tokenizer.path}: answer letters map to repeated token ids {ids}")
    return tuple(ids)


def build_requests(tokenizer, prompts: SubjectPrompts, max_length: int, bos: bool) -> list[Request]:
    """Tokenize every question's prompt with all shots, dropping shots from the end while it is longer than
    max_length tokens (as Hendrycks' evaluate.py does); a prompt still too long with no shots keeps its last
    max_length tokens."""
    if not prompts.items:
        return []
    choice_ids = answer_letter_ids(tokenizer, prompts.prompt(0, len(prompts.shots)), prompts.answer_sep, bos)
    k_all = len(prompts.shots)
    encoded = tokenizer.encode_batch([prompts.prompt(i, k_all) for i in range(len(prompts.items))], bos=bos)
    requests = []
    for i, tokens in enumerate(encoded):
        k = k_all
        while len(tokens) > max_length and k > 0:
            k -= 1
            tokens = tokenizer.encode(prompts.prompt(i, k), bos=bos)
        truncated = len(tokens) > max_length
        if truncated:
            tokens = tokens[-max_length:]
        requests.append(Request(prompts.subject, i, np.asarray(tokens, dtype=np.int64), k, truncated, choice_ids))
    return requests


@torch.inference_mode()
def score_plain(model, requests: Sequence[Request], progress: tqdm | None = None) -> torch.Tensor:
    """Letter logits [N, 4] (float32, CPU), one prompt per forward pass: the reference path."""
    device = model.tok_embeddings.weight.device
    out = torch.empty(len(requests), len(LETTERS))
    for n, req in enumerate(requests):
        tokens = torch.from_numpy(req.tokens).to(device)[None]
        logits = model(tokens, output_positions=torch.tensor([len(req.tokens) - 1], device=device))
        out[n] = logits[0, list(req.choice_ids)].float().cpu()
        if progress is not None:
            progress.update(1)
    return out


def _common_prefix_length(seqs: Sequence[np.ndarray]) -> int:
    ref = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        if n == 0:
            break
        diff = np.flatnonzero(s[:n] != ref[:n])
        if diff.size:
            n = int(diff[0])
    return n


@torch.inference_mode()
def score_cached(model, requests: Sequence[Request], batch_size: int, progress: tqdm | None = None) -> torch.Tensor:
    """Letter logits [N, 4] (float32, CPU) with the shared prefix of each group computed once in a KV cache."""
    device = model.tok_embeddings.weight.device
    groups: dict[tuple, list[int]] = defaultdict(list)
    for n, req in enumerate(requests):
        # A left-truncated prompt shares no prefix with the others: it makes a group of its own.
        groups[(req.subject, req.shots, n if req.truncated else -1)].append(n)
    out = torch.empty(len(requests), len(LETTERS))
    for members in groups.values():
        seqs = [requests[n].tokens for n in members]
        # Every question keeps at least one token of its own, the one whose logits are read.
        shared = min(_common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
        order = sorted(range(len(members)), key=lambda j: len(seqs[j]), reverse=True)
        longest = len(seqs[order[0]]) - shared
        cache = model.new_cache(1, shared + longest)
        if shared:
            prefix = torch.from_numpy(seqs[0][:shared]).to(device)[None]
            model(prefix, cache=cache, output_positions=torch.tensor([shared - 1], device=device))
        # Longest suffixes first, so each batch pads only up to lengths close to its own.
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = [len(seqs[j]) - shared for j in batch]
            width = max(lengths)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)  # padding after the last real token
            for row, j in enumerate(batch):
                tokens[row, :lengths[row]] = torch.from_numpy(seqs[j][shared:])
            rows_cache = cache.repeat(len(batch), max_len=shared + width)
            last = torch.tensor(lengths, device=device) - 1
            logits = model(tokens.to(device), cache=rows_cache, output_positions=last)
            ids = torch.tensor([requests[members[j]].choice_ids for j in batch], device=device)
            letter_logits = logits.gather(1, ids).float().cpu()
            for row, j in enumerate(batch):
                out[members[j]] = letter_logits[row]
            if progress is not None:
                progress.update(len(batch))
    return out
