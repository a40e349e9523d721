"""Continuous batching: a fixed number of KV-cache slots shared by all requests, one batched decode step at a time.

    engine = Engine(model, tokenizer, slots=8).start()
    for event in engine.stream(prompt_ids, SamplingParams(max_tokens=64)):
        print(event.text, end="")

Each scheduler step (1) frees the slots of finished or cancelled requests, (2) admits waiting requests into the
free slots, (3) prefills up to `prefill_chunk` prompt tokens of the admitted requests (their pieces together,
right-padded; a longer prompt goes on in the next steps) and samples the first token of each prompt that is now
complete, and (4) runs one forward pass over the last token of every running sequence together. So a long prompt
enters in chunks between decode steps: the gap between two tokens of a running stream is at most one chunk's
forward plus one decode step (chunked prefill).

Prefix caching (a slot-copy scheme that fits the per-row cache, not vLLM's hashed blocks): a slot keeps the keys and
values of its last sequence after the request ends, until the slot is given to another. A new request takes the
free slot whose kept tokens share the longest prefix with its prompt, or, when a running (or other free) slot
shares a longer one, copies that row's prefix into the least recently used free slot; only the rest of the prompt
is prefilled. Its limits: at most `slots` sequences are remembered (a prefix survives only while its slot is not
reused), prefixes match token by token from the start (no sharing inside a prompt), and the copy is a row-to-row
copy of the prefix's keys and values. Models with rope_type dynamic get neither chunking nor reuse: past the
original context a key's rotation depends on the sequence length when it was computed.

Every sequence has its own position (rotary angle and KV-cache row length): the step writes each row's new key/value
at that row's own position and masks each row's attention to its own length, so sequences of different lengths that
joined at different times share one batched matmul.
Sampling settings and the random generator (seeded per request) are per sequence too.

Every step is one call of the model's own forward (model/model.py Transformer.forward) over rows of its KVCache,
each row at its own length, so the engine decodes exactly as Transformer.generate does (rotary tables, dynamic
RoPE included) and a quantized model runs here unchanged.
Results go to each request's `sink` (a callable, called on the engine thread) as Events: text deltas that are
safe to show (no half UTF-8 character, no prefix of a stop string), then a last event with a finish_reason.
"""
from __future__ import annotations

import itertools
import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from common.errors import UserError
from model import KVCache, Transformer
from model.generate import SamplingParams, TokenConstraint, apply_penalties, greedy, sample
from tokenizer import StreamDecoder, Tokenizer

from .packing import pack_linears

