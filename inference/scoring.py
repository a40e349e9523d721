"""Log-probabilities of given tokens under the model: the completions API's `logprobs` (with `echo`, of the
prompt too: lm-evaluation-harness's loglikelihood requests) and chat's, and OpenAI's objects built from them.

Scoring is a teacher-forced forward pass of the model's own `Transformer.forward` over the sequence, apart from the
engine: its KV-cache slots are never touched. The server runs it in a worker thread on the engine's model object
(the same weights, in eval mode; the engine may have swapped some linears for MKL-packed copies, which are read-only
and fall back to the ordinary weight at other row counts, so a concurrent forward is safe). Sequences longer than
SCORE_CHUNK go through in chunks with a KV cache of their own, so that memory stays at SCORE_CHUNK rows of logits.

The log-probabilities are those of the model's raw distribution (log-softmax of the logits, before temperature,
top-k/p or penalties), as OpenAI and vLLM report them; a generated token is scored in the same way after the reply
is done, so greedy replies and sampled ones report the same quantity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from model import Transformer
from tokenizer import StreamDecoder, Tokenizer

SCORE_CHUNK = 1024  # positions per forward pass (logits are SCORE_CHUNK x vocab float32)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for the completions API's `logprobs`


@dataclass
class TokenScores:
    """logprobs[i]: log P(ids[i] | ids[:i]) for i >= start (None before start and for position 0); top[i]: the
    top_k most likely (token id, log-probability) at position i, most likely first (None where logprobs[i] is)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@torch.no_grad()
def score(model: Transformer, ids: Sequence[int], top_k: int = 0, start: int = 1,
          chunk: int = SCORE_CHUNK) -> TokenScores:
    """Score ids[start:] given what precedes each token (position 0 has no context: always None)."""
    ids = [int(i) for i in ids]
    start = max(start, 1)
    n = len(ids)
    logprobs: list[float | None] = [None] * n
    top: list[list[tuple[int, float]] | None] = [None] * n
    if n <= start:
        return TokenScores(logprobs, top)
    device = model.tok_embeddings.weight.device
    inputs = torch.tensor([ids[:-1]], device=device)  # position i's logits predict token i + 1
    cache = model.new_cache(1, n - 1) if n - 1 > chunk else None
    for lo in range(0, n - 1, chunk):
        hi = min(lo + chunk, n - 1)
        logits = model(inputs[:, lo:hi], cache=cache)[0]  # [hi - lo, V] float32
        first = max(lo, start - 1)  # rows before it predict tokens nobody asked about
        if first >= hi:
            continue
        logp = torch.log_softmax(logits[first - lo:].float(), dim=-1)
        targets = torch.tensor(ids[first + 1:hi + 1], device=device)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        if top_k:
            values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            best = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        for row, p in enumerate(chosen):
            logprobs[first + 1 + row] = p
            if top_k:
                top[first + 1 + row] = best[row]
    return TokenScores(logprobs, top)


def token_string(tokenizer: Tokenizer, token: int) -> str:
    """How a token is named in `tokens` and `top_logprobs`: its SentencePiece piece with the word-boundary mark
    as a space ("▁world" -> " world"); a byte-fallback piece is its character when it is ASCII ("<0x71>" -> "q")
    and OpenAI's "bytes:\\xe5" for a byte of a longer UTF-8 character; control pieces keep their names ("</s>")."""
    piece = tokenizer.id_to_piece(token)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            byte = int(piece[3:5], 16)
        except ValueError:
            return piece
        return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
    return piece.replace("\u2581", " ")


def token_offsets(tokenizer: Tokenizer, ids: Sequence[int], context: Sequence[int] = ()) -> tuple[list[int], str]:
    """(start of each token's text in the decoded text, the decoded text), decoding as the engine streams a reply
    (`context` in front and not returned). A token that ends inside a UTF-8 character adds no text: the character
    belongs to the token that completes it."""
    decoder = StreamDecoder(tokenizer, context)
    offsets, text = [], ""
    for t in ids:
        offsets.append(len(text))
        text += decoder.push(t)
    return offsets, text + decoder.flush()


def logprobs_object(tokenizer: Tokenizer, ids: Sequence[int], scores: TokenScores, offsets: Sequence[int],
                    top_k: int) -> dict:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset. top_logprobs
    holds the top_k tokens and, as vLLM does, the chosen one when it is not among them; the first token of a
    sequence has null for both, as OpenAI returns it."""
    tops: list[dict[str, float] | None] = []
    for token, p, best in zip(ids, scores.logprobs, scores.top):
        if p is None:
            tops.append(None)
            continue
        entry = {token_string(tokenizer, t): v for t, v in (best or [])[:top_k]}
        entry.setdefault(token_string(tokenizer, token), p)
        tops.append(entry)
    return {"tokens": [token_string(tokenizer, t) for t in ids], "token_logprobs": list(scores.logprobs),
            "top_logprobs": tops, "text_offset": list(offsets)}


def token_bytes(name: str) -> list[int]:
    """The UTF-8 bytes of a token named by token_string (a "bytes:\\xNN" name is that one byte)."""
    if name.startswith("bytes:\\x") and len(name) == 10:
        return [int(name[8:], 16)]
    return list(name.encode("utf-8"))


def chat_logprobs_object(tokenizer: Tokenizer, ids: Sequence[int], scores: TokenScores, top_k: int) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}
    for the reply's tokens (every one has a context, so no null)."""
    def entry(token: int, p: float) -> dict:
        name = token_string(tokenizer, token)
        return {"token": name, "logprob": p, "bytes": token_bytes(name)}

    return {"content": [{**entry(t, p), "top_logprobs": [entry(a, v) for a, v in (best or [])[:top_k]]}
                        for t, p, best in zip(ids, scores.logprobs, scores.top)]}
