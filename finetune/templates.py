"""Chat templates: how a conversation becomes the text (and tokens) a model is tuned on and later prompted with.

Each template is a handful of strings (`ChatTemplate`). The same definition gives two things:

- `encode`: the token ids and per-token "trained" flags of a conversation, for training;
- `jinja`: a Jinja `chat_template` (Hugging Face convention), stored in the run directory and in the exported
  folder's tokenizer_config.json, so that `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`
  gives, token for token, the prompt the model saw in training.

Token layout of a conversation (system optional, then user/assistant turns):

    BOS  user_format(system, user_1) assistant_cue | assistant_prefix reply_1 EOS
         separator [BOS] user_format("", user_2) assistant_cue | assistant_prefix reply_2 EOS ...

The part before `|` is prompt, the part after it is the reply (trained by default, EOS included). Special tokens
(BOS/EOS) split the text into runs; each run is encoded by SentencePiece on its own, with the dummy-prefix "▁" at
its start, exactly as the exported Hugging Face tokenizer does once the rendered text is split at the special
tokens. Within a run, the prompt is encoded alone and the reply as its continuation (no dummy prefix): the prompt
tokens are then exactly those inference feeds, and the model learns to continue them. (A SentencePiece piece
straddling the prompt/reply boundary would tokenize differently when a later turn re-reads this turn as history;
`encode` counts such turns, see EncodeStats.boundary_merges; the shipped templates end every prompt with a
separator that keeps them rare.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tokenizer import Tokenizer
from tokenizer.chat_template import find_chat_template

ROLES = ("system", "user", "assistant")
"""The template a run was tuned with, in its run directory (the exported folder has it in tokenizer_config.json)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format as strings; `{system}` and `{content}` are filled in."""

    name: str
    user_format: str
    """A user turn; `{system}` receives the rendered system text in the first turn and "" after it."""
    assistant_cue: str
    """Prompt text announcing the reply (e.g. "\\n\\n### Response:\\n"); not trained."""
    assistant_prefix: str = ""
    """Reply text before the content (e.g. the space after "ASSISTANT:"); trained like the reply."""
    system_format: str = "{content}"
    """How a system text is rendered into the first user turn."""
    default_system: str = ""
    """System text used when a conversation has none ("" for none)."""
    separator: str = ""
    """Text after a reply's EOS, before the next user turn."""
    bos_each_turn: bool = False
    """Start every turn with BOS, as LLaMA-2-chat does (otherwise only the conversation)."""
    description: str = field(default="", compare=False)

    def system_text(self, system: str | None) -> str:
        system = self.default_system if system is None else system
        return self.system_format.format(content=system) if system else ""

    def prompt_text(self, user: str, system: str | None, first: bool) -> str:
        """The prompt of one turn: separator (after the first), user turn, cue."""
        head = "" if first else self.separator
        return head + self.user_format.format(system=self.system_text(system) if first else "", content=user) \
            + self.assistant_cue

    def jinja(self) -> str:
        """The Hugging Face chat_template equivalent to `encode` (a single line of Jinja)."""
        q = lambda text: json.dumps(text)  # noqa: E731  (a Jinja string literal: same escapes as JSON)
        pre, post = self.user_format.split("{content}")
        sys_pre, sys_post = self.system_format.split("{content}")
        user_pre, user_mid = pre.split("{system}") if "{system}" in pre else ("", pre)
        if "{system}" not in pre:
            raise ValueError(f"template {self.name}: user_format must contain {{system}} before {{content}}")
        return "".join([
            "{{- bos_token -}}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system = {q(self.default_system)} -%}}{{%- set turns = messages -%}}",
            "{%- endif -%}",
            "{%- for message in turns -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- if loop.first -%}",
            "{%- if system -%}",
            f"{{{{- {q(user_pre)} + {q(sys_pre)} + system + {q(sys_post)} + {q(user_mid)} -}}}}",
            f"{{%- else -%}}{{{{- {q(user_pre)} + {q(user_mid)} -}}}}{{%- endif -%}}",
            "{%- else -%}",
            f"{{{{- {q(self.separator)} -}}}}",
            "{%- if bos_each_turn -%}{{- bos_token -}}{%- endif -%}".replace(
                "bos_each_turn", "true" if self.bos_each_turn else "false"),
            f"{{{{- {q(user_pre)} + {q(user_mid)} -}}}}",
            "{%- endif -%}",
            f"{{{{- message['content'] + {q(post)} -}}}}",
            f"{{%- if not loop.last or add_generation_prompt -%}}{{{{- {q(self.assistant_cue)} -}}}}{{%- endif -%}}",
            "{%- elif message['role'] == 'assistant' -%}",
            f"{{{{- {q(self.assistant_prefix)} + message['content'] + eos_token -}}}}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ])


ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate("alpaca", "{system}### Instruction:\n{content}", "\n\n### Response:\n", "",
                 "{content}\n\n", ALPACA_SYSTEM, "\n\n",
                 description="Stanford Alpaca / alpaca-lora wording (an input is appended to the instruction)"),
    ChatTemplate("vicuna", "{system}USER: {content}", " ASSISTANT:", " ", "{content} ", VICUNA_SYSTEM, "",
                 description="Vicuna v1.1: USER: ... ASSISTANT: ...</s>"),
    ChatTemplate("chatml", "{system}<|im_start|>user\n{content}<|im_end|>", "\n<|im_start|>assistant\n", "",
                 "<|im_start|>system\n{content}<|im_end|>\n", "", "\n",
                 description="ChatML markers; a reply ends with the tokenizer's EOS"),
    ChatTemplate("llama-2", "[INST] {system}{content}", " [/INST]", " ", "<<SYS>>\n{content}\n<</SYS>>\n\n", "",
                 "", bos_each_turn=True, description="LLaMA-2-chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ...</s>"),
    ChatTemplate("plain", "{system}Human: {content}", "\nAssistant:", " ", "{content}\n", "", "\n",
                 description="Human: ... Assistant: ... (BELLE / Chinese-LLaMA style)"),
)}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}") from None


