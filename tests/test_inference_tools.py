"""Tool calling: the shipped templates render tools, tool calls and tool results as transformers'
apply_chat_template(tools=...) does with the same Jinja, fine-tuning's flattened form renders the same text, the
model's <tool_call> blocks are parsed into OpenAI tool_calls, and the server (with the official `openai` client)
returns tool_calls, streamed as deltas, with tool_choice required / a named function forcing a valid call even
from the random debug model."""
import json
import shutil

import pytest

from fixtures_time import limit
from fixtures_inference import ServerThread, make_model_folder
from finetune import templates
from inference.engine import Engine
from inference.templates import load_chat_template
from inference.tools import ToolError, check_tools, held_back, parse_tool_calls
from tokenizer.chat_template import check_messages, flatten_tool_messages, render_chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "unit": "c"}}},
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21"},
    {"role": "tool", "tool_call_id": "c2", "content": "5"},
    {"role": "assistant", "content": "Sunny, 21 C; 2+3 = 5."},
    {"role": "user", "content": "Thanks; and in 床前?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tools"))


@pytest.mark.parametrize("name", list(templates.TEMPLATES))
def test_shipped_templates_render_tools_as_transformers_does(folder, tmp_path, name):
    from transformers import AutoTokenizer

    from finetune.export import add_chat_template

    base, _, _, tok = folder
    hf_dir = tmp_path / "hf"
    shutil.copytree(base, hf_dir)
    source = templates.get_template(name).jinja()
    add_chat_template(hf_dir, source)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    specials = {"bos_token": hf.bos_token, "eos_token": hf.eos_token}
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        for add_generation_prompt in (True, False):
            ours = render_chat(source, check_messages(messages), specials, add_generation_prompt, TOOLS)
            theirs = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
            assert ours == theirs
            # fine-tuning's plain form of the same conversation renders to the same text
            assert render_chat(source, flatten_tool_messages(messages, TOOLS), specials,
                               add_generation_prompt) == ours
    text = render_chat(source, check_messages(CONVERSATION), specials, True, TOOLS)
    assert '{"name": "add", "arguments": {"a": 2, "b": 3}}' in text and "<tool_response>\n5\n</tool_response>" in text
    assert json.dumps(WEATHER, ensure_ascii=False) in text
    # OpenAI sends arguments as a JSON string: the same text
    as_strings = json.loads(json.dumps(CONVERSATION))
    for call in as_strings[2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    assert render_chat(source, check_messages(as_strings), specials, True, TOOLS) == text
    # without tools nothing changes
    plain = [m for m in CONVERSATION if m["role"] in ("system", "user")][:2]
    assert render_chat(source, plain, specials, True, None) == hf.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True)


