"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

    python -m inference.server --model out/sft/hf --slots 8 --port 8000 [--api_key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health. Supported request
fields: max_tokens (or max_completion_tokens), temperature, top_p, stop (a string or up to 4), seed, n=1, stream
(with stream_options.include_usage), and three extensions, top_k, repetition_penalty
and ignore_eos (vLLM's: generate max_tokens tokens whatever comes, for benchmarks). Other OpenAI fields are
accepted and ignored; the penalties other than 0 are refused. Streams are server-sent `chat.completion.chunk`
(or `text_completion`) events ending in `data: [DONE]`.

Errors use OpenAI's body ({"error": {"message", "type", "param", "code"}}): 400 for malformed JSON, bad parameters
or a prompt that does not fit the context, 401 for a missing or wrong API key (when --api_key is set), 429 when
--max_queue requests already wait for a slot. A client that disconnects frees its slot at the next engine step.
The server binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import errno
import json
import math
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from common.cli import entry_point, parser
from common.errors import UserError

from .engine import Engine, Event, QueueFull, Request, SamplingParams
from .loader import add_model_args, load, make_engine
from .templates import ChatTemplate, check_messages

MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false", key)
    return value


def parse_sampling(body: dict, prompt_len: int, context: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    """SamplingParams from an OpenAI request body; ApiError(400) naming the first bad field."""
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"{key} is not supported (use repetition_penalty)", key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1)
    room = context - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens but the model's context is {context} tokens; "
                       "shorten it", "messages" if "messages" in body else "prompt", code="context_length_exceeded")
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
    return SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_k=top_k, top_p=None if top_p >= 1.0 else max(top_p, 1e-6),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        stop=tuple(stop) + tuple(s for s in extra_stop if s not in stop),
        seed=None if seed is None else seed % 2**63, ignore_eos=_flag(body, "ignore_eos")).check()


class EventBridge:
    """Hands engine events (produced on the engine thread) to the requests' asyncio queues with one event-loop
    wake-up per batch of events rather than one per event: with 8 streams a decode step makes 8 events, and
    every call_soon_threadsafe is a write to the loop's self-pipe plus a loop iteration, Python work that
    competes with the engine thread for the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, Event]] = []
        self.lock = threading.Lock()

    def sink(self, events: asyncio.Queue) -> Callable[[Event], None]:
        """The engine-side callback that delivers into `events`."""
        def put(event: Event) -> None:
            with self.lock:
                self.pending.append((events, event))
                wake = len(self.pending) == 1  # the first event since the last drain schedules one
            if wake:
                self.loop.call_soon_threadsafe(self._drain)
        return put

    def _drain(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for events, event in batch:
            events.put_nowait(event)


def create_app(engine: Engine, template: ChatTemplate, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `engine` under the id `model_name`."""
    app = FastAPI(title="llama-pretrain inference server")
    tokenizer = engine.tokenizer
    created = int(time.time())

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.param, e.kind, e.code), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e)

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

    async def read_json(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    bridges: dict[asyncio.AbstractEventLoop, EventBridge] = {}

    def submit(ids: list[int], params: SamplingParams, anchor: list[int]) -> tuple[Request, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        bridge = bridges.get(loop) or bridges.setdefault(loop, EventBridge(loop))
        try:
            req = engine.submit(ids, params, bridge.sink(events), anchor)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        return req, events

    def usage(req: Request) -> dict[str, int]:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def respond(http: HttpRequest, body: dict, ids: list[int], params: SamplingParams, anchor: list[int],
                      chat: bool):
        streaming = _flag(body, "stream")
        req, events = submit(ids, params, anchor)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": model_name}

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if streaming:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                chunk = {**head, "object": obj + (".chunk" if chat else "")}
                try:
                    if chat:
                        yield f"data: {json.dumps({**chunk, 'choices': [choice('', None, True)]})}\n\n"
                    while True:
                        ev: Event = await events.get()
                        text, finish = ev.text, ev.finish_reason
                        while not finish and not events.empty():  # a client slower than the engine gets the
                            ev = events.get_nowait()  # tokens that piled up in one chunk
                            text, finish = text + ev.text, ev.finish_reason
                        if finish == "error":
                            raise RuntimeError("the engine failed")
                        if text or finish:
                            yield f"data: {json.dumps({**chunk, 'choices': [choice(text, finish)]})}\n\n"
                        if finish:
                            break
                    if include_usage:
                        yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage(req)})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    req.cancel()  # a no-op once finished; frees the slot when the client went away

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> None:
            while not (await events.get()).finish_reason:
                pass

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    return JSONResponse(error_body("client disconnected"), status_code=499)
        finally:
            req.cancel()
        if req.finish_reason == "error":
            raise ApiError(500, "the engine failed", kind="server_error")
        if chat:
            out = {"index": 0, "message": {"role": "assistant", "content": req.text}, "logprobs": None,
                   "finish_reason": req.finish_reason}
        else:
            out = {"index": 0, "text": req.text, "logprobs": None, "finish_reason": req.finish_reason}
        return {**head, "object": obj, "choices": [out], "usage": usage(req)}

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
        try:
            messages = check_messages(body.get("messages"))
            ids = template.encode(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        params = parse_sampling(body, len(ids), engine.max_len, template.stop)
        return await respond(http, body, ids, params, [], chat=True)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(http: HttpRequest):
        body = await read_json(http)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", "prompt")
        if body.get("echo") or body.get("logprobs") or (body.get("best_of") or 1) != 1 or body.get("suffix"):
            raise ApiError(400, "echo, logprobs, best_of and suffix are not supported")
        ids = tokenizer.encode(prompt, bos=tokenizer.bos_id >= 0)
        params = parse_sampling(body, len(ids), engine.max_len)
        return await respond(http, body, ids, params, ids[-1:], chat=False)

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
    p.add_argument("--served_model_name", default=None, help="the model id in the API (default: folder name)")
    args = p.parse_args(argv)
    import uvicorn

    # The port is taken now, before the model loads (tens of seconds), and handed to uvicorn: a port in use is
    # reported at once and naming --port, and no other process can take it in between.
    listener = bind_port(args.host, args.port)
    loaded = load(args)
    engine = make_engine(loaded, args.slots, args.max_len, args.max_queue)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, loaded.template, name, args.api_key)
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
