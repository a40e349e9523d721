"""The completions API's prompt forms, n, echo and logprobs, the chat fields refused rather than ignored, and a
server that bad input cannot break (invalid Unicode, oversized bodies, disconnects during the body, unknown
models), against a real uvicorn server."""
import json
import logging
import socket
import time

import httpx
import pytest
import torch

from fixtures_time import limit
from fixtures_inference import ServerThread, make_model_folder, wait_until
from inference.engine import Engine
from inference.server import create_app
from inference.templates import load_chat_template

openai = pytest.importorskip("openai")

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("server_api"))


@pytest.fixture(scope="module")
def server(folder):
    _, chat_dir, model, tok = folder
    engine = Engine(model, tok, slots=4, max_queue=16).start()
    app = create_app(engine, load_chat_template(chat_dir, tok), "tiny", max_body_bytes=BODY_LIMIT)
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=limit(60))


def reference_logprobs(model, ids):
    """log P(ids[i] | ids[:i]) for i >= 1 and the log-softmax rows, from one plain forward of the model."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))], logp


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=limit(60), **kwargs)


def test_echo_logprobs_score_the_prompt(client, folder):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs, max_tokens 0 or 1."""
    _, _, model, tok = folder
    ids = tok.encode("the city of Order 12", bos=True)
    expected, logp = reference_logprobs(model, ids)
    r = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(lp.tokens) == len(ids) and r.choices[0].text == tok.decode(ids)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        best = logp[i - 1].topk(3).values.tolist()
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best, abs=1e-4)
    # text_offset: where each token's text starts in the echoed text.
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(r.choices[0].text)
    assert r.choices[0].text[lp.text_offset[-1]:] == tok.decode(ids)[len(tok.decode(ids[:-1])):]
    # max_tokens 1: one more token, greedy, whose logprob is the best one of the last position.
    r = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    last = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1).max().item()
    assert lp.token_logprobs[-1] == pytest.approx(last, abs=1e-4) == max(lp.top_logprobs[-1].values())