def test_parse_tool_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>\n{bad json}\n</tool_call>'
    content, calls = parse_tool_calls(text, TOOLS)
    assert [c["function"]["name"] for c in calls] == ["add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2} and calls[0]["id"].startswith("call_")
    assert content.startswith("Let me check.") and "nope" in content and "{bad json}" in content
    assert parse_tool_calls("plain text", TOOLS) == ("plain text", [])
    content, calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', TOOLS)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert held_back("abc <tool") == 3 and held_back("abc <tool_call>\n{") == 3 and held_back("abc") == 3
    assert held_back("abc \n") == 3 and held_back("<tool_call>") == 0
    # content with calls is right-stripped; streaming shows a prefix of it (held_back), the rest at the end
    text = "Sure.\n<tool_call>\n{\"name\": \"add\", \"arguments\": {}}\n</tool_call>\n"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Sure." and content.startswith(text[:held_back(text)]) and len(calls) == 1


@pytest.mark.parametrize("body, param", [
    ({"tools": "f"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"tools": [ADD, ADD]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tools_name_the_field(body, param):
    with pytest.raises(ToolError) as e:
        check_tools(body)
    assert e.value.param == param


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    pytest.importorskip("llguidance")
    from finetune.export import add_chat_template
    from inference.server import create_app

    import torch

    from model import ModelConfig, Transformer

    base, _, _, tok = folder
    chat_dir = tmp_path_factory.mktemp("tools_chatml") / "hf"
    shutil.copytree(base, chat_dir)
    add_chat_template(chat_dir, templates.get_template("chatml").jinja())
    torch.manual_seed(0)  # the tools block is ~800 tokens of the small fixture vocabulary: a longer context
    model = Transformer(ModelConfig.from_preset("debug", vocab_size=tok.vocab_size, max_seq_len=1536)).eval()
    engine = Engine(model, tok, slots=2, pack_weights=False).start()
    with ServerThread(create_app(engine, load_chat_template(chat_dir, tok), "tiny")) as srv:
        yield srv
    engine.stop()


def validate_call(call, tools=TOOLS):
    jsonschema = pytest.importorskip("jsonschema")
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_server_tool_calls_with_the_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=limit(120))
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    validate_call(choice.message.tool_calls[0])
    named = {"type": "function", "function": {"name": "add"}}
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                       max_tokens=150, temperature=1.0, seed=7)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and call.type == "function"
    validate_call(call)
    # streamed: the call arrives as a tool_calls delta, the stream ends with finish_reason tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=150,
                                                 tool_choice=named, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "add" and deltas[0].id.startswith("call_")
    assert json.loads(deltas[0].function.arguments).keys() == {"a", "b"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # the call and its result go back into the conversation; auto and none answer (the random model writes text)
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    for choice_ in ("auto", "none"):
        r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice=choice_,
                                           max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        if choice_ == "none":
            assert r.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, max_tokens=5)
    assert e.value.body["param"] == "response_format"


OPENAI_RECORD = {"tools": TOOLS, "messages": CONVERSATION[1:6]}
SHAREGPT_RECORD = {  # LLaMA-Factory's layout of the same conversation
    "tools": json.dumps([t["function"] for t in TOOLS]),
    "conversations": [
        {"from": "human", "value": CONVERSATION[1]["content"]},
        {"from": "function_call", "value": json.dumps([
            {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
            {"name": "add", "arguments": {"a": 2, "b": 3}}])},
        {"from": "observation", "value": "sunny, 21"},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": CONVERSATION[5]["content"]}]}


def test_finetuning_records_with_tool_calls_train_the_calls_and_not_the_results(folder, tmp_path):
    from transformers import AutoTokenizer

    from common.tensors import IGNORE_INDEX
    from finetune.data import BadRecord, build_sample, to_messages
    from finetune.export import add_chat_template

    base, _, _, tok = folder
    messages = to_messages(OPENAI_RECORD)
    assert to_messages(SHAREGPT_RECORD) == messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    template = templates.get_template("chatml")
    sample, _ = build_sample(templates.encode_turns(template, tok, messages), 4096, "truncate", False, False)
    runs, current = [], []
    for label in sample.labels.tolist() + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            runs, current = runs + ([current] if current else []), []
        else:
            current.append(label)
    assert [tok.decode(r[:-1]) for r in runs] == [messages[2]["content"], messages[4]["content"]]
    assert all(r[-1] == tok.eos_id for r in runs)
    assert '{"name": "add", "arguments": {"a": 2, "b": 3}}' in messages[2]["content"]
    assert "sunny, 21" not in tok.decode([t for t in sample.labels.tolist() if t != IGNORE_INDEX])
    # the exported folder's template with tools= gives the training tokens
    hf_dir = tmp_path / "hf"
    shutil.copytree(base, hf_dir)
    add_chat_template(hf_dir, template.jinja())
    hf = AutoTokenizer.from_pretrained(hf_dir)
    ids = hf.apply_chat_template(OPENAI_RECORD["messages"], tools=TOOLS, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == sample.ids.tolist()
    for bad in ({"tools": "[oops", "messages": OPENAI_RECORD["messages"]},
                {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "nope"}]},
                {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                                 "tool_calls": [{"function": {}}]}]}):
        with pytest.raises(BadRecord):
            to_messages(bad)


@pytest.mark.slow  # fine-tunes the debug model on the synthetic tool-call set (a few minutes on 2 cores)
def test_a_model_fine_tuned_on_tool_calls_serves_them_to_the_openai_client(tmp_path):
    """data/tool_calls/make_tool_calls.py -> finetune/train.py (chatml) -> finetune.export -> the server: with
    tool_choice required the openai client reads tool_calls whose arguments parse as JSON and validate; what
    tool_choice auto gives is recorded, not asserted (see docs/inference.md)."""
    import subprocess
    import sys

    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from fixtures_finetune import REPO, TINY_SFT, run_finetune, tiny_hf_model, train_tokenizer
    from finetune.export import main as export_main
    from inference.chat import Chat
    from inference.server import create_app

    subprocess.run([sys.executable, str(REPO / "data" / "tool_calls" / "make_tool_calls.py"), "--out_dir",
                    str(tmp_path / "data"), "--records", "120"], check=True, timeout=limit(60))
    tools = [json.loads(line) for line in (tmp_path / "data" / "tool_calls.jsonl").read_text().splitlines()][0][
        "tools"]
    base = tiny_hf_model(tmp_path, train_tokenizer(tmp_path))
    args = [*TINY_SFT, f"model_path={base}", f"run_dir={tmp_path / 'run'}", "template=chatml", "seq_len=1000",
            f"data_files=[{tmp_path / 'data' / 'tool_calls.jsonl'}, {tmp_path / 'data' / 'tool_calls_sharegpt.json'}]",
            "max_steps=300", "eval_interval=300", "save_interval=300", "lr=3e-3"]
    result = run_finetune(args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "240 records -> 240 samples" in result.stdout
    export_main(["--run_dir", str(tmp_path / "run"), "--output_dir", str(tmp_path / "hf")])

    chat = Chat.load(str(tmp_path / "hf"), slots=2)
    try:
        with ServerThread(create_app(chat.engine, chat.template, "tuned")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=limit(120))
            seen = {}
            for question in ["What is the weather in Paris?", "What is 12 plus 30?", "“猫”的英文是什么？"]:
                messages = [{"role": "user", "content": question}]
                r = client.chat.completions.create(model="tuned", messages=messages, tools=tools,
                                                   tool_choice="required", max_tokens=60)
                call = r.choices[0].message.tool_calls[0]
                tool = next(t for t in tools if t["function"]["name"] == call.function.name)
                jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
                auto = client.chat.completions.create(model="tuned", messages=messages, tools=tools,
                                                      max_tokens=60, temperature=0)
                # streamed (greedy, the same reply): the same content, or the same calls as tool_calls deltas
                chunks = [c for c in client.chat.completions.create(model="tuned", messages=messages, tools=tools,
                                                                    max_tokens=60, temperature=0, stream=True)
                          if c.choices]
                streamed = [(d.function.name, json.loads(d.function.arguments))
                            for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
                message = auto.choices[0].message
                assert streamed == [(t.function.name, json.loads(t.function.arguments))
                                    for t in message.tool_calls or []]
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == (message.content or "")
                assert chunks[-1].choices[0].finish_reason == auto.choices[0].finish_reason
                seen[question] = (call.function.name, call.function.arguments, auto.choices[0].finish_reason,
                                  auto.choices[0].message.tool_calls[0].function.name
                                  if auto.choices[0].message.tool_calls else auto.choices[0].message.content)
            print("tool calls of the tuned debug model:", json.dumps(seen, ensure_ascii=False))
    finally:
        chat.close()


def test_forced_calls_resolve_the_defs_of_pydantic_schemas(folder):
    pytest.importorskip("llguidance")
    import torch

    from inference.constrained import Constraint
    from inference.tools import forced_call_grammar
    from model.generate import generate_ragged

    _, _, model, tok = folder
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
             "required": ["x", "y"], "additionalProperties": False}
    move = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"],
        "additionalProperties": False, "$defs": {"Point": point}}}}
    prompt = [tok.encode("the city", bos=True)]
    named = {"type": "function", "function": {"name": "move"}}
    for seed, choice in enumerate(["required", named, named]):
        grammar = forced_call_grammar(check_tools({"tools": [move, ADD], "tool_choice": choice}))
        constraint = Constraint(tok, model.config.vocab_size, grammar)
        out = generate_ragged(model, prompt, 120, eos_id=tok.eos_id, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed), constraints=[constraint])
        _, calls = parse_tool_calls(tok.decode(out[0]), [move, ADD])
        assert constraint.done and len(calls) == 1
        arguments = json.loads(calls[0]["function"]["arguments"])
        assert calls[0]["function"]["name"] == "move" or choice == "required"
        if calls[0]["function"]["name"] == "move":
            assert set(arguments) == {"to"} and set(arguments["to"]) == {"x", "y"}
    other = {"type": "function", "function": {"name": "jump", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "$defs": {"Point": {"type": "string"}}}}}
    with pytest.raises(ToolError, match="Point"):
        forced_call_grammar(check_tools({"tools": [move, other], "tool_choice": "required"}))
