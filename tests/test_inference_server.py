"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server."""
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from fixtures_time import limit
from fixtures_inference import ServerThread, SlowEngine, free_port, make_model_folder, wait_until
from inference.engine import Engine
from inference.server import create_app
from inference.templates import load_chat_template

openai = pytest.importorskip("openai")

SLOTS = 4
PROMPTS = ["Order 12", "the city of", "床前明月", "def f(x):", "Hello world and more", "a", "Order 9 of"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def server(folder):
    _, chat_dir, model, tok = folder
    engine = Engine(model, tok, slots=SLOTS, max_queue=16).start()
    with ServerThread(create_app(engine, load_chat_template(chat_dir, tok), "tiny")) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=limit(60))


def greedy_text(folder, ids, n):
    _, _, model, tok = folder
    out = model.generate(torch.tensor([ids]), n, eos_id=tok.eos_id)[0, len(ids):].tolist()
    return tok.decode([i for i in out if i != tok.eos_id]), out


def test_models_and_completion_match_greedy_generate(client, folder):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    tok = folder[3]
    r = client.completions.create(model="tiny", prompt="Order 12", max_tokens=12, temperature=0)
    ids = tok.encode("Order 12", bos=True)
    text, out = greedy_text(folder, ids, 12)
    full = tok.decode(ids + [i for i in out if i != tok.eos_id])
    assert "Order 12" + r.choices[0].text == full  # the continuation keeps its leading space
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] == tok.eos_id else "length")


def test_chat_streaming_and_not(client, folder):
    _, chat_dir, _, tok = folder
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    ids = load_chat_template(chat_dir, tok).encode(messages)
    assert r.choices[0].message.content == greedy_text(folder, ids, 16)[0]
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == r.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # The raw stream ends with the [DONE] sentinel.
    with httpx.stream("POST", client.base_url.join("chat/completions").__str__(), timeout=limit(60),
                      json={"messages": messages, "max_tokens": 4, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_stop_and_seed(client):
    kwargs = dict(model="tiny", prompt="the city of", max_tokens=20)
    full = client.completions.create(temperature=0, **kwargs).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.completions.create(temperature=0, stop=[stop], **kwargs).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    a, b, c = (client.completions.create(temperature=1.0, seed=s, **kwargs).choices[0].text for s in (3, 3, 4))
    assert a == b and a != c


def test_concurrent_greedy_requests_equal_sequential(client):
    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    sequential = [ask(p) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # more requests than slots: some wait in the queue
        concurrent = list(pool.map(ask, PROMPTS))
    assert concurrent == sequential


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}), 400, "n"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": 5}), 400, "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [1]}), 400, "stop"),
    (json.dumps({"messages": [{"role": "user", "content": "x " * 400}]}), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), 400, "messages"),  # template error
    (json.dumps({"messages": "hi"}), 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_lives(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=limit(30),
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert httpx.get(server.url + "/health", timeout=limit(30)).json()["status"] == "ok"


def test_bad_request_through_the_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="x")


LONG = {"prompt": "Order 12", "max_tokens": 200, "temperature": 0, "stream": True}


@pytest.fixture
def slow(folder):
    _, chat_dir, model, tok = folder
    engine = SlowEngine(model, tok, slots=1, max_queue=1).start()
    with ServerThread(create_app(engine, load_chat_template(chat_dir, tok), "tiny", api_key="sekret")) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


def test_client_disconnect_frees_the_slot(slow):
    headers = {"Authorization": "Bearer sekret"}
    with httpx.stream("POST", slow.url + "/v1/completions", json=LONG, headers=headers, timeout=limit(30)) as resp:
        next(resp.iter_lines())  # the first token has come: the request holds the slot
        assert slow.engine.free_slots() == 0
    # A non-streaming request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json={**LONG, "stream": False}, headers=headers, timeout=0.5)
    assert wait_until(lambda: all(r.done for r in slow.engine.requests))
    assert [r.finish_reason for r in slow.engine.requests] == ["cancelled", "cancelled"]
    assert all(len(r.output_ids) < 100 for r in slow.engine.requests)
    assert wait_until(lambda: slow.engine.free_slots() == 1)


def test_tokens_stream_as_they_are_generated(slow):
    c = openai.OpenAI(base_url=slow.url + "/v1", api_key="sekret", max_retries=0)
    arrivals = []
    for chunk in c.completions.create(model="tiny", prompt="Order 12", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True}, stream=True):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    # The engine steps every 20 ms or more, so a client that keeps up sees the reply in many pieces over time.
    assert len(arrivals) >= 10 and arrivals[-1] - arrivals[0] > 0.15


def test_full_queue_answers_429_and_api_key_401(slow):
    assert httpx.get(slow.url + "/v1/models", timeout=limit(30)).status_code == 401
    wrong = httpx.get(slow.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=limit(30))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with httpx.Client(base_url=slow.url, headers={"Authorization": "Bearer sekret"}, timeout=limit(30)) as http:
        with http.stream("POST", "/v1/completions", json=LONG) as running:
            next(running.iter_lines())  # holds the only slot
            with http.stream("POST", "/v1/completions", json=LONG):  # waits in the queue (max_queue=1)
                r = http.post("/v1/completions", json=LONG)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert http.get("/v1/models").status_code == 200


@pytest.mark.slow  # ~8 s: a server process loading a model (scripts/test.sh --fast skips it)
def test_server_cli_binds_localhost_with_api_key(folder):
    base = folder[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference.server", "--model", str(base), "--port", str(port),
                             "--api_key", "k3y", "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + limit(120)
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        r = c.chat.completions.create(model=base.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=limit(30))[0]
    assert f"http://127.0.0.1:{port}" in out
    proc = subprocess.run([sys.executable, "-m", "inference.server", "--model", str(base), "--slots", "100000000",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=limit(120))
    assert proc.returncode == 1 and proc.stderr.startswith("error: --slots 100000000 needs")
    assert proc.stderr.count("\n") == 1


def test_server_cli_taken_port_is_one_line_before_the_model_loads(tmp_path):
    """A port in use is reported at once, naming --port; --model names no folder, so the port came first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "inference.server", "--model", str(tmp_path / "absent"),
                               "--port", str(port)], capture_output=True, text=True, timeout=limit(120))
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another server?); pass a free one with --port PORT"], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "inference.server", "--model", str(tmp_path / "absent"),
                           "--port", "70000"], capture_output=True, text=True, timeout=limit(120))
    assert proc.returncode == 1 and proc.stderr.splitlines() == ["error: --port must be in 1..65535, got 70000"]