def test_logprobs_of_a_reply_are_teacher_forced_scores(client, folder):
    _, _, model, tok = folder
    r = client.completions.create(model="tiny", prompt="Order 12", max_tokens=8, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    ids = tok.encode("Order 12", bos=True)
    out = model.generate(torch.tensor([ids]), 8)[0, len(ids):].tolist()
    expected, _ = reference_logprobs(model, ids + out)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and lp.token_logprobs == pytest.approx(expected[len(ids) - 1:], abs=1e-4)
    text = r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Each token's name is its text where it starts (a byte of a longer character is named "bytes:\xNN"; the
    # random model's stray bytes decode to U+FFFD, which comes with the token after them).
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:\\x") or text[offset:].lstrip("\ufffd").startswith(token), (token, text)


def test_token_and_batched_prompts_and_n(client, folder):
    tok = folder[3]
    texts = ["Order 12", "the city of", "床前明月"]
    single = [client.completions.create(model="tiny", prompt=t, max_tokens=6, temperature=0).choices[0].text
              for t in texts]
    batched = client.completions.create(model="tiny", prompt=texts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in batched.choices] == list(range(6))
    assert [c.text for c in batched.choices] == [t for t in single for _ in range(2)]  # greedy: n equal
    ids = [tok.encode(t, bos=True) for t in texts]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == single
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    # n samples with one seed differ from each other, and the request is reproducible.
    kwargs = dict(model="tiny", prompt="the city of", max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = (client.completions.create(**kwargs) for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len({c.text for c in a.choices}) > 1
    top_seed = client.completions.create(**{**kwargs, "seed": 2**63 - 1, "n": 2})  # seed + j wraps around
    assert len(top_seed.choices) == 2
    # Streaming several choices: each index's chunks join into that choice's text.
    joined = {}
    for chunk in client.completions.create(model="tiny", prompt=texts[:2], max_tokens=6, temperature=0, n=2,
                                           stream=True):
        for c in chunk.choices:
            joined[c.index] = joined.get(c.index, "") + c.text
    assert [joined[i] for i in range(4)] == [single[0], single[0], single[1], single[1]]
    # echo without logprobs, and max_tokens 0 alone.
    r = client.completions.create(model="tiny", prompt="Order 12", max_tokens=0, echo=True)
    assert r.choices[0].text == "Order 12" and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="tiny", prompt="Order 12", max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text == "Order 12" + client.completions.create(
        model="tiny", prompt="Order 12", max_tokens=3, temperature=0).choices[0].text


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"], "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []], "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 1, "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 1000}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "a\ud800b"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\udfffb"]}, 400, "prompt[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": True},
     400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                                  "type": "nonsense"}}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                                                  "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": [1]}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "a lot"}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 100}}, 400,
     "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 2, "seed": 2**63 - 1, "max_tokens": 2, "logit_bias": {"5": 1}}, 400,
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
])
def test_bad_input_gets_an_error_naming_the_field_and_the_connection_lives(server, path, body, status, param):
    with httpx.Client(base_url=server.url, timeout=limit(60)) as http:  # one keep-alive connection
        # ensure_ascii keeps the lone surrogate as a \ud800 escape, as a JSON client sends it.
        r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
        ok = http.post("/v1/completions", json={"prompt": "Order 12", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    if status == 404:
        assert error["code"] == "model_not_found" and f"`{body['model']}` does not exist" in error["message"]


def test_chat_fields_that_are_still_fine(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       logprobs=False, tool_choice="none", response_format={"type": "text"},
                                       presence_penalty=0, frequency_penalty=0)
    assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=3)


def test_oversized_bodies_get_413_before_they_are_read(server):
    big = json.dumps({"prompt": "x " * BODY_LIMIT, "max_tokens": 1}).encode()
    with httpx.Client(base_url=server.url, timeout=limit(60)) as http:
        r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "--max_body_bytes=65536" in r.json()["error"]["message"]

        # Without a Content-Length (chunked), the server stops at the limit and answers 413.
        sent = []

        def chunks():
            for i in range(0, len(big), 8192):
                sent.append(i)
                yield big[i:i + 8192]

        r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A Content-Length over the limit is refused before a byte of the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=limit(30)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n")
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413") and "request_too_large" in reply
    assert httpx.get(server.url + "/health", timeout=limit(30)).json()["status"] == "ok"


def test_disconnect_during_the_body_read_logs_one_line(server, caplog):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    # uvicorn's own loggers do not propagate to the root logger that caplog watches.
    keep = Keep(level=logging.DEBUG)
    for name in ("uvicorn.error", "inference.server"):
        logging.getLogger(name).addHandler(keep)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=limit(30)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": \"abc")
            time.sleep(0.3)
        assert wait_until(lambda: any("disconnected while sending" in r.getMessage() for r in records))
        time.sleep(0.3)
    finally:
        for name in ("uvicorn.error", "inference.server"):
            logging.getLogger(name).removeHandler(keep)
    mine = [r for r in records if r.name == "inference.server"]
    assert len(mine) == 1 and mine[0].exc_info is None and "\n" not in mine[0].getMessage()
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    assert httpx.get(server.url + "/health", timeout=limit(30)).json()["status"] == "ok"


def test_a_huge_prompt_is_refused_without_tokenizing_all_of_it(folder, monkeypatch):
    """A prompt whose first context x 8 characters are already over the context gets 400 from that prefix alone."""
    _, chat_dir, model, tok = folder
    engine = Engine(model, tok, slots=1, max_len=64).start()
    calls = []
    encode = tok.encode

    def counting(text, *args, **kwargs):
        calls.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tok, "encode", counting)
    text = "Order 12 the city of " * 20000  # 420,000 characters
    try:
        with ServerThread(create_app(engine, load_chat_template(chat_dir, tok), "tiny")) as srv:
            for path, body in [("/v1/completions", {"prompt": text}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})]:
                calls.clear()
                r = post(srv, path, body)
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
                assert "context is 64 tokens" in r.json()["error"]["message"]
                assert calls and max(calls) <= 64 * 8 + 1024
            # A prompt that fits is tokenized as before.
            assert post(srv, "/v1/completions", {"prompt": "Order 12", "max_tokens": 2}).status_code == 200
    finally:
        engine.stop()


