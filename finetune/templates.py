"""Chat templates: how a conversation becomes the text (and tokens) a model is tuned on and later prompted with.

Each template is a handful of strings (`tokenizer.chat_template.ChatFormat`). The same definition gives two things:

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

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from tokenizer import Tokenizer
from tokenizer.chat_template import PLAIN, ChatFormat, find_chat_template

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, ChatFormat] = {t.name: t for t in (
    ChatFormat("alpaca", "{system}### Instruction:\n{content}", "\n\n### Response:\n", "",
               "{content}\n\n", ALPACA_SYSTEM, "\n\n",
               description="Stanford Alpaca / alpaca-lora wording (an input is appended to the instruction)"),
    ChatFormat("vicuna", "{system}USER: {content}", " ASSISTANT:", " ", "{content} ", VICUNA_SYSTEM, "",
               description="Vicuna v1.1: USER: ... ASSISTANT: ...</s>"),
    ChatFormat("chatml", "{system}<|im_start|>user\n{content}<|im_end|>", "\n<|im_start|>assistant\n", "",
               "<|im_start|>system\n{content}<|im_end|>\n", "", "\n",
               description="ChatML markers; a reply ends with the tokenizer's EOS"),
    ChatFormat("llama-2", "[INST] {system}{content}", " [/INST]", " ", "<<SYS>>\n{content}\n<</SYS>>\n\n", "",
               "", bos_each_turn=True, description="LLaMA-2-chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ...</s>"),
    PLAIN,
)}


def get_template(name: str) -> ChatFormat:
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


def encode_turns(template: ChatFormat, tokenizer: Tokenizer, messages: list[dict[str, str]],
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
