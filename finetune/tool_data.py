"""Fine-tuning records with tool calls, in the two layouts people have:

- OpenAI messages: {"messages": [..., {"role": "assistant", "content": null, "tool_calls": [{"id", "type":
  "function", "function": {"name", "arguments"}}]}, {"role": "tool", "tool_call_id", "content"}, ...],
  "tools": [{"type": "function", "function": {"name", "description", "parameters"}}]};
- LLaMA-Factory's ShareGPT: {"conversations": [{"from": "human", ...}, {"from": "function_call", "value":
  "{\"name\": ..., \"arguments\": {...}}"}, {"from": "observation", "value": "..."}, {"from": "gpt", ...}],
  "tools": "[{\"name\", \"description\", \"parameters\"}]"} (tools as a JSON string of function definitions; a
  function_call value may also be a list of calls).

Both become plain system/user/assistant messages (tokenizer/chat_template.py flatten_tool_messages): the tools in
the system text, each call as <tool_call> text in the assistant's reply, tool results as a user turn. So a call
is trained like any reply (the assistant's turn, EOS included) and a tool result is prompt, never trained; and the
exported template (ChatFormat.jinja()) renders the same conversation with tools=... to the same text, the prompt
the server gives the model.
"""
from __future__ import annotations

import json
from typing import Any

from tokenizer.chat_template import flatten_tool_messages

SHAREGPT_TOOL_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                       "function_call": "assistant", "observation": "tool", "system": "system"}


def _bad(message: str) -> Exception:
    from finetune.data import BadRecord  # (finetune.data imports this module)

    return BadRecord(message)


def _tools(value: Any) -> list[dict[str, Any]]:
    """A record's tools as OpenAI tool objects: a list (or a JSON string of one) of function definitions,
    bare or wrapped in {"type": "function", "function": ...}."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _bad("field 'tools' is a string but not JSON") from None
    if not isinstance(value, list):
        raise _bad("field 'tools' must be a list of function definitions")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}] must be a function definition with a name")
        out.append({"type": "function", "function": fn})
    return out


def _calls(value: str, where: str) -> list[dict[str, Any]]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise _bad(f"{where}: a function_call value must be JSON {{\"name\", \"arguments\"}}") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise _bad(f"{where}: a function_call value must be JSON {{\"name\", \"arguments\"}} (or a list of them)")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def has_tools(record: dict[str, Any], fmt: str) -> bool:
    """Whether a record uses tool calling (then tool_messages reads it)."""
    if record.get("tools"):
        return True
    if fmt == "openai" and isinstance(record.get("messages"), list):
        return any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                   for m in record["messages"])
    if fmt == "sharegpt" and isinstance(record.get("conversations"), list):
        return any(isinstance(t, dict) and t.get("from") in ("function_call", "observation")
                   for t in record["conversations"])
    return False


def tool_messages(record: dict[str, Any], fmt: str, system_field: str = "system") -> list[dict[str, str]]:
    """The plain messages of a tool-calling record (OpenAI or ShareGPT layout); BadRecord saying what is wrong."""
    tools = _tools(record.get("tools"))
    if fmt == "openai":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise _bad("field 'messages' must be a list of messages")
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise _bad("field 'conversations' must be a list of {from, value} messages")
        system = record.get(system_field)
        messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_TOOL_ROLES \
                    or not isinstance(turn.get("value"), str):
                raise _bad(f"conversations[{i}] must be {{\"from\": human|gpt|function_call|observation|system, "
                           "\"value\": text}")
            if turn["from"] == "function_call":
                messages.append({"role": "assistant", "content": None,
                                 "tool_calls": _calls(turn["value"], f"conversations[{i}]")})
            else:
                messages.append({"role": SHAREGPT_TOOL_ROLES[turn["from"]], "content": turn["value"]})
    else:
        raise _bad(f"tool calls are read from the openai and sharegpt layouts, not {fmt}")
    try:
        return flatten_tool_messages(messages, tools)
    except ValueError as e:
        raise _bad(str(e)) from None
