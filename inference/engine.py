"""Continuous batching: a fixed number of KV-cache slots shared by all requests, one batched decode step at a time.

    engine = Engine(model, tokenizer, slots=8).start()
    for event in engine.stream(prompt_ids, SamplingParams(max_tokens=64)):
        print(event.text, end="")

Each scheduler step (1) frees the slots of finished or cancelled requests, (2) prefills waiting requests into
the free slots (their prompts together, right-padded) and samples their first tokens, and (3) runs one forward
pass over the last token of every running sequence together. Every sequence has its own position (rotary
angle and KV-cache row length): the step writes each row's new key/value at that row's own position and masks
each row's attention to its own length, so sequences of different lengths that joined at different times share
one batched matmul.
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

from model import KVCache, Transformer
from model.generate import SamplingParams, TokenConstraint, greedy, sample
from tokenizer import StreamDecoder, Tokenizer

from .packing import pack_linears

MEMORY_HEADROOM = 0.8  # the KV cache may take at most this share of the memory free when the engine starts


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
    constraint: TokenConstraint | None = None
    """Constrained decoding (inference/constrained.py): masks the logits before each token is sampled; the reply
    ends when its grammar is complete."""

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


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
                 max_queue: int = 64, pack_weights: bool = True):
        """pack_weights: on CPU in float32, large linear weights are packed for MKL's GEMM at a full decode step's
        `slots` rows (inference/packing.py: faster batched decoding, more memory). The engine then runs its own
        copy of the model with those modules swapped; `model` itself is not changed (the copy shares its
        weights)."""
        if slots < 1:
            raise ValueError(f"--slots must be at least 1, got {slots}")
        if max_queue < 0:
            raise ValueError(f"--max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        if self.max_len < 2:
            raise ValueError(f"--max_len must be at least 2, got {max_len}")
        p = model.tok_embeddings.weight
        self.device, self.dtype = p.device, p.dtype
        self._check_memory(slots)
        self.cache: KVCache = model.new_cache(slots, self.max_len)  # row i: slot i; its length: the slot's tokens
        self.packed: list[str] = []  # names of the linears packed in the engine's copy of the model
        if pack_weights and slots > 1:
            self.model, self.packed = pack_linears(self.model, slots)
        self.slots: list[Request | None] = [None] * slots
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
            raise ValueError(f"--slots {slots} needs {need / gib:.2f} GiB of KV cache ({self.max_len} positions each) "
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
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the context holds {self.max_len} "
                             "(prompt and reply together)")
        if max(prompt_ids) >= self.model.config.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
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
        """One scheduling round: free, admit (prefill), then one batched decode step."""
        for slot, req in enumerate(self.slots):
            if req is not None and (req.cancelled or req.done):
                if not req.done:
                    self._finish(req, "cancelled")
                self.slots[slot] = None
        admitted = []
        for slot in range(len(self.slots)):
            if self.slots[slot] is not None:
                continue
            with self._lock:
                while self.waiting and self.waiting[0].cancelled:
                    self._finish(self.waiting.popleft(), "cancelled")
                if not self.waiting:
                    break
                admitted.append((slot, self.waiting.popleft()))
        if admitted:
            self._prefill(admitted)
        running = [s for s, r in enumerate(self.slots) if r is not None and not r.done and not r.cancelled]
        if running:
            self._decode(running)

    @torch.no_grad()
    def _prefill(self, admitted: list[tuple[int, Request]]) -> None:
        """Run the prompts of newly admitted requests together (right-padded to the longest) and sample each
        one's first token."""
        slots = [slot for slot, _ in admitted]
        width = max(len(req.prompt_ids) for _, req in admitted)
        pad = max(self.tokenizer.eos_id, 0)
        tokens = torch.tensor([req.prompt_ids + [pad] * (width - len(req.prompt_ids)) for _, req in admitted],
                              device=self.device)
        self.cache.reset(slots)
        for slot, req in admitted:
            self.slots[slot] = req
            seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
            self.generators[slot] = torch.Generator(self.device).manual_seed(seed)
        lengths = [len(req.prompt_ids) for _, req in admitted]
        logits = self.model(tokens, cache=self.cache, cache_rows=slots, input_lengths=lengths,
                            output_positions=[n - 1 for n in lengths])
        for slot, token in zip(slots, self._sample(logits, slots)):
            self._accept(slot, token)

    @torch.no_grad()
    def _decode(self, running: list[int]) -> None:
        tokens = torch.tensor([[self.slots[s].output_ids[-1]] for s in running], device=self.device)
        logits = self.model(tokens, cache=self.cache, cache_rows=running)[:, -1]
        for s, token in zip(running, self._sample(logits, running)):
            self._accept(s, token)

    def _sample(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        params = [self.slots[s].params for s in slots]
        constraints = [self.slots[s].constraint for s in slots]
        if all(p.temperature <= 0 and p.repetition_penalty == 1.0 for p in params) \
                and all(c is None for c in constraints):
            return greedy(logits).tolist()  # all greedy: one batched argmax
        out = []
        for i, (s, p) in enumerate(zip(slots, params)):
            row = logits[i:i + 1]
            if constraints[i] is not None:  # the grammar's mask comes first: penalties only reorder what it allows
                row = constraints[i].mask(row)
            if p.repetition_penalty != 1.0:
                req = self.slots[s]
                seen = torch.tensor(sorted(set(req.prompt_ids) | set(req.output_ids)), device=row.device)
                scores = row[0, seen]
                row = row.clone()
                row[0, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
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