def test_scoring_in_chunks_equals_one_pass_and_leaves_the_engine_cache_alone(server, client, folder):
    from inference.scoring import score

    _, _, model, tok = folder
    ids = tok.encode("the city of Order 12 床前明月 def f(x):", bos=True)
    whole = score(model, ids, top_k=3)
    chunked = score(model, ids, top_k=3, chunk=4)  # through a KV cache of its own, 4 positions at a time
    assert whole.logprobs[0] is None and chunked.logprobs[0] is None
    assert chunked.logprobs[1:] == pytest.approx(whole.logprobs[1:], abs=1e-5)
    assert [[t for t, _ in top] for top in chunked.top[1:]] == [[t for t, _ in top] for top in whole.top[1:]]
    late = score(model, ids, start=len(ids) - 2, chunk=4)
    assert late.logprobs[:-2] == [None] * (len(ids) - 2) and late.logprobs[-2:] == pytest.approx(whole.logprobs[-2:])
    # Scoring a prompt (max_tokens 0) runs no engine request and writes nothing into its KV-cache slots.
    k, v = server.engine.cache.k.clone(), server.engine.cache.v.clone()
    client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    assert torch.equal(server.engine.cache.k, k) and torch.equal(server.engine.cache.v, v)


def test_streamed_echo_and_max_tokens_0(client):
    reply = client.completions.create(model="tiny", prompt="Order 12", max_tokens=4, temperature=0).choices[0].text
    for max_tokens, expected in ((4, "Order 12" + reply), (0, "Order 12")):
        chunks = list(client.completions.create(model="tiny", prompt="Order 12", max_tokens=max_tokens,
                                                temperature=0, echo=True, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length" or max_tokens


def test_chat_logprobs_score_the_reply(client, folder):
    _, chat_dir, model, tok = folder
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=3)
    ids = load_chat_template(chat_dir, tok).encode(messages)
    out = model.generate(torch.tensor([ids]), 10, eos_id=tok.eos_id)[0, len(ids):].tolist()
    out = [t for t in out if t != tok.eos_id]  # the end of the turn is not shown, as OpenAI does
    expected, _ = reference_logprobs(model, ids + out)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out) and [c.logprob for c in content] == pytest.approx(expected[len(ids) - 1:],
                                                                                       abs=1e-4)
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.bytes and c.top_logprobs[0].bytes == c.bytes
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


@pytest.mark.slow  # ~10 s on the loaded machine: a process importing torch
def test_server_cli_refuses_a_negative_body_limit_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "inference.server", "--model", str(tmp_path / "absent"),
                           "--max_body_bytes", "-1"], capture_output=True, text=True, timeout=limit(120))
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        "error: --max_body_bytes must be >= 0 (0: no limit), got -1"], proc.stderr


def test_best_of_returns_the_candidates_with_the_best_logprob_per_token(client, folder):
    _, _, model, tok = folder
    kwargs = dict(model="tiny", prompt=["the city of", "Order 12"], max_tokens=6, temperature=1.0, seed=11)
    candidates = client.completions.create(n=4, logprobs=0, **kwargs)
    best = client.completions.create(n=2, best_of=4, logprobs=0, **kwargs)
    assert [c.index for c in best.choices] == [0, 1, 2, 3]
    assert best.usage.completion_tokens == candidates.usage.completion_tokens  # every candidate is generated

    def per_token(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    for p in range(2):
        ranked = sorted(candidates.choices[4 * p:4 * p + 4], key=per_token, reverse=True)[:2]
        chosen = best.choices[2 * p:2 * p + 2]
        assert [c.text for c in chosen] == [c.text for c in ranked]
        assert per_token(chosen[0]) >= per_token(chosen[1])
