"""Chat templates (rendered exactly as transformers' apply_chat_template), the chat API and the chat CLI."""
import io
import sys

import pytest
import torch

from fixtures_inference import make_model_folder
from inference.chat import Chat, main as chat_main, repl
from inference.engine import Engine
from inference.templates import FALLBACK_STOP, load_chat_template

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there 床前明月光"},
    {"role": "assistant", "content": "Hi! What now?"},
    {"role": "user", "content": "  the city of  "},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_and_encodes_like_transformers(folder, add_generation_prompt):
    _, chat_dir, _, tok = folder
    hf = transformers.AutoTokenizer.from_pretrained(chat_dir)
    template = load_chat_template(chat_dir, tok)
    assert not template.is_fallback
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(MESSAGES, add_generation_prompt) == text
    # The exported tokenizer keeps "<s>" in documents as text (split_special_tokens); the ids of a rendered
    # template are what transformers gives when the template's special tokens are read as special.
    expected = hf(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]
    ids = template.encode(MESSAGES, add_generation_prompt)
    assert ids == expected and ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1


def test_special_token_text_in_a_message_stays_text(folder):
    _, chat_dir, _, tok = folder
    template = load_chat_template(chat_dir, tok)
    ids = template.encode([{"role": "user", "content": "a </s> b <s>"}])
    assert ids.count(tok.eos_id) == 0 and ids.count(tok.bos_id) == 1
    typed = [{"role": "user", "content": "a </s> b <s> c <unk>"}, {"role": "assistant", "content": "ok</s>"},
             {"role": "user", "content": "again <s>"}]
    ids = template.encode(typed)  # only the template's own BOS (one per user turn) and EOS (after the reply)
    assert (ids.count(tok.bos_id), ids.count(tok.eos_id), ids.count(tok.unk_id)) == (2, 1, 0)
    assert "a </s> b <s> c <unk>" in tok.decode(ids) and "again <s>" in tok.decode(ids)


def test_openai_message_forms_are_accepted(folder):
    _, chat_dir, _, tok = folder
    template = load_chat_template(chat_dir, tok)
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert template.render(parts) == template.render(plain)


def test_base_model_falls_back_to_plain_template(folder):
    base, _, _, tok = folder
    template = load_chat_template(base, tok)
    assert template.is_fallback and template.stop == FALLBACK_STOP
    text = template.render(MESSAGES)
    assert text == ("<s>Be brief.\n\nHuman: Hello there 床前明月光\nAssistant: Hi! What now?</s>\n"
                    "Human:   the city of  \nAssistant:")
    assert template.encode(MESSAGES)[0] == tok.bos_id


def test_template_errors_are_value_errors(folder, tmp_path):
    _, chat_dir, _, tok = folder
    template = load_chat_template(chat_dir, tok)
    with pytest.raises(ValueError, match="chat template error: Conversation roles must alternate"):
        template.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be an object with a role"):
        template.render([{"role": "robot", "content": "x"}])
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% for m in messages %}"}')
    with pytest.raises(ValueError, match="tokenizer_config.json: the chat template does not compile"):
        load_chat_template(tmp_path, tok)


def test_chat_api_reply_is_the_greedy_continuation(folder):
    _, chat_dir, model, tok = folder
    template = load_chat_template(chat_dir, tok)
    chat = Chat(Engine(model, tok, slots=1).start(), template)
    try:
        messages = MESSAGES[:2]
        reply = chat.chat(messages, temperature=0.0, max_tokens=20)
        ids = template.encode(messages)
        ref = model.generate(torch.tensor([ids]), 20, eos_id=tok.eos_id)[0, len(ids):].tolist()
        assert reply == tok.decode([i for i in ref if i != tok.eos_id]).strip()
        pieces = list(chat.stream(messages, temperature=0.0, max_tokens=20))
        assert len(pieces) > 1 and "".join(pieces).strip() == reply
        with pytest.raises(ValueError, match="temperature"):
            chat.chat(messages, temperature=-1.0)
    finally:
        chat.close()


class RecordingChat:
    def __init__(self):
        self.calls = []

    def stream(self, messages):
        self.calls.append([dict(m) for m in messages])
        yield from (" reply", f" {len(self.calls)}")


def test_repl_keeps_history_and_handles_commands():
    chat = RecordingChat()
    stdin = io.StringIO("hello\nagain\n/reset\n/system Be brief.\nhi\n/quit\nnever read\n")
    out = io.StringIO()
    repl(chat, None, stdin, out)
    first, second, third = chat.calls
    assert first == [{"role": "user", "content": "hello"}]
    assert second == [*first, {"role": "assistant", "content": "reply 1"}, {"role": "user", "content": "again"}]
    assert third == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert "reply 1" in out.getvalue() and "(conversation reset)" in out.getvalue()


def test_chat_cli_streams_a_reply_and_errors_are_one_line(folder, tmp_path, monkeypatch, capsys):
    _, chat_dir, _, _ = folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    chat_main(["--model", str(chat_dir), "--max_new_tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and len(out) > len("\n>>> \n\n>>> ")
    with pytest.raises(SystemExit) as e:
        chat_main(["--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == f"error: {tmp_path / 'none'}: model directory not found\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    try:
        chat_main(["--model", str(chat_dir), "--quantize", "int8"])
    except SystemExit as e:  # until inference/quantize.py is merged: a one-line error, afterwards the chat runs
        err = capsys.readouterr().err
        assert e.code == 1 and err.startswith("error: --quantize int8") and err.count("\n") == 1


def test_one_fallback_template_for_every_stage(folder):
    """A model without a template gets the same Human/Assistant template in chat/server, in evaluation's answers and
    as fine-tuning's `plain` format."""
    from evaluation.generation import question_template
    from finetune.templates import get_template

    base, _, _, tok = folder
    chat, judged = load_chat_template(base, tok), question_template(base, tok)
    assert chat.is_fallback and judged.is_fallback and judged.stop == chat.stop == FALLBACK_STOP
    assert chat.source == judged.source == get_template("plain").jinja()
    assert judged.render(MESSAGES) == chat.render(MESSAGES)
