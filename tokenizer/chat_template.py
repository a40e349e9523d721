"""A model's Jinja chat template: where it is stored, how it is compiled and rendered, and how the rendered text
becomes token ids, exactly as transformers does.

One place for every stage that turns messages into a prompt: fine-tuning (the training prompts), evaluation (the
judged answers) and inference (chat, server, web). Compiling follows transformers' apply_chat_template: a
sandboxed Jinja environment with trim_blocks/lstrip_blocks, the loop-control extension and the
`{% generation %}` tag, a `tojson` filter that does not escape HTML, `raise_exception` and `strftime_now`.

Encoding (`encode_chat`, `encode_rendered`) is what a transformers tokenizer does with the rendered text: the
special tokens the template writes (BOS/EOS/UNK/PAD as text) become their ids and each run of text between them is
encoded on its own. SentencePiece alone would spell "<s>" out as ordinary text.

`ChatTemplate` is the one template type of every stage; `load_chat_template` finds a model's template, and a model
without one gets FALLBACK: the `plain` format of fine-tuning (`Human: ... / Assistant: ...`, BELLE style), with
FALLBACK_STOP as its stop string so that the model does not go on to write the next human turn itself.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.errors import UserError

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# Tool calling, in the convention of Qwen2.5's and Hermes' templates: the tools' JSON schemas are listed in the
# system text, the assistant writes each call as <tool_call>{"name", "arguments"}</tool_call>, and the tool results
# come back in a user turn as <tool_response>...</tool_response>. ChatFormat.jinja() renders it (tools= as
# transformers' apply_chat_template passes it), flatten_tool_messages writes the same as plain user/assistant turns
# for training, and inference/tools.py parses and constrains the calls.
TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
              "with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
              "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The file a template is stored in beside a model (fine-tuning writes it into its run directory)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request); raises
    jinja2.TemplateError for one that does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def find_chat_template(model_path: str | Path) -> tuple[str, str] | None:
    """(template source, the file it came from) for a model folder or run directory, or None when it has none.

    Looked for in tokenizer_config.json's `chat_template` (a string, or the named-templates list whose "default" is
    taken), then in chat_template.jinja; in the folder itself, then in its hf/ export (a training run directory).
    """
    path = Path(model_path)
    for candidate in (path / "tokenizer_config.json", path / "hf" / "tokenizer_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{candidate}: not valid JSON ({e})") from None
            template = config.get("chat_template")
            if isinstance(template, list):  # the named-templates form: [{"name": "default", "template": ...}]
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if template is not None:
                if not isinstance(template, str):
                    raise UserError(f"{candidate}: chat_template must be a string")
                return template, str(candidate)
    for candidate in (path / CHAT_TEMPLATE_FILE, path / "hf" / CHAT_TEMPLATE_FILE):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8"), str(candidate)
    return None


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The variables a template is rendered with for the tokenizer's special tokens (bos_token, eos_token,
    unk_token, pad_token; those it has), each its piece, e.g. {"bos_token": "<s>", ...}."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.unk_id,
           "pad_token": tokenizer.pad_id}
    return {name: tokenizer.id_to_piece(i) for name, i in ids.items() if i >= 0}


def render_chat(source: str, messages: Sequence[Mapping[str, Any]], specials: Mapping[str, str],
                add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The text transformers' apply_chat_template(tokenize=False, tools=tools) gives; raises jinja2.TemplateError."""
    return compile_template(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           tools=list(tools) if tools else None, **specials)


