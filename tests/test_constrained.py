"""Constrained decoding (inference/constrained.py, llguidance): JSON output valid under a schema from the random
debug model, through the engine, generate_ragged and the server's response_format with the official `openai`
client."""
import json

import pytest
import torch

from fixtures_time import limit
from fixtures_inference import ServerThread, make_model_folder
from inference.engine import Engine
from inference.templates import load_chat_template
from model.generate import SamplingParams, generate_ragged

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from inference.constrained import Constraint, ConstraintError, token_bytes  # noqa: E402

# Bounded strings and arrays: a random model's reply must close within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "床前"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "kind", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("constrained"))


def test_token_bytes_map_sentencepiece_pieces_to_their_text(folder):
    *_, model, tok = folder
    table = token_bytes(tok, model.config.vocab_size + 3)
    assert table[tok.eos_id].startswith(b"\xff") and table[tok.bos_id].startswith(b"\xff")
    assert table[-1] == b""  # padding ids past the tokenizer: never allowed
    for i in range(tok.vocab_size):  # every ordinary piece's bytes are its text inside a longer text
        if not table[i].startswith(b"\xff") and not tok.sp.is_byte(i):
            assert tok.decode(tok.encode("x") + [i]).encode() == b"x" + table[i], i
    newline = tok.piece_to_id("<0x0A>")
    if newline != tok.unk_id:
        assert table[newline] == b"\n"


def test_engine_replies_validate_against_the_schema_greedy_and_sampled(folder):
    *_, model, tok = folder
    engine = Engine(model, tok, slots=3)
    prompt = tok.encode("the city of", bos=True)
    replies, reqs = {}, []
    for k, params in enumerate([SamplingParams(max_tokens=200), SamplingParams(max_tokens=200, temperature=1.0,
                                                                               seed=1),
                                SamplingParams(max_tokens=200, temperature=1.5, top_k=50, seed=2)]):
        reqs.append(engine.submit(prompt, params, lambda e, k=k: replies.__setitem__(k, replies.get(k, "") + e.text),
                                  constraint=Constraint.json_schema(tok, model.config.vocab_size, SCHEMA)))
    plain = engine.submit(prompt, SamplingParams(max_tokens=20), lambda e: None)
    while not all(r.done for r in reqs + [plain]):
        engine.step()
    for k, req in enumerate(reqs):
        assert req.finish_reason == "stop", (req.finish_reason, replies[k])
        jsonschema.validate(json.loads(replies[k]), SCHEMA)
    # an unconstrained request beside them decodes as it would alone
    alone = Engine(model, tok, slots=1)
    solo = alone.submit(prompt, SamplingParams(max_tokens=20), lambda e: None)
    while not solo.done:
        alone.step()
    assert plain.output_ids == solo.output_ids


def test_generate_ragged_rows_with_and_without_a_constraint(folder):
    *_, model, tok = folder
    prompts = [tok.encode("the city", bos=True), tok.encode("of the river and", bos=True)]
    free = generate_ragged(model, prompts, 30, eos_id=tok.eos_id)
    constraint = Constraint.json_schema(tok, model.config.vocab_size, SCHEMA)
    out = generate_ragged(model, prompts, 200, eos_id=tok.eos_id, constraints=[constraint, None])
    jsonschema.validate(json.loads(tok.decode(out[0])), SCHEMA)
    assert constraint.done
    assert out[1][:30] == free[1]
    any_object = Constraint.json_schema(tok, model.config.vocab_size, None)
    out = generate_ragged(model, prompts[:1], 200, eos_id=tok.eos_id, temperature=1.0,
                          generator=torch.Generator().manual_seed(0), constraints=[any_object])
    assert isinstance(json.loads(tok.decode(out[0])), dict)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_ragged(model, prompts, 3, constraints=[None])


def test_a_schema_the_grammar_engine_refuses_is_a_constraint_error(folder):
    *_, model, tok = folder
    with pytest.raises(ConstraintError, match="schema"):
        Constraint.json_schema(tok, model.config.vocab_size, {"type": "nonsense"})


def test_response_format_with_the_openai_client(folder):
    openai = pytest.importorskip("openai")
    from inference.server import create_app

    _, chat_dir, model, tok = folder
    engine = Engine(model, tok, slots=2).start()
    app = create_app(engine, load_chat_template(chat_dir, tok), "tiny")
    try:
        with ServerThread(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=limit(120))
            messages = [{"role": "user", "content": "describe a pet"}]
            fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=200, response_format=fmt)
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            # streamed, sampled: the deltas join to a valid document
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=200, response_format=fmt, stream=True,
                temperature=1.0, seed=3) if c.choices)
            jsonschema.validate(json.loads(text), SCHEMA)
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=200,
                                               response_format={"type": "json_object"}, temperature=0.7, seed=5)
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(r.choices[0].message.content), dict)
            else:  # out of tokens: a prefix of an object, as OpenAI's json_object may be
                assert r.choices[0].message.content.startswith("{")
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, response_format={
                    "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}})
            assert e.value.status_code == 400 and e.value.body["param"] == "response_format"
    finally:
        engine.stop()


def test_chat_and_finetune_generate_take_a_json_schema_file(folder, tmp_path, monkeypatch, capsys):
    import io
    import sys

    from finetune.generate import main as generate_main
    from inference.chat import main as chat_main

    _, chat_dir, *_ = folder
    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(SCHEMA))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    chat_main(["--model", str(chat_dir), "--max_new_tokens", "200", "--temperature", "0", "--json_schema",
               str(schema_file)])
    reply = capsys.readouterr().out.split(">>> ")[1].strip()
    jsonschema.validate(json.loads(reply), SCHEMA)

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["hello there", "the city of music"]))
    out = tmp_path / "answers.jsonl"
    generate_main(["--model", str(chat_dir), "--input", str(prompts), "--output", str(out), "--max_new_tokens",
                   "200", "--json_schema", str(schema_file), "--temperature", "1.0", "--seed", "0"])
    for line in out.read_text().splitlines():
        jsonschema.validate(json.loads(json.loads(line)["answer"]), SCHEMA)
    assert json.loads((tmp_path / "answers.jsonl.meta.json").read_text())["json_schema"] == SCHEMA
    capsys.readouterr()

    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    for value, says in [(str(tmp_path / "none.json"), "no such file"), (str(tmp_path / "bad.json"), "schema"),
                        (str(prompts), "schema")]:
        with pytest.raises(SystemExit) as e:
            chat_main(["--model", str(chat_dir), "--json_schema", value])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"error: --json_schema {value}: ") and err.count("\n") == 1
        assert says in err


def test_without_llguidance_the_error_says_how_to_install_it(folder, monkeypatch):
    import sys

    *_, model, tok = folder
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ConstraintError, match=r"pip install -e \.\[constrained\]"):
        Constraint.json_schema(tok, model.config.vocab_size, SCHEMA)
