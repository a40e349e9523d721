"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

    python -m inference.server --model out/sft/hf --slots 8 --port 8000 [--api_key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health. Supported request
fields: max_tokens (or max_completion_tokens), temperature, top_p, stop (a string or up to 4), seed, stream
(with stream_options.include_usage), and three extensions, top_k, repetition_penalty and ignore_eos (vLLM's:
generate max_tokens tokens whatever comes, for benchmarks). Completions also take prompts as a string, a list of
token ids or a list of either (one choice per prompt), n (choices per prompt; with a seed, choice j uses seed + j),
best_of (candidates per prompt, of which the n with the highest log-probability per token are returned), echo,
logprobs (0-20: OpenAI's legacy logprobs object, scored by a forward pass of the model, inference/scoring.py) and
max_tokens 0 (with echo and logprobs: scoring the prompt, lm-evaluation-harness's loglikelihood requests); chat
takes logprobs and top_logprobs (0-20). Fields the server cannot honour are refused with 400 naming them, never
ignored: chat n > 1, the legacy functions/function_call (tools and tool_choice are served: inference/tools.py),
a response_format type other than text, json_object and json_schema (enforced by constrained decoding,
inference/constrained.py), penalties other than 0, a
non-empty logit_bias, logprobs or best_of > n with stream. Fields that do not change the reply (user, metadata,
...) are accepted and ignored. Streams are server-sent `chat.completion.chunk` (or `text_completion`)
events ending in `data: [DONE]`.

Errors use OpenAI's body ({"error": {"message", "type", "param", "code"}}): 400 for malformed JSON, text that is not
valid Unicode (a lone UTF-16 surrogate), bad parameters or a prompt that does not fit the context, 401 for a missing
or wrong API key (when --api_key is set), 404 for a `model` other than the served one, 413 for a body over
--max_body_bytes (refused from its Content-Length, or as soon as that many bytes have come), 429 when --max_queue
requests already wait for a slot. JSON parsing, template rendering, tokenization and scoring run in worker threads,
so a large request does not stall the streams being served. A client that disconnects frees its slot at the next
engine step; one that disconnects while sending its body is logged in one line. The server binds 127.0.0.1 unless
told otherwise.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import secrets
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from common.cli import entry_point, parser
from common.errors import UserError
from tokenizer import Tokenizer

from .constrained import Constraint, ConstraintError
from .engine import PREFILL_CHUNK, Engine, Event, QueueFull, Request, SamplingParams
from .tools import ToolError, ToolRequest, check_tools, forced_call_grammar, held_back, parse_tool_calls
from .loader import add_model_args, load, make_engine
from .scoring import (MAX_TOP_LOGPROBS, TokenScores, chat_logprobs_object, logprobs_object, score,
                      token_offsets)
from .templates import ChatTemplate, check_messages

MAX_STOP = 4
INLINE_BYTES = 64 << 10  # bodies up to this size are parsed and tokenized on the event loop (see off_loop)
MAX_BODY_BYTES = 4 << 20  # --max_body_bytes default: ~600k token ids as JSON, or 4 MB of prompt text
log = logging.getLogger("inference.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


class ClientGone(Exception):
    """The client disconnected before its request was read: there is nobody to answer."""


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over --max_body_bytes={limit} bytes; send a smaller request (or "
                    "start the server with a larger --max_body_bytes)", code="request_too_large")


class BodyLimit:
    """ASGI middleware: a request whose Content-Length is over `limit` bytes gets 413 before its body is read;
    one without (chunked) fails with 413 as soon as `limit` bytes have come, the rest unread."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            e = body_too_large(self.limit) if length.isdigit() else ApiError(400, "bad Content-Length header")
            payload = json.dumps(error_body(e.message, e.param, e.kind, e.code)).encode()
            # Connection: close, as the unread body would otherwise be taken for the next request.
            await send({"type": "http.response.start", "status": e.status,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)  # answered by the app's ApiError handler
            return message

        return await self.app(scope, counting_receive, send)


def _bad_unicode(value: Any, path: str) -> str | None:
    """The path of the first string in `value` that is not valid Unicode (JSON lets a lone UTF-16 surrogate such
    as \\ud800 through; no tokenizer can take it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = _bad_unicode(k, path) or _bad_unicode(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = _bad_unicode(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; ApiError(400) for bad JSON or text that is not valid Unicode, naming the field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    bad = _bad_unicode(body, "")
    if bad:
        raise ApiError(400, f"{bad} is not valid Unicode (it holds a lone UTF-16 surrogate such as \\ud800); send "
                       "well-formed text", bad)
    return body


def _number(body: dict, key: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be between {lo} and {hi}, got {value}", key)
    return float(value)


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{key} must be an integer", key)
    if value < lo or (hi is not None and value > hi):
        raise ApiError(400, f"{key} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value


def parse_sampling(body: dict, prompt_len: int, context: int, extra_stop: tuple[str, ...] = (),
                   allow_zero: bool = False, param: str = "prompt") -> SamplingParams | None:
    """SamplingParams from an OpenAI request body; ApiError(400) naming the first bad field. None when max_tokens
    is 0 (allowed with allow_zero: completions that only echo or score the prompt)."""
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 0 if allow_zero else 1)
    room = context - prompt_len
    if room < (0 if max_tokens == 0 else 1):
        raise ApiError(400, f"the prompt is {prompt_len} tokens but the model's context is {context} tokens; "
                       "shorten it", param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"this model's context is {context} tokens: the prompt's {prompt_len} tokens leave "
                       f"room for at most {room} new tokens, {key}={max_tokens} asked for", key,
                       code="context_length_exceeded")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    seed = _int(body, "seed", -2**63, 2**63 - 1)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 1)
    params = SamplingParams(
        max_tokens=max_tokens or None, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=top_k, top_p=None if top_p >= 1.0 else max(top_p, 1e-6),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=tuple(stop) + tuple(s for s in extra_stop if s not in stop),
        seed=None if seed is None else seed % 2**63, ignore_eos=_flag(body, "ignore_eos")).check()
    return None if max_tokens == 0 else params


def refuse_unsupported_chat_fields(body: dict) -> None:
    """400 naming a chat field this server cannot honour, rather than ignoring it: the legacy `functions` and
    `function_call` (OpenAI's predecessors of tools and tool_choice)."""
    for key in ("functions", "function_call"):
        if body.get(key) not in (None, [], "none"):
            raise ApiError(400, f"{key} is not supported (the legacy form): send tools and tool_choice", key)


def response_format_schema(body: dict) -> tuple[bool, Any]:
    """(whether the reply is constrained, the JSON schema: None for any JSON object) of a chat request's
    response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}. The schema is enforced whether strict is true or not (a reply that does not validate
    is never useful)."""
    fmt = body.get("response_format")
    if fmt is None:
        return False, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise ApiError(400, "response_format.json_schema must be an object with a name and a schema",
                           "response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           "response_format")
        return True, schema
    raise ApiError(400, "response_format.type must be one of text, json_object, json_schema", "response_format")


CHARS_PER_TOKEN_BOUND = 8  # see clearly_too_long


def clearly_too_long(text: str, context: int, tokenizer: Tokenizer) -> int | None:
    """The token count of a prefix of `text` when that prefix alone is over `context` tokens (then the whole text
    cannot fit, and is not tokenized: a 10 MB prompt costs seconds of CPU that the running streams need), else
    None. The prefix is context x CHARS_PER_TOKEN_BOUND characters; a text whose first that many characters make
    fewer tokens (long runs of spaces, say) is tokenized in full as before. The margin covers tokens merged across
    the cut."""
    cut = context * CHARS_PER_TOKEN_BOUND + 1024
    if len(text) <= cut:
        return None
    n = len(tokenizer.encode(text[:cut]))
    return n if n > context + 8 else None


def too_long_error(what: str, n: int, context: int, param: str) -> ApiError:
    return ApiError(400, f"{what} is over {n} tokens (counting only its first part) but the model's context is "
                    f"{context} tokens; shorten it", param, code="context_length_exceeded")


def parse_prompts(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """The completions API's prompt: a string, a list of token ids, or a list of either (a batch)."""
    def one(p: Any) -> str | list[int] | None:
        if isinstance(p, str):
            return p or None
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < vocab_size for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
            return p
        return None

    single = one(prompt)
    if single is not None:
        return [single]
    if isinstance(prompt, list) and prompt:
        batch = [one(p) for p in prompt]
        if all(p is not None for p in batch):
            return batch
    raise ApiError(400, "prompt must be a non-empty string, a non-empty list of token ids, or a non-empty list of "
                   "either", "prompt")


class EventBridge:
    """Hands engine events (produced on the engine thread) to the requests' asyncio queues with one event-loop
    wake-up per batch of events rather than one per event: with 8 streams a decode step makes 8 events, and
    every call_soon_threadsafe is a write to the loop's self-pipe plus a loop iteration, Python work that
    competes with the engine thread for the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self.lock = threading.Lock()

    def sink(self, events: asyncio.Queue, index: int = 0) -> Callable[[Event], None]:
        """The engine-side callback that delivers (index, event) into `events` (index: the choice's)."""
        def put(event: Event) -> None:
            with self.lock:
                self.pending.append((events, (index, event)))
                wake = len(self.pending) == 1  # the first event since the last drain schedules one
            if wake:
                self.loop.call_soon_threadsafe(self._drain)
        return put

    def _drain(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for events, item in batch:
            events.put_nowait(item)


@dataclass
class Job:
    """One choice: the prompt it continues and how (params None: max_tokens 0, nothing to generate)."""

    index: int
    ids: list[int]
    params: SamplingParams | None
    anchor: list[int]
    req: Request | None = None
    constraint: Any = None
    """The reply's grammar (inference/constrained.py Constraint), or None."""


def create_app(engine: Engine, template: ChatTemplate, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application serving `engine` under the id `model_name`; bodies over max_body_bytes get 413."""
    app = FastAPI(title="llama-pretrain inference server")
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    tokenizer = engine.tokenizer
    created = int(time.time())
    scoring = anyio.CapacityLimiter(1)  # one scoring pass at a time: each takes all cores, and memory

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.param, e.kind, e.code), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def _client_gone(_, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; uvicorn drops it

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind=kind), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error"),
                            status_code=500)

    def check_key(request: HttpRequest) -> None:
        if api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                               kind="authentication_error", code="invalid_api_key")

    authorized = [Depends(check_key)]

    async def off_loop(http: HttpRequest, fn: Callable, *args: Any) -> Any:
        """fn(*args) in a worker thread when the request's body is large (parsing, rendering and tokenizing it take
        milliseconds to seconds, during which the event loop could not serve the running streams), else here (a
        thread hop costs more than a small request's work)."""
        if getattr(http.state, "large", True):
            return await anyio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def read_json(request: HttpRequest) -> dict:
        try:
            raw = await request.body()
        except ClientDisconnect:
            log.warning("client %s disconnected while sending its request to %s; nothing to answer",
                        f"{request.client.host}:{request.client.port}" if request.client else "?", request.url.path)
            raise ClientGone() from None
        request.state.large = len(raw) > INLINE_BYTES
        body = await off_loop(request, parse_body, raw)  # 1 MB of JSON: ~10 ms
        model = body.get("model")
        if model is not None and model != model_name:
            # vLLM's answer to an unknown model: 404 "The model `x` does not exist."
            shown = model if isinstance(model, str) and len(model) <= 200 else type(model).__name__
            raise ApiError(404, f"The model `{shown}` does not exist; this server serves `{model_name}`", "model",
                           code="model_not_found")
        return body

    bridges: dict[asyncio.AbstractEventLoop, EventBridge] = {}

    def submit(jobs: list[Job]) -> asyncio.Queue:
        """Submit every job that generates; all or none (a full queue cancels those already in)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        bridge = bridges.get(loop) or bridges.setdefault(loop, EventBridge(loop))
        try:
            for job in jobs:
                if job.params is not None:
                    job.req = engine.submit(job.ids, job.params, bridge.sink(events, job.index), job.anchor,
                                            job.constraint)
        except (QueueFull, ValueError, RuntimeError) as e:
            for job in jobs:
                if job.req is not None:
                    job.req.cancel()
            if isinstance(e, QueueFull):
                raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None
            if isinstance(e, ValueError):
                raise ApiError(400, str(e)) from None
            raise ApiError(503, str(e), kind="server_error") from None
        return events

    def usage(jobs: list[Job]) -> dict:
        prompts = {id(job.ids): len(job.ids) for job in jobs}  # n choices of one prompt count it once
        p, c = sum(prompts.values()), sum(len(job.req.output_ids) for job in jobs if job.req is not None)
        cached: dict[int, int] = {}  # prompt tokens the engine's prefix cache gave (OpenAI's cached_tokens)
        for job in jobs:
            if job.req is not None:
                cached[id(job.ids)] = max(cached.get(id(job.ids), 0), job.req.cached_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    def finish_reason(job: Job) -> str:
        return job.req.finish_reason if job.req is not None else "length"

    def reply_tokens(job: Job, chat: bool) -> tuple[list[int], list[int]]:
        """The reply's token ids as far as its text goes, and where each one's text starts in it: tokens after a
        stop string's cut are not in the reply, nor (chat, as OpenAI shows it) the end-of-turn token."""
        text = job.req.text if job.req is not None else ""
        out = list(job.req.output_ids) if job.req is not None else []
        offsets, decoded = token_offsets(tokenizer, out, job.anchor)
        if chat or len(decoded) > len(text):
            keep = sum(o < len(text) for o in offsets)  # offsets only grow: the kept ones are a prefix
            out, offsets = out[:keep], offsets[:keep]
        return out, offsets

    def choice_logprobs(job: Job, echo: bool, n_logprobs: int) -> tuple[str, dict]:
        """(the choice's text with the echoed prompt, its legacy logprobs object); runs in a worker thread."""
        out, offsets = reply_tokens(job, chat=False)
        prefix, ids, shown = "", out, offsets
        if echo:
            prompt_offsets, prefix = token_offsets(tokenizer, job.ids)
            ids, shown = job.ids + out, prompt_offsets + [len(prefix) + o for o in offsets]
        scores = score(engine.model, job.ids + out, n_logprobs, start=1 if echo else len(job.ids))
        if not echo:  # only the reply's positions
            scores = TokenScores(scores.logprobs[len(job.ids):], scores.top[len(job.ids):])
        return prefix + (job.req.text if job.req is not None else ""), logprobs_object(
            tokenizer, ids, scores, shown, n_logprobs)

    def chat_choice_logprobs(job: Job, n_logprobs: int) -> dict:
        """The chat `logprobs` object of the reply; runs in a worker thread."""
        out, _ = reply_tokens(job, chat=True)
        scores = score(engine.model, job.ids + out, n_logprobs, start=len(job.ids))
        tail = TokenScores(scores.logprobs[len(job.ids):], scores.top[len(job.ids):])
        return chat_logprobs_object(tokenizer, out, tail, n_logprobs)

    async def wait_all(http: HttpRequest, jobs: list[Job], events: asyncio.Queue) -> JSONResponse | None:
        """Wait until every submitted job has finished; a 499 response when the client went away first."""
        async def collect() -> None:
            left = sum(job.req is not None for job in jobs)
            while left:
                if (await events.get())[1].finish_reason:
                    left -= 1

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    return JSONResponse(error_body("client disconnected"), status_code=499)
        finally:
            for job in jobs:
                if job.req is not None:
                    job.req.cancel()
        if any(job.req is not None and job.req.finish_reason == "error" for job in jobs):
            raise ApiError(500, "the engine failed", kind="server_error")
        return None

    def best_candidates(jobs: list[Job], keep: int) -> list[Job]:
        """best_of: of each prompt's candidates (consecutive jobs), the `keep` with the highest log-probability per
        token of their reply (OpenAI's definition), best first, renumbered prompt x keep + k; a worker-thread job."""
        def per_token(job: Job) -> float:
            out, _ = reply_tokens(job, chat=False)
            if not out:
                return -math.inf
            logprobs = score(engine.model, job.ids + out, start=len(job.ids)).logprobs[len(job.ids):]
            return sum(logprobs) / len(logprobs)

        groups: dict[int, list[Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.ids), []).append(job)
        chosen = []
        for g, group in enumerate(groups.values()):
            ranked = sorted(group, key=per_token, reverse=True) if group[0].req is not None else group
            chosen += [replace(job, index=g * keep + k) for k, job in enumerate(ranked[:keep])]
        return chosen

    def chat_message(job: Job, tools: ToolRequest | None) -> tuple[dict, str]:
        """(the chat choice's message, its finish_reason): with tools, <tool_call> blocks become tool_calls and
        finish_reason is "tool_calls"."""
        text = job.req.text
        if tools is not None:
            content, calls = parse_tool_calls(text, tools.tools)
            if calls:
                return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, finish_reason(job)

    async def respond(http: HttpRequest, body: dict, jobs: list[Job], chat: bool, echo: bool = False,
                      n_logprobs: int | None = None, keep: int | None = None, tools: ToolRequest | None = None):
        """n_logprobs: None for no log-probabilities, else how many of the most likely tokens to list. keep: return
        only the best `keep` candidates of each prompt (best_of > n; not streamed). tools: parse the chat reply
        for tool calls (streamed: the text from a <tool_call> on is held back and sent as tool_calls deltas)."""
        streaming = _flag(body, "stream")
        if streaming and n_logprobs is not None:
            raise ApiError(400, "logprobs cannot be streamed yet; send stream: false", "logprobs")
        prompt_texts = {}
        if streaming and echo:  # before submitting: nothing may be left running if this is interrupted
            prompt_texts = await off_loop(
                http, lambda: {job.index: token_offsets(tokenizer, job.ids)[1] for job in jobs})
        events = submit(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": model_name}

        def choice(index: int, text: str, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        if streaming:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                chunk = {**head, "object": obj + (".chunk" if chat else "")}

                def data(choices: list[dict], **extra) -> str:
                    return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

                try:
                    if chat:
                        yield data([choice(0, "", None, True)])
                    for job in jobs:
                        if echo or job.req is None:  # the echoed prompt first; max_tokens 0 ends here
                            yield data([choice(job.index, prompt_texts.get(job.index, ""),
                                               None if job.req is not None else "length")])
                    left = sum(job.req is not None for job in jobs)
                    full, shown = "", 0  # tools (chat, one choice): the reply so far, and how much of it was sent
                    while left:
                        index, ev = await events.get()
                        pieces: dict[int, list] = {index: [ev.text, ev.finish_reason]}
                        while not events.empty():  # a client slower than the engine gets the tokens that
                            index, ev = events.get_nowait()  # piled up in one chunk per choice
                            piece = pieces.setdefault(index, ["", None])
                            piece[0], piece[1] = piece[0] + ev.text, ev.finish_reason
                        for index, (text, finish) in pieces.items():
                            if finish == "error":
                                raise RuntimeError("the engine failed")
                            if tools is not None:  # a possible <tool_call> waits for the end of the reply
                                full += text
                                if not finish:
                                    ready = max(shown, held_back(full))
                                    text, shown = full[shown:ready], ready
                                else:  # what is left: as the plain reply has it (chat_message)
                                    content, calls = parse_tool_calls(full, tools.tools)
                                    text = full[shown:]
                                    if calls:
                                        if (content or "")[shown:]:
                                            yield data([choice(index, content[shown:], None)])
                                        deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                                        yield data([{"index": index, "delta": {"tool_calls": deltas},
                                                     "logprobs": None, "finish_reason": None}])
                                        text, finish = "", "tool_calls"
                            if text or finish:
                                yield data([choice(index, text, finish)])
                            if finish:
                                left -= 1
                    if include_usage:
                        yield data([], usage=usage(jobs))
                    yield "data: [DONE]\n\n"
                finally:
                    for job in jobs:  # a no-op once finished; frees the slots when the client went away
                        if job.req is not None:
                            job.req.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        gone = await wait_all(http, jobs, events)
        if gone is not None:
            return gone
        billed = jobs  # usage counts every candidate generated
        if keep is not None:
            async with scoring:
                jobs = await anyio.to_thread.run_sync(best_candidates, jobs, keep)
        choices = []
        if chat and n_logprobs is not None:
            async with scoring:
                logprobs = await anyio.to_thread.run_sync(chat_choice_logprobs, jobs[0], n_logprobs)
            message, finish = chat_message(jobs[0], tools)
            choices.append({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
        elif n_logprobs is not None:
            async with scoring:
                scored = await anyio.to_thread.run_sync(
                    lambda: [choice_logprobs(job, echo, n_logprobs) for job in jobs])
            for job, (text, logprobs) in zip(jobs, scored):
                choices.append({"index": job.index, "text": text, "logprobs": logprobs,
                                "finish_reason": finish_reason(job)})
        elif echo:
            prefixes = await off_loop(
                http, lambda: [token_offsets(tokenizer, job.ids)[1] for job in jobs])
            for job, prefix in zip(jobs, prefixes):
                text = prefix + (job.req.text if job.req is not None else "")
                choices.append({"index": job.index, "text": text, "logprobs": None,
                                "finish_reason": finish_reason(job)})
        else:
            for job in jobs:
                if chat:
                    message, finish = chat_message(job, tools)
                    choices.append({"index": job.index, "message": message, "logprobs": None,
                                    "finish_reason": finish})
                else:
                    choices.append({"index": job.index, "text": job.req.text if job.req is not None else "",
                                    "logprobs": None, "finish_reason": finish_reason(job)})
        return {**head, "object": obj, "choices": choices, "usage": usage(billed)}

    @app.get("/health")
    async def health():
        return {"status": "ok" if engine.error is None else "failed", "free_slots": engine.free_slots(),
                "waiting": len(engine.waiting)}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama-pretrain"}]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(http: HttpRequest):
        body = await read_json(http)
        if _int(body, "n", 1) not in (None, 1):
            raise ApiError(400, "only n=1 is supported for chat completions", "n")
        refuse_unsupported_chat_fields(body)

        try:
            tools = check_tools(body)
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None

        def render() -> list[int]:  # jinja and the tokenizer: worker-thread work
            try:
                messages = check_messages(body.get("messages"))
                for i, m in enumerate(messages):
                    n = clearly_too_long(m["content"], engine.max_len, tokenizer)
                    if n is not None:
                        raise too_long_error(f"messages[{i}].content", n, engine.max_len, "messages")
                return template.encode(messages, add_generation_prompt=True,
                                       tools=tools.tools if tools is not None else None)
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from None

        ids = await off_loop(http, render)
        constrained, schema = response_format_schema(body)
        if constrained and tools is not None and tools.forced:
            raise ApiError(400, "response_format cannot be combined with a tool_choice that forces a call",
                           "response_format")
        constraint = None
        if constrained or (tools is not None and tools.forced):
            def build():  # the grammar: compiled in a worker thread (ms, more for a large schema)
                vocab = engine.model.config.vocab_size
                try:
                    if constrained:
                        return Constraint.json_schema(tokenizer, vocab, schema)
                    return Constraint(tokenizer, vocab, forced_call_grammar(tools))
                except ToolError as e:
                    raise ApiError(400, str(e), e.param) from None
                except ConstraintError as e:
                    param = "response_format" if constrained else "tools"
                    raise ApiError(400, f"{param}: {e}", param) from None
            constraint = await anyio.to_thread.run_sync(build)
        params = parse_sampling(body, len(ids), engine.max_len, template.stop, param="messages")
        n_logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if n_logprobs and not _flag(body, "logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        n_logprobs = (n_logprobs or 0) if _flag(body, "logprobs") else None
        return await respond(http, body, [Job(0, ids, params, [], constraint=constraint)], chat=True,
                             n_logprobs=n_logprobs, tools=tools if tools is not None and tools.parsed else None)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(http: HttpRequest):
        body = await read_json(http)
        # (a 1 MB list of token ids is ~150k items to check: worker-thread work)
        prompts = await off_loop(http, parse_prompts, body.get("prompt"), engine.model.config.vocab_size)
        n = _int(body, "n", 1) or 1
        best_of = _int(body, "best_of", 1) or n
        if best_of < n:
            raise ApiError(400, f"best_of must be at least n ({n}), got {best_of}", "best_of")
        if best_of > n and _flag(body, "stream"):
            raise ApiError(400, "best_of > n cannot be streamed (the best are known at the end)", "best_of")
        if body.get("suffix"):
            raise ApiError(400, "suffix is not supported (no fill-in-the-middle)", "suffix")
        if best_of * len(prompts) > len(engine.slots) + engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x {best_of} candidates is more than this server's "
                           f"{len(engine.slots)} slots and {engine.max_queue} queue places hold",
                           "best_of" if best_of > n else "n")
        echo = _flag(body, "echo")
        n_logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        bos = tokenizer.bos_id >= 0

        def encode(i: int, p: str | list[int]) -> list[int]:
            # Token-id prompts are used as given (no BOS added), strings are encoded with BOS, as vLLM does.
            if isinstance(p, list):
                return p
            n = clearly_too_long(p, engine.max_len, tokenizer)
            if n is not None:
                raise too_long_error("the prompt" if len(prompts) == 1 else f"prompt[{i}]", n, engine.max_len,
                                     "prompt")
            return tokenizer.encode(p, bos=bos)

        encoded = await off_loop(http, lambda: [encode(i, p) for i, p in enumerate(prompts)])
        jobs = []
        seed = _int(body, "seed", -2**63, 2**63 - 1)
        for i, ids in enumerate(encoded):
            for j in range(best_of):
                # Candidate j of a seeded request uses seed + j: equal seeds would give equal samples.
                params = parse_sampling({**body, "seed": None if seed is None else (seed + j) % 2**63}, len(ids),
                                        engine.max_len, allow_zero=True)
                jobs.append(Job(i * best_of + j, ids, params, ids[-1:]))
        return await respond(http, body, jobs, chat=False, echo=echo, n_logprobs=n_logprobs,
                             keep=n if best_of > n else None)

    return app


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m inference.server", __doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (checked before the model loads)")
    p.add_argument("--api_key", default=None, help="require `Authorization: Bearer KEY` on /v1 requests")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--prefill_chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per engine step, between decode steps (chunked prefill; 0: whole "
                        "prompts at once)")
    p.add_argument("--no_prefix_caching", action="store_true",
                   help="do not reuse the cached keys/values of a prompt prefix shared with an earlier request")
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES,
                   help="larger request bodies get 413 before they are read (0: no limit)")
    p.add_argument("--served_model_name", default=None, help="the model id in the API (default: folder name)")
    args = p.parse_args(argv)
    if args.max_body_bytes < 0:
        raise UserError(f"--max_body_bytes must be >= 0 (0: no limit), got {args.max_body_bytes}")
    if args.prefill_chunk < 0:
        raise UserError(f"--prefill_chunk must be >= 0 (0: whole prompts at once), got {args.prefill_chunk}")
    import uvicorn

    # The port is taken now, before the model loads (tens of seconds), and handed to uvicorn: a port in use is
    # reported at once and naming --port, and no other process can take it in between.
    listener = bind_port(args.host, args.port)
    loaded = load(args)
    engine = make_engine(loaded, args.slots, args.max_len, args.max_queue, args.prefill_chunk or None,
                         not args.no_prefix_caching)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, loaded.template, name, args.api_key, args.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    # (uvicorn announces the address only for sockets it binds itself.)
    print(f"serving {name} on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    try:
        server.run(sockets=[listener])
    finally:
        engine.stop()
        listener.close()


def bind_port(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A TCP socket bound to (host, port) and listening; a port in use or a bad address is one error naming the
    flag. SO_REUSEADDR as uvicorn sets it, so a port a stopped server left in TIME_WAIT is usable at once."""
    if not 0 < port < 65536:
        raise UserError(f"{flag} must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except socket.gaierror:
        sock.close()
        raise UserError(f"--host {host}: unknown host or address") from None
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); pass a free one with {flag} PORT") \
                from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; pass one of its own (127.0.0.1, "
                            "0.0.0.0 for every interface)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"{flag} {port}: ports below 1024 need root; pass one from 1024 up") from None
        raise
    return sock


if __name__ == "__main__":
    main()