def _encode_runs(tokenizer: Tokenizer, text: str, stand_ins: Mapping[str, str]) -> list[int]:
    """encode_rendered, where the stand_ins (marker -> special piece) inside runs of text are put back as text."""
    pieces = {p: tokenizer.piece_to_id(p) for p in special_tokens(tokenizer).values()}
    # Longest piece first, so that one piece that begins another can never cut it short (transformers' trie).
    pattern = "(" + "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text) if pieces else [text]:
        if part in pieces:
            ids.append(pieces[part])
        elif part:
            for marker, piece in stand_ins.items():
                part = part.replace(marker, piece)
            ids.extend(tokenizer.encode(part))
    return ids


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text: the tokenizer's special pieces in it become their ids, and every run of text
    between them is encoded on its own (what a transformers tokenizer does with split_special_tokens off)."""
    return _encode_runs(tokenizer, text, {})


def encode_chat(source: str, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, *, sanitize_control_tokens: bool = False,
                tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """The ids transformers' apply_chat_template(messages, tokenize=True) gives with the exported tokenizer.

    sanitize_control_tokens (transformers' option of that name, off by default there, too): special-token strings
    typed inside message contents stay text. Off, the ids equal transformers' default apply_chat_template token for
    token (tested), what users of the exported folder get. Batch generation and the server turn it on: training
    encodes message contents as text, and a server's messages come from users, who must not end a turn or forge
    one by typing "</s>" or "<s>". The pieces are swapped for private-use markers while rendering, so that the
    template's own special tokens are the only ones left in the text, and put back as text when the runs are
    encoded.
    """
    specials = special_tokens(tokenizer)
    if not sanitize_control_tokens:
        return encode_rendered(tokenizer, render_chat(source, messages, specials, add_generation_prompt, tools))
    pieces = sorted(set(specials.values()), key=len, reverse=True)
    marks = {p: f"\ue000{i}\ue001" for i, p in enumerate(pieces)}
    guarded = []
    for m in messages:
        content = m["content"]
        for p in pieces:
            if content:  # (an assistant message with tool_calls may have no content)
                content = content.replace(p, marks[p])
        guarded.append({**m, "content": content})
    text = render_chat(source, guarded, specials, add_generation_prompt, tools)
    return _encode_runs(tokenizer, text, {mark: p for p, mark in marks.items()})


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as strings; `{system}` and `{content}` are filled in. Fine-tuning encodes conversations with it
    (finetune/templates.py) and stores its `jinja()` with the model, which a ChatTemplate then renders."""

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
            # (with tools and no system message the tools block is the whole system text: no default system)
            f"{{%- set system = {q(self.default_system)} if not tools else '' -%}}{{%- set turns = messages -%}}",
            "{%- endif -%}",
            # tools (transformers' apply_chat_template(tools=...)): their schemas go at the end of the system text
            "{%- if tools -%}",
            f"{{%- set system = (system + '\\n\\n' if system else '') + {q(TOOLS_HEAD)} + "
            f"(tools | map('tojson') | join('\\n')) + {q(TOOLS_TAIL)} -%}}",
            "{%- endif -%}",
            "{%- for message in turns -%}",
            # a run of tool results is one user turn of <tool_response> blocks
            "{%- if message['role'] == 'tool' -%}",
            "{%- if loop.first -%}{{- raise_exception('a tool message must follow an assistant message') -}}"
            "{%- endif -%}",
            "{%- if loop.previtem['role'] != 'tool' -%}",
            f"{{{{- {q(self.separator)} -}}}}",
            "{%- if bos_each_turn -%}{{- bos_token -}}{%- endif -%}".replace(
                "bos_each_turn", "true" if self.bos_each_turn else "false"),
            f"{{{{- {q(user_pre)} + {q(user_mid)} -}}}}",
            "{%- else -%}{{- '\\n' -}}{%- endif -%}",
            f"{{{{- {q(TOOL_RESPONSE_OPEN)} + message['content'] + {q(TOOL_RESPONSE_CLOSE)} -}}}}",
            "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}",
            f"{{{{- {q(post)} -}}}}",
            f"{{%- if not loop.last or add_generation_prompt -%}}{{{{- {q(self.assistant_cue)} -}}}}{{%- endif -%}}",
            "{%- endif -%}",
            "{%- elif message['role'] == 'user' -%}",
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
            f"{{{{- {q(self.assistant_prefix)} + (message['content'] or '') -}}}}",
            "{%- for call in message['tool_calls'] or [] -%}",
            "{%- if call['function'] is defined -%}{%- set call = call['function'] -%}{%- endif -%}",
            "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
            f"{{{{- {q(TOOL_CALL_OPEN)} + ({{'name': call['name'], 'arguments': call['arguments']}} | tojson) + "
            f"{q(TOOL_CALL_CLOSE)} -}}}}",
            "{%- endfor -%}",
            "{{- eos_token -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ])


PLAIN = ChatFormat("plain", "{system}Human: {content}", "\nAssistant:", " ", "{content}\n\n", "", "\n",
                   description="Human: ... Assistant: ... (BELLE / Chinese-LLaMA style); the fallback of models "
                               "without a template")
FALLBACK_TEMPLATE = PLAIN.jinja()
FALLBACK_STOP = ("\nHuman:",)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}}) with its arguments as a
    dict, as transformers' templates take them (OpenAI sends them as a JSON string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where} must be an object with function.name and function.arguments")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"{where}.function.arguments is not JSON") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of {"role", "content"} dicts, or a ValueError saying which message is wrong.

    As OpenAI's API allows, content may also be a list of text parts ([{"type": "text", "text": ...}]) and the
    role "developer" stands for "system". Tool calling: an assistant message may carry `tool_calls` (then its
    content may be null; the calls' arguments become dicts) and a `tool` message answers one (`tool_call_id`).
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
        calls = m.get("tool_calls") if isinstance(m, dict) and role == "assistant" else None
        if calls and content is None:
            content = ""
        if not isinstance(content, str) or role not in ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role in {list(ROLES)} and a string content")
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            if not isinstance(calls, list):
                raise ValueError(f"messages[{i}].tool_calls must be a list")
            message["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{k}]") for k, c in enumerate(calls)]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def tools_system_text(tools: Sequence[Mapping[str, Any]], system: str | None) -> str:
    """The system text ChatFormat.jinja() renders for `tools` after `system`."""
    listed = "\n".join(_tojson(t) for t in tools)
    return (system + "\n\n" if system else "") + TOOLS_HEAD + listed + TOOLS_TAIL


