"""A tiny random-weight model folder (debug preset, fp32) with the small SentencePiece tokenizer, with and without
a chat template, for the inference tests."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from fixtures_time import limit
from fixtures_tokenizer import train_small, write_corpus
from inference.engine import Engine
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

# A Llama-2-style template using bos/eos, a system message and raise_exception, as fine-tuning stores it.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def make_model_folder(root: Path, seed: int = 0) -> tuple[Path, Path, Transformer, Tokenizer]:
    """(base folder without a template, folder with CHAT_TEMPLATE, the model in eval mode, its tokenizer)."""
    train_small(write_corpus(root / "corpus", n=60), root / "tok", vocab_size=600)
    tok = Tokenizer(root / "tok")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("debug", vocab_size=tok.vocab_size)).eval()
    base = model.to_hf(root / "base", tokenizer_path=tok.path)
    chat = root / "chat"
    shutil.copytree(base, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return base, chat, model, tok


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1 and a free port, in a thread of the test process."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.time() + limit(30)
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=limit(30))


class SlowEngine(Engine):
    """An engine that steps at most every `step_delay` seconds, so that a reply lasts long enough to watch (and to
    disconnect from); it records every request it gets."""

    def __init__(self, *args, step_delay: float = 0.02, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_delay = step_delay
        self.requests = []

    def submit(self, *args, **kwargs):
        self.requests.append(super().submit(*args, **kwargs))
        return self.requests[-1]

    def step(self):
        time.sleep(self.step_delay)
        super().step()


def wait_until(condition, timeout: float = 30) -> bool:
    """Poll `condition` every 50 ms until it holds (True) or `timeout` seconds (scaled by fixtures_time.limit) pass
    (False)."""
    deadline = time.time() + limit(timeout)
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True
