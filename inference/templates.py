"""Chat templates: the model's Jinja `chat_template`, rendered the way transformers' apply_chat_template does.

The fine-tuning stage stores the template in the model folder's tokenizer_config.json (`chat_template`) or in a
`chat_template.jinja` file beside it. A base model without one gets FALLBACK_TEMPLATE, a plain
`Human: ... / Assistant: ...` dialogue, with FALLBACK_STOP as its stop string so that the model does not go on to
write the next human turn itself.

Rendering follows transformers (tokenizer/chat_template.py compiles the template as it does), with the tokenizer's
special tokens (bos_token, eos_token, unk_token, pad_token) as variables. The rendered text is encoded without
adding BOS (the template writes it where it wants it); special-token strings in it become their ids, as a
transformers tokenizer does, instead of being spelled out as ordinary text.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from tokenizer import Tokenizer
from tokenizer.chat_template import compile_template, encode_chat, find_chat_template, render_chat, special_tokens

FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Human: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = ("\nHuman:",)
ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or a ValueError saying which message is wrong.

    As OpenAI's API allows, content may also be a list of text parts ([{"type": "text", "text": ...}]) and the
    role "developer" stands for "system".
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        role = {"developer": "system"}.get(m.get("role"), m.get("role")) if isinstance(m, dict) else None
        if not isinstance(content, str) or role not in ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role in {list(ROLES)} and a string content")
        out.append({"role": role, "content": content})
    return out


@dataclass
class ChatTemplate:
    """A Jinja chat template bound to a tokenizer's special tokens."""

    source: str
    tokenizer: Tokenizer
    origin: str  # where the template came from (a file, or "fallback")
    stop: tuple[str, ...] = ()  # stop strings the template implies (the fallback's next "Human:" turn)
    special: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.special = special_tokens(self.tokenizer)
        try:
            compile_template(self.source)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin}: the chat template does not compile: {e}") from None

    @property
    def is_fallback(self) -> bool:
        return self.origin == "fallback"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin}: chat template error: {e}") from None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        with self._errors():
            return render_chat(self.source, check_messages(messages), self.special, add_generation_prompt)

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: BOS/EOS/... strings the template writes become their ids.

        The same strings inside a message stay text (sanitize_control_tokens, as transformers' option of that
        name), so a user cannot end a turn early by typing "</s>".
        """
        with self._errors():
            return encode_chat(self.source, self.tokenizer, check_messages(messages), add_generation_prompt,
                               sanitize_control_tokens=True)


def load_chat_template(model_path: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
    """The model's own template, else the plain Human/Assistant fallback."""
    found = find_chat_template(model_path)
    if found is None:
        return ChatTemplate(FALLBACK_TEMPLATE, tokenizer, "fallback", FALLBACK_STOP)
    return ChatTemplate(found[0], tokenizer, found[1])