def tool_call_text(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as the assistant writes it: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>."""
    return TOOL_CALL_OPEN + _tojson({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def flatten_tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
                          ) -> list[dict[str, str]]:
    """The conversation as plain system/user/assistant messages that a ChatFormat renders to the same text as its
    jinja() renders `messages` with `tools`: the tools in the system text, calls as <tool_call> text in the
    assistant's reply, each run of tool results one user turn of <tool_response> blocks. Fine-tuning encodes this
    (finetune/tool_data.py), so tool calls are trained as replies and tool results are prompt."""
    messages = check_messages(list(messages))
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:  # (the template's default system is not added to a tools block: as ChatFormat.jinja())
        system = tools_system_text(tools, system)
    out: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    for m in messages:
        if m["role"] == "tool":
            block = TOOL_RESPONSE_OPEN + m["content"] + TOOL_RESPONSE_CLOSE
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool": True})
            continue
        content = m["content"]
        for k, call in enumerate(m.get("tool_calls", [])):
            sep = "\n" if content or k else ""
            content += sep + tool_call_text(call["function"]["name"], call["function"]["arguments"])
        out.append({"role": m["role"], "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


@dataclass
class ChatTemplate:
    """A Jinja chat template with the special-token variables it is rendered with (bos_token, ...), and the
    tokenizer that encodes it (our SentencePiece Tokenizer; None where only rendering is needed, e.g. for a
    transformers tokenizer)."""

    source: str
    origin: str
    """Where the template came from: a file, or "fallback"."""
    specials: Mapping[str, str]
    stop: tuple[str, ...] = ()
    """Stop strings the template implies (the fallback's next "Human:" turn)."""
    tokenizer: Tokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        try:
            compile_template(self.source)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.origin}: the chat template does not compile: {e}") from None

    @property
    def is_fallback(self) -> bool:
        return self.origin == "fallback"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except jinja2.TemplateError as e:
            raise UserError(f"{self.origin}: chat template error: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        with self._errors():
            return render_chat(self.source, check_messages(messages), self.specials, add_generation_prompt, tools)

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered conversation: BOS/EOS/... strings the template writes become their ids.

        The same strings inside a message stay text (sanitize_control_tokens, as transformers' option of that
        name), so a user cannot end a turn early by typing "</s>".
        """
        if self.tokenizer is None:
            raise ValueError(f"{self.origin}: this chat template has no tokenizer to encode with")
        with self._errors():
            return encode_chat(self.source, self.tokenizer, check_messages(messages), add_generation_prompt,
                               sanitize_control_tokens=True, tools=tools)


def load_chat_template(model_path: str | Path, tokenizer: Tokenizer | None = None,
                       specials: Mapping[str, str] | None = None) -> ChatTemplate:
    """The model's own template, else FALLBACK. Its special-token variables are the tokenizer's, else `specials`."""
    specials = special_tokens(tokenizer) if tokenizer is not None else dict(specials or {})
    found = find_chat_template(model_path)
    if found is None:
        return ChatTemplate(FALLBACK_TEMPLATE, "fallback", specials, FALLBACK_STOP, tokenizer)
    return ChatTemplate(found[0], found[1], specials, (), tokenizer)
