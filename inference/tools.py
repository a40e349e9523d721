"""Tool calling for the server: the request's `tools` and `tool_choice` checked, the grammar that forces a call
(tool_choice "required" or a named function), and the model's <tool_call> blocks parsed into OpenAI `tool_calls`.

The convention is the one ChatFormat.jinja() renders (tokenizer/chat_template.py, as Qwen2.5 and Hermes do): the
tools' schemas in the system text, each call written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

With tool_choice "required" or a named function the reply is constrained (inference/constrained.py) to exactly one
such block whose name is one of the tools (or the named one) and whose arguments are valid under that tool's
`parameters` schema. With "auto" the model writes what it writes: blocks that parse become tool_calls, anything
else stays content. With "none" the tools are shown to the model but nothing is parsed.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from tokenizer.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

from .constrained import JSON_STYLE, llguidance_module

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
BLOCK = re.compile(re.escape(TOOL_CALL_OPEN.strip()) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE.strip()), re.S)


class ToolError(ValueError):
    """A bad `tools` or `tool_choice` (the message names the item); `param` is the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]
    """The request's tools, as given ({"type": "function", "function": {"name", "description"?, "parameters"?}})."""
    choice: str
    """"none", "auto", "required" or "named"."""
    name: str | None = None
    """The function tool_choice names."""

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parsed(self) -> bool:
        """Whether the reply is parsed for tool calls."""
        return self.choice != "none"


def check_tools(body: dict) -> ToolRequest | None:
    """The request's tools and tool_choice, or None without tools; ToolError naming the field of a bad one."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):  # as OpenAI: a tool_choice without tools is an error
            raise ToolError("tool_choice is only allowed when tools are given", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", "tools")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is given twice", "tools")
        names.add(name)
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if "description" in fn and not isinstance(fn["description"], str):
            raise ToolError(f"tools[{i}].function.description must be a string", "tools")
    if choice is None:
        choice = "auto"
    if choice in ("none", "auto", "required"):
        return ToolRequest(tools, choice)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or fn.get("name") not in names:
        raise ToolError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                        "{\"name\": NAME}} naming one of the tools", "tool_choice")
    return ToolRequest(tools, "named", fn["name"])


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call's object {"name", "arguments"} (of the named tool only, when given).

    A tool's `$defs` (pydantic's model_json_schema puts nested models there, referred to as "#/$defs/X") move to
    the root of this schema, where those references now point; the same name defined differently by two tools is a
    ToolError."""
    options, defs = [], {}
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = dict(fn.get("parameters") or {"type": "object"})
        for key in ("$defs", "definitions"):
            for def_name, definition in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise ToolError(f"tools: {key}/{def_name} is defined differently by two tools", "tools")
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, **defs}


def forced_call_grammar(request: ToolRequest) -> str:
    """The llguidance grammar of a reply that is exactly one <tool_call> block of one of the tools (the named one
    for a named tool_choice); ToolError naming `tools` when a tool's parameters cannot be compiled."""
    llg = llguidance_module()
    schema = call_schema(request.tools, request.name)
    lark = (f"start: {json.dumps(TOOL_CALL_OPEN)} call {json.dumps(TOOL_CALL_CLOSE)}\n"
            f"call: %json {json.dumps({**schema, 'x-guidance': JSON_STYLE})}\n")
    try:
        grammar = llg.LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as e:
        raise ToolError(f"a tool's parameters are not a usable JSON schema: {e}", "tools") from None
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise ToolError(f"a tool's parameters cannot be enforced: {error.splitlines()[0]}", "tools")
    return grammar


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a reply: every <tool_call> block whose JSON has the name of one of the tools and
    object arguments becomes an OpenAI tool call (arguments as a JSON string, ids call_...); the text outside
    the blocks that parsed is the content (None when only calls are left). A block that does not parse stays in
    the content, as the model wrote it."""
    names = {t["function"]["name"] for t in tools}
    calls, kept, last = [], [], 0
    for m in BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                continue
        if not isinstance(arguments, dict):
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
    kept.append(text[last:])
    content = "".join(kept).rstrip()  # (trailing whitespace before a call: held back when streaming, too)
    return (content if content.strip() else None) if calls else text, calls


def held_back(text: str) -> int:
    """How much of a reply streaming may show as content: up to the start of a <tool_call> block, or of a possible
    one at the end of the text, without the whitespace before it (the rest is parsed when the reply ends; a
    reply with calls has its content right-stripped, see parse_tool_calls)."""
    opener = TOOL_CALL_OPEN.strip()
    at = text.find(opener)
    if at < 0:
        at = len(text)
        for n in range(min(len(opener) - 1, len(text)), 0, -1):
            if text.endswith(opener[:n]):
                at = len(text) - n
                break
    return len(text[:at].rstrip())


__all__ = ["ToolError", "ToolRequest", "check_tools", "forced_call_grammar", "held_back",
           "parse_tool_calls"]