# --------------------------------------------------------------------------------------------------------------
# Encoding


@lru_cache(maxsize=8)
def _continuation_processor(model_path: str, sha256: str) -> SentencePieceProcessor:
    """The tokenizer without its dummy prefix: encodes text that continues a run (a reply after its prompt)."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    return _continuation_processor(str(tokenizer.path), tokenizer.sha256).encode(text)


@dataclass
class EncodeStats:
    boundary_merges: int = 0
    """Turns whose prompt and reply would merge into a different piece if encoded as one text."""


def check_conversation(messages: list[dict[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system or None, [(user, assistant), ...]) of a conversation, or ValueError saying what is wrong with it."""
    system = None
    turns = list(messages)
    if turns and turns[0].get("role") == "system":
        system = turns.pop(0).get("content")
    if not turns:
        raise ValueError("the conversation has no user/assistant turns")
    pairs = []
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise ValueError(f"roles must alternate user/assistant after an optional system message; message "
                             f"{i + (system is not None)} is {m.get('role')!r} where {want!r} was expected")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + (system is not None)} has no text content")
    if len(turns) % 2:
        raise ValueError("the conversation ends with a user message: there is no reply to train on")
    for u, a in zip(turns[0::2], turns[1::2]):
        if not a["content"].strip():
            raise ValueError("an assistant reply is empty")
        pairs.append((u["content"], a["content"]))
    return system, pairs


def encode_turns(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict[str, str]],
                 stats: EncodeStats | None = None) -> list[tuple[list[int], list[int]]]:
    """[(prompt ids, reply ids), ...] per turn; the first prompt starts with BOS, every reply ends with EOS."""
    system, pairs = check_conversation(messages)
    out = []
    for k, (user, reply) in enumerate(pairs):
        prompt_text = template.prompt_text(user, system, first=k == 0)
        if k == 0:
            prompt = [tokenizer.bos_id] + tokenizer.encode(prompt_text)
        elif template.bos_each_turn:  # after EOS: the separator is a run of its own, then BOS starts the next
            sep = template.separator
            prompt = (tokenizer.encode(sep) if sep else []) + [tokenizer.bos_id] + \
                tokenizer.encode(prompt_text[len(sep):])
        else:
            prompt = tokenizer.encode(prompt_text)
        reply_ids = encode_continuation(tokenizer, template.assistant_prefix + reply)
        if stats is not None and tokenizer.encode(prompt_text + template.assistant_prefix + reply) != \
                tokenizer.encode(prompt_text) + reply_ids:
            stats.boundary_merges += 1
        out.append((prompt, reply_ids + [tokenizer.eos_id]))
    return out


def read_chat_template(model_path: str | Path) -> str | None:
    """The Jinja chat template stored with a model (run directory or HF folder); None when it has none."""
    found = find_chat_template(model_path)
    return None if found is None else found[0]