MEMORY_HEADROOM = 0.8  # the KV cache may take at most this share of the memory free when the engine starts
PREFILL_CHUNK = 512  # default prompt tokens prefilled per step (vLLM's chunked prefill uses 512-8192 on GPUs)


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; try again later (HTTP 429)."""


@dataclass
class Event:
    """Text newly decoded for a request; the last event of a request has finish_reason set."""

    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    detokenizer: StreamDecoder
    """The reply's text, token by token; its context is the anchor given to Engine.submit."""
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    decoded: str = ""  # the reply's text so far (complete characters)
    text: str = ""  # the part of it sent to the sink (a stop string's possible start waits)
    finish_reason: str | None = None
    cancelled: bool = False
    prefilled: int = 0  # prompt tokens whose keys and values are in the slot's cache row
    cached_tokens: int = 0  # of those, how many were reused from an earlier request (prefix caching)
    constraint: TokenConstraint | None = None
    """Constrained decoding (inference/constrained.py): masks the logits before each token is sampled; the reply
    ends when its grammar is complete."""

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        """The prompt is fully prefilled (its first token sampled)."""
        return self.prefilled == len(self.prompt_ids)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` must wait: they may be the start of a stop string. (Half a UTF-8
    character never gets this far: StreamDecoder holds it back.)"""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class Engine:
    """A model, its tokenizer and `slots` KV-cache slots, served by one scheduler thread (`start()`), or stepped
    by hand (`step()`) in tests."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, pack_weights: bool = True, prefill_chunk: int | None = PREFILL_CHUNK,
                 prefix_caching: bool = True):
        """prefill_chunk: prompt tokens prefilled per step at most (None: whole prompts at once); prefix_caching:
        reuse the cached keys and values of a prefix shared with an earlier or running request (module docstring).

        pack_weights: on CPU in float32, large linear weights are packed for MKL's GEMM at a full decode step's
        `slots` rows (inference/packing.py: faster batched decoding, more memory). The engine then runs its own
        copy of the model with those modules swapped; `model` itself is not changed (the copy shares its
        weights)."""
        if slots < 1:
            raise UserError(f"--slots must be at least 1, got {slots}")
        if max_queue < 0:
            raise UserError(f"--max_queue must be >= 0, got {max_queue}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise UserError(f"--prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        if self.max_len < 2:
            raise UserError(f"--max_len must be at least 2, got {max_len}")
        p = model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self._check_memory(slots)
        self.cache: KVCache = model.new_cache(slots, self.max_len)  # row i: slot i; its length: the slot's tokens
        self.packed: list[str] = []  # names of the linears packed in the engine's copy of the model
        if pack_weights and slots > 1:
            self.model, self.packed = pack_linears(self.model, slots)
        dynamic = model.config.rope_type == "dynamic"  # see the module docstring
        self.prefill_chunk = None if dynamic else prefill_chunk
        self.prefix_caching = prefix_caching and not dynamic
        self.slots: list[Request | None] = [None] * slots
        self.kept: list[list[int]] = [[] for _ in range(slots)]  # a free slot's tokens still in its cache row
        self.freed_at = [0] * slots  # the step a slot was last freed at (least recently used first)
        self.steps = 0
        self.stats = {"prefill_forwards": 0, "decode_forwards": 0, "prefilled_tokens": 0, "cached_tokens": 0}
        self.generators: list[torch.Generator | None] = [None] * slots
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    def _check_memory(self, slots: int) -> None:
        need = KVCache.bytes_needed(self.model.config, slots, self.max_len, self.dtype)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        if need > MEMORY_HEADROOM * free:
            gib = 2**30
            raise UserError(f"--slots {slots} needs {need / gib:.2f} GiB of KV cache ({self.max_len} positions each) "
                            f"but only {free / gib:.2f} GiB of {self.device.type} memory is free; lower --slots or "
                            f"--max_len")

    # --- submitting -------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Callable[[Event], None],
               anchor: Sequence[int] = (), constraint: TokenConstraint | None = None) -> Request:
        """Queue a request; raises ValueError for a prompt that does not fit, QueueFull when the queue is full.

        anchor: token(s) decoded in front of the reply and cut off again, so that a reply continuing a word keeps
        its leading space (SentencePiece drops it at the start of a decode).
        constraint: this request's grammar (a fresh one per request: it keeps the reply's parse state)."""
        params.check()
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.max_len:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the context holds {self.max_len} "
                            "(prompt and reply together)")
        if max(prompt_ids) >= self.model.config.vocab_size or min(prompt_ids) < 0:
            raise UserError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        req = Request(list(prompt_ids), params, sink, StreamDecoder(self.tokenizer, anchor), id=next(self._ids),
                      constraint=constraint)
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine stopped after an error: {self.error}")
            if len(self.waiting) >= self.max_queue + self.free_slots():
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self.waiting.append(req)
            self._lock.notify()
        return req

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, anchor: Sequence[int] = (),
               constraint: TokenConstraint | None = None) -> Iterator[Event]:
        """Events of one request as they come (needs `start()`); closing the iterator cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        req = self.submit(prompt_ids, params, events.put, anchor, constraint)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def free_slots(self) -> int:
        return sum(r is None for r in self.slots)

    # --- the scheduler ----------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and all(r is None for r in self.slots):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException as e:  # a bug: fail every request instead of leaving clients hanging
                # Under the lock: submit checks self.error and appends to self.waiting under it, so every request
                # is either in the queue taken here or refused by submit; none is left waiting forever.
                with self._lock:
                    self.error = e
                    waiting, self.waiting = list(self.waiting), deque()
                for req in [*self.slots, *waiting]:
                    if req is not None:
                        self._finish(req, "error")
                raise

    def step(self) -> None:
        """One scheduling round: free, admit, prefill (a chunk of prompt tokens), then one batched decode step."""
        self.steps += 1
        for slot, req in enumerate(self.slots):
            if req is not None and (req.cancelled or req.done):
                if not req.done:
                    self._finish(req, "cancelled")
                self.kept[slot] = self._held(slot)
                self.freed_at[slot] = self.steps
                self.slots[slot] = None
        while None in self.slots:
            with self._lock:
                while self.waiting and self.waiting[0].cancelled:
                    self._finish(self.waiting.popleft(), "cancelled")
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            self._admit(req)
        self._prefill()
        running = [s for s, r in enumerate(self.slots) if r is not None and r.decoding and not r.done
                   and not r.cancelled]
        if running:
            self._decode(running)

    def _held(self, slot: int) -> list[int]:
        """The tokens whose keys and values are in this slot's cache row, in order."""
        req, n = self.slots[slot], self.cache.lengths[slot]
        return (req.prompt_ids + req.output_ids)[:n] if req is not None else self.kept[slot][:n]

    def _admit(self, req: Request) -> None:
        """Give `req` a free slot, with the longest cached prefix of its prompt (prefix caching) in its row."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        slot, source, reuse = min(free, key=lambda s: self.freed_at[s]), None, 0
        if self.prefix_caching:
            # At least the prompt's last token is prefilled: its logits give the first token.
            matches = {s: _common_prefix(self._held(s), req.prompt_ids, len(req.prompt_ids) - 1)
                       for s in range(len(self.slots))}
            best = max(matches.values())
            if best > 0:
                reuse = best
                in_place = [s for s in free if matches[s] == best]
                if in_place:  # a free slot that already holds the prefix: no copy
                    slot = in_place[0]
                else:
                    source = next(s for s in range(len(self.slots)) if matches[s] == best)
        if source is not None:
            # Positions past `reuse` in the source row may be written by its own step later; these are copied now.
            self.cache.k[:, slot, :reuse] = self.cache.k[:, source, :reuse]
            self.cache.v[:, slot, :reuse] = self.cache.v[:, source, :reuse]
        self.cache.lengths[slot] = reuse
        req.prefilled = req.cached_tokens = reuse
        self.stats["cached_tokens"] += reuse
        self.slots[slot], self.kept[slot] = req, []
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        self.generators[slot] = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def _prefill(self) -> None:
        """Prefill the next pieces of admitted prompts (oldest request first, at most prefill_chunk tokens in all,
        right-padded together) and sample the first token of each prompt that is then complete."""
        budget = self.prefill_chunk or self.max_len * len(self.slots)
        todo = sorted((r.id, s) for s, r in enumerate(self.slots)
                      if r is not None and not r.decoding and not r.cancelled)
        rows: list[int] = []
        counts: list[int] = []
        for _, slot in todo:
            req = self.slots[slot]
            n = min(len(req.prompt_ids) - req.prefilled, budget)
            if n <= 0:
                break
            # Right padding reaches max(start) + max(count) in every row: it must fit in the cache (the first
            # row always does; one that would not waits for the next step).
            starts = [self.cache.lengths[s] for s in rows + [slot]]
            if max(starts) + max(counts + [n]) > self.cache.max_len:
                continue
            rows.append(slot)
            counts.append(n)
            budget -= n
        if not rows:
            return
        width = max(counts)
        pad = max(self.tokenizer.eos_id, 0)
        pieces = [self.slots[s].prompt_ids[self.slots[s].prefilled:self.slots[s].prefilled + n]
                  for s, n in zip(rows, counts)]
        tokens = torch.tensor([p + [pad] * (width - len(p)) for p in pieces], device=self.device)
        logits = self.model(tokens, cache=self.cache, cache_rows=rows, input_lengths=counts,
                            output_positions=[n - 1 for n in counts])
        self.stats["prefill_forwards"] += 1
        self.stats["prefilled_tokens"] += sum(counts)
        for s, n in zip(rows, counts):
            self.slots[s].prefilled += n
        complete = [i for i, s in enumerate(rows) if self.slots[s].decoding]
        if complete:
            slots = [rows[i] for i in complete]
            for slot, token in zip(slots, self._sample(logits[complete], slots)):
                self._accept(slot, token)

    @torch.no_grad()
    def _decode(self, running: list[int]) -> None:
        tokens = torch.tensor([[self.slots[s].output_ids[-1]] for s in running], device=self.device)
        logits = self.model(tokens, cache=self.cache, cache_rows=running)[:, -1]
        self.stats["decode_forwards"] += 1
        for s, token in zip(running, self._sample(logits, running)):
            self._accept(s, token)

    def _sample(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        params = [self.slots[s].params for s in slots]
        constraints = [self.slots[s].constraint for s in slots]
        if all(p.temperature <= 0 and not p.penalized for p in params) and all(c is None for c in constraints):
            return greedy(logits).tolist()  # all greedy: one batched argmax
        out = []
        for i, (s, p) in enumerate(zip(slots, params)):
            row = logits[i:i + 1]
            if constraints[i] is not None:  # the grammar's mask comes first: penalties only reorder what it allows
                row = constraints[i].mask(row)
            if p.penalized:
                row = apply_penalties(row, p, self.slots[s].prompt_ids, self.slots[s].output_ids)
            out.append(int(sample(row, p.temperature, p.top_k, p.top_p, self.generators[s])[0]))
        return out

    def _accept(self, slot: int, token: int) -> None:
        """Record a sampled token: emit the text it completes, finish the request when it is done."""
        req = self.slots[slot]
        req.output_ids.append(token)
        if token == self.tokenizer.eos_id and not req.params.ignore_eos:
            self._finish(req, "stop", req.decoded + req.detokenizer.flush())
            return
        searched = len(req.decoded)
        req.decoded += req.detokenizer.push(token)
        if req.constraint is not None:
            req.constraint.accept(token)
            if req.constraint.done:  # the grammar is complete (a closed JSON value): nothing may follow
                self._finish(req, "stop", req.decoded + req.detokenizer.flush())
                return
        text, stops = req.decoded, req.params.stop
        # Only the new text, and the few characters before it a stop string could start in, are searched.
        cut = min((i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            self._finish(req, "stop", text[:cut])
            return
        limit = req.params.max_tokens or self.max_len
        if len(req.output_ids) >= limit or self.cache.lengths[slot] + 1 >= self.max_len:
            self._finish(req, "length", text + req.detokenizer.flush())
            return
        ready = text[:len(text) - _held_back(text, stops)]
        if len(ready) > len(req.text):
            delta, req.text = ready[len(req.text):], ready
            self._emit(req, Event(delta))

    def _finish(self, req: Request, reason: str, text: str | None = None) -> None:
        delta = ""
        if text is not None and text.startswith(req.text):
            delta, req.text = text[len(req.text):], text
        req.finish_reason = reason
        self._emit(req, Event(delta, reason))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        try:
            req.sink(event)
        except Exception:  # a consumer that has gone away must not stop the engine
            req.cancel()
