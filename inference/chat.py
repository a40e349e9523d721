"""Multi-turn chat with a model, in the terminal or from Python, streaming the reply as it is generated.

    python -m inference.chat --model out/sft/hf --temperature 0.7 --top_p 0.9

Commands at the prompt: /reset forgets the conversation, /system TEXT sets the system message (and resets),
/quit (or Ctrl-D) leaves. The conversation is rendered with the model's chat template (see tokenizer/chat_template.py;
a base model without one gets a plain `Human: ... / Assistant:` dialogue that stops at the next `Human:`).

From Python:

    chat = Chat.load("out/sft/hf")
    reply = chat.chat([{"role": "user", "content": "你好"}])
    for piece in chat.stream(messages, temperature=0.7):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Iterator, TextIO

from common.cli import entry_point, parser
from model import generate as generation
from model.generate import sampling_from_args

from .constrained import Constraint, add_json_schema_arg, schema_from_arg
from .engine import Engine, SamplingParams
from .loader import add_model_args, load, make_engine
from .templates import ChatTemplate, check_messages

__all__ = ["CHAT_SAMPLING", "Chat", "add_sampling_args", "main", "repl", "sampling_from_args"]


class Chat:
    """Replies to conversations ([{"role": "system"|"user"|"assistant", "content": ...}, ...])."""

    def __init__(self, engine: Engine, template: ChatTemplate, defaults: SamplingParams | None = None,
                 json_schema: Any = False):
        """json_schema: replies are JSON valid under this schema (None: any JSON object; False: free text)."""
        self.engine, self.template = engine, template
        self.defaults = defaults or SamplingParams()
        self.json_schema = json_schema

    @classmethod
    def load(cls, model: str, slots: int = 1, **flags: Any) -> "Chat":
        """Open `model` (flags as on the command line: device, dtype, quantize, max_len, ...)."""
        p = argparse.ArgumentParser()
        add_model_args(p)
        args = p.parse_args(["--model", str(model)])
        for key, value in flags.items():
            if not hasattr(args, key):
                raise ValueError(f"unknown option {key!r}")
            setattr(args, key, value)
        loaded = load(args)
        return cls(make_engine(loaded, slots, args.max_len), loaded.template)

    def params(self, **overrides: Any) -> SamplingParams:
        params = dataclasses.replace(self.defaults, **overrides)
        params.stop = tuple(params.stop) + tuple(s for s in self.template.stop if s not in params.stop)
        return params.check()

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """The reply's text, piece by piece as it is generated (closing the iterator stops generation)."""
        ids = self.template.encode(check_messages(messages), add_generation_prompt=True)
        constraint = None if self.json_schema is False else Constraint.json_schema(
            self.engine.tokenizer, self.engine.model.config.vocab_size, self.json_schema)
        for event in self.engine.stream(ids, self.params(**sampling), constraint=constraint):
            if event.finish_reason == "error":
                raise RuntimeError("the engine failed while generating this reply")
            if event.text:
                yield event.text

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The whole reply."""
        return "".join(self.stream(messages, **sampling)).strip()

    def close(self) -> None:
        self.engine.stop()


CHAT_SAMPLING = SamplingParams(max_tokens=512, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
"""The sampling defaults of chat and the web page."""


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    """The engine's sampling flags with chat's defaults (model.generate.add_sampling_args)."""
    generation.add_sampling_args(p, dataclasses.replace(CHAT_SAMPLING, max_tokens=max_new_tokens), engine=True)


def repl(chat: Chat, system: str | None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """The terminal loop: read a line, stream the reply, keep the history."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict[str, str]] = []

    def reset() -> None:
        history.clear()
        if system:
            history.append({"role": "system", "content": system})

    reset()
    while True:
        stdout.write("\n>>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            reset()
            stdout.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            reset()
            stdout.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            stdout.write("commands: /reset, /system TEXT, /quit\n")
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        for piece in chat.stream(history):
            if not pieces:
                piece = piece.lstrip()
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


@entry_point
def main(argv: list[str] | None = None) -> None:
    p = parser("python -m inference.chat", __doc__)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_json_schema_arg(p)
    args = p.parse_args(argv)
    defaults = sampling_from_args(args)
    constrained, schema = schema_from_arg(args.json_schema)
    loaded = load(args)
    if loaded.template.is_fallback:
        print("(no chat template in the model folder: using the plain Human/Assistant template)", file=sys.stderr)
    chat = Chat(make_engine(loaded, 1, args.max_len), loaded.template, defaults,
                schema if constrained else False)
    try:
        repl(chat, args.system)
    finally:
        chat.close()


if __name__ == "__main__":
    main()
