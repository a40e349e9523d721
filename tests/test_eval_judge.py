"""Judged open-question evaluation: score parsing, BELLE's judge input, chat templates, batched generation, and the
whole command against a local fake judge (http.server on 127.0.0.1) that returns known scores."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from fixtures_eval import eval_assets  # noqa: F401  (pytest fixture)

from common.errors import UserError
from evaluation import judge
from evaluation.backends import load
from evaluation.generation import encode_prompts, question_template
from model import Transformer
from model.generate import generate_ragged
from tokenizer import Tokenizer


@pytest.mark.parametrize("reply, score", [
    ("得分: 0.5", 0.5), ("得分：0.5", 0.5), ("得分:1\n理由：完全正确", 1.0), ("score: 1", 1.0),
    ("Score: 0.8. The answer is mostly right.", 0.8), ("The score is 0.3", 0.3), ("0.5分", 0.5),
    ("**得分**：0.7", 0.7), ("得分为0.6分", 0.6), ("得分是 0", 0.0), ("满分为1分，这个回答我给0.5分", 0.5),
    ("得分：１", 1.0), ("得分：０．５", 0.5), ("评分: 8/10", 0.8), ("Rating: 0.9/1", 0.9), ("得分: 80%", 0.8),
    ("模型回答得分：0分。理由：答非所问", 0.0), ("分数：.75", 0.75),
    ("这个回答很好", None), ("得分: 5", None), ("满分为1分，最低分为0分。回答错误。", None), ("", None),
])
def test_score_parsing_on_the_formats_judges_write(reply, score):
    assert judge.parse_score(reply) == score


def test_judge_input_is_belles_text():
    with_ref = judge.judge_prompt("指令。", "open qa", "问题？", "标准", "回答")
    assert with_ref == "指令。 问题？ 标准回答:标准  模型回答：' 回答'。请针对模型回答给出得分，顺便给出理由："
    no_ref = judge.judge_prompt("指令。", "rewrite", "问题？", "标准", "回答")
    assert no_ref == "指令。 问题？  模型回答： '回答'。请针对模型回答给出得分，顺便给出理由："
    assert judge.class_key("closed\xa0qa") == judge.class_key("closed QA") == "closed qa"


def test_chat_template_renders_as_transformers_does(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
                "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    RawTokenizer(WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": template}))
    hf = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "你好，世界"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours = question_template(folder, None)
    assert not ours.is_fallback and ours.render(messages) == expected == "<s><|user|>\n你好，世界\n<|assistant|>\n"
    # Without a template: the one Human/Assistant fallback (tokenizer/chat_template.py), with no special tokens known
    assert question_template(tmp_path, None).render([{"role": "user", "content": "问"}]) == "Human: 问\nAssistant:"


def test_chat_prompts_of_a_sentencepiece_tokenizer_get_special_token_ids(eval_assets, tmp_path):  # noqa: F811
    """A template's "<s>" is the BOS id, not the text "<s>" (which SentencePiece alone would make of it)."""
    tok = Tokenizer(eval_assets["tokenizer"])
    bos, eos = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos,
        "chat_template": "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"}))
    template = question_template(tmp_path, tok)
    [ids] = encode_prompts(tok, template, ["法律 law"])
    assert ids == [tok.bos_id] + tok.encode("[INST] 法律 law [/INST]")


def test_batched_generation_equals_one_prompt_at_a_time(eval_assets):  # noqa: F811
    model = Transformer.from_hf(eval_assets["model"]).eval()
    tok = Tokenizer(eval_assets["tokenizer"])
    questions = ["法律", "Which law of energy applies here?", "考试数学物理化学", "A"]
    prompts = encode_prompts(tok, question_template(Path("/nonexistent"), tok), questions)
    assert len({len(p) for p in prompts}) == 4  # ragged
    batched = generate_ragged(model, prompts, 12, eos_id=None)
    for p, got in zip(prompts, batched):
        alone = model.generate(torch.tensor([p]), 12)[0, len(p):].tolist()
        assert got == alone and len(got) == 12
    # an EOS ends a row early: pretend the 3rd generated token of the first prompt is EOS
    eos = batched[0][2]
    stopped = generate_ragged(model, prompts, 12, eos_id=eos)
    assert stopped[0] == batched[0][:batched[0].index(eos)]
    for got, full in zip(stopped, batched):
        assert got == (full[:full.index(eos)] if eos in full else full)


# --- the command against a fake judge ---------------------------------------------------------------------------

EVAL_SET = [
    {"question": "Q1 什么是法律？", "std_answer": "规则。", "class": "open qa"},
    {"question": "Q2 一加一？", "std_answer": "二", "class": "math"},
    {"question": "Q3 改写这句话", "std_answer": "改写后", "class": "rewrite"},
    {"question": "Q4 再问一个", "std_answer": "答", "class": "open qa"},
    {"question": "Q5 数学题", "std_answer": "三", "class": "math"},
]
PROMPTS = [{"class": "open QA", "prompt": "开放问答评分。"}, {"class": "math", "prompt": "数学评分。"},
           {"class": "rewrite", "prompt": "改写评分。"}]
# what the fake judge answers for each question, call after call
SCRIPT = {"Q1": ["得分: 1"], "Q2": ["得分：0.5\n理由：部分正确"], "Q3": ["我无法判断", "0分"],
          "Q4": ["没有分数", "还是没有"], "Q5": ["score: 0.25"]}


class FakeJudge:
    def __init__(self, mode: str = "script"):
        self.mode, self.requests, self.calls = mode, [], {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                status = 200
                if outer.mode == "garbage":
                    data = b"<html>not json</html>"
                elif outer.mode == "busy":
                    data, status = b"overloaded", 503
                else:
                    content = body["messages"][0]["content"]
                    qid = next(k for k in SCRIPT if f" {k} " in content)
                    n = outer.calls[qid] = outer.calls.get(qid, 0) + 1
                    reply = SCRIPT[qid][min(n, len(SCRIPT[qid])) - 1]
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    servers = []

    def make(mode="script"):
        servers.append(FakeJudge(mode))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def write_eval_files(tmp_path):
    eval_set, prompts = tmp_path / "eval_set.jsonl", tmp_path / "prompts.jsonl"
    eval_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EVAL_SET), encoding="utf-8")
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PROMPTS), encoding="utf-8")
    return eval_set, prompts


def judge_argv(assets, tmp_path, url, *extra):
    eval_set, prompts = write_eval_files(tmp_path)
    return ["--model", str(assets["model"]), "--eval_set", str(eval_set), "--judge_prompts", str(prompts),
            "--output_dir", str(tmp_path / "out"), "--judge_base_url", url, "--judge_model", "fake-judge",
            "--max_new_tokens", "8", "--batch_size", "2", "--judge_retries", "1", "--judge_retry_wait", "0",
            "--judge_concurrency", "2", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fake_judge_end_to_end(eval_assets, tmp_path, fake_judge, monkeypatch, capsys):  # noqa: F811
    server = fake_judge()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge.main(judge_argv(eval_assets, tmp_path, server.url))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == {
        "open qa": {"score": 1.0, "count": 2, "scored": 1, "unscored": 1},
        "math": {"score": 0.375, "count": 2, "scored": 2, "unscored": 0},
        "rewrite": {"score": 0.0, "count": 1, "scored": 1, "unscored": 0}}
    assert results["overall"]["score"] == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)
    assert results["overall"]["class_average"] == pytest.approx((1 + 0.375 + 0) / 3)
    assert "average (per answer)" in capsys.readouterr().out

    # every exchange saved: one each, plus the retries of the unparsable Q3 and Q4
    exchanges = read_jsonl(out / "judgments.jsonl")
    assert len(exchanges) == 7 == len(server.requests)
    assert sorted((e["index"], e["attempt"]) for e in exchanges) == [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (3, 2),
                                                                     (4, 1)]
    assert all(path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "fake-judge"
               and body["temperature"] == 0.0 for path, auth, body in server.requests)
    answers = read_jsonl(out / "answers.jsonl")[1:]
    q1 = next(e for e in exchanges if e["index"] == 0)
    assert q1["request"]["messages"][0]["content"] == judge.judge_prompt(
        "开放问答评分。", "open qa", EVAL_SET[0]["question"], EVAL_SET[0]["std_answer"], answers[0]["answer"])
    assert [a["question"] for a in answers] == [r["question"] for r in EVAL_SET]
    assert all(0 < a["new_tokens"] <= 8 for a in answers)

    # a re-run asks the judge nothing it already settled, and reports the same scores
    judge.main(judge_argv(eval_assets, tmp_path, server.url))
    assert len(server.requests) == 7 and "reusing 5 judgments" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["classes"] == results["classes"]
    # a judging cut short: only the open requests are sent again
    lines = (out / "judgments.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["index"] != 1]
    (out / "judgments.jsonl").write_text("\n".join(kept) + "\n" + lines[-1][:10], encoding="utf-8")
    judge.main(judge_argv(eval_assets, tmp_path, server.url))
    assert len(server.requests) == 8 and server.requests[-1][2]["messages"][0]["content"].find(" Q2 ") > 0
    assert json.loads((out / "results.json").read_text())["classes"]["math"]["score"] == 0.375


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_or_garbage_judge_fails_clearly_and_keeps_the_answers(eval_assets, tmp_path, fake_judge,
                                                                           capsys):  # noqa: F811
    with pytest.raises(SystemExit) as e:
        judge.main(judge_argv(eval_assets, tmp_path, closed_port_url()))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "error: judge endpoint" in err and "failed after 2 tries" in err
    assert "ConnectError" in err and "answers are kept in" in err
    out = tmp_path / "out"
    answers = (out / "answers.jsonl").read_text()
    assert len(answers.splitlines()) == 1 + len(EVAL_SET) and not (out / "results.json").exists()

    garbage = fake_judge("garbage")
    with pytest.raises(SystemExit):
        judge.main(judge_argv(eval_assets, tmp_path, garbage.url))
    err = capsys.readouterr().err
    assert "reusing the 5 answers" in err and "not a chat completion" in err and "failed after 2 tries" in err

    # A judge that stays busy (HTTP 503) is not the user's mistake: the error keeps its traceback (not one line),
    # still says the answers are kept, and is not a UserError.
    busy = fake_judge("busy")
    with pytest.raises(judge.JudgeUnavailable, match="HTTP 503.*answers are kept in") as e:
        judge.main(judge_argv(eval_assets, tmp_path, busy.url))
    assert not isinstance(e.value, UserError) and len(busy.requests) >= 2  # each request tried twice
    assert "error:" not in capsys.readouterr().err

    good = fake_judge()
    judge.main(judge_argv(eval_assets, tmp_path, good.url))
    assert "reusing the 5 answers" in capsys.readouterr().err
    assert (out / "answers.jsonl").read_text() == answers and (out / "results.json").exists()

    # other generation settings do not silently reuse answers made with different ones
    with pytest.raises(SystemExit):
        judge.main(judge_argv(eval_assets, tmp_path, good.url, "--max_new_tokens", "4"))
    assert "holds answers for other settings" in capsys.readouterr().err


def test_bad_eval_files_fail_clearly(eval_assets, tmp_path, capsys):  # noqa: F811
    argv = judge_argv(eval_assets, tmp_path, "http://127.0.0.1:9/v1")
    eval_set = tmp_path / "eval_set.jsonl"
    eval_set.write_text('{"question": "q", "std_answer": "a", "class": "math"}\n{"question": "q", "class": "math"}\n')
    with pytest.raises(SystemExit):
        judge.main(argv)
    assert f"error: {eval_set}, line 2: missing or non-text field(s) std_answer" in capsys.readouterr().err
    eval_set.write_text('{"question": "q", "std_answer": "a", "class": "poetry"}\n')
    with pytest.raises(SystemExit):
        judge.main(argv)
    assert "line 1: class 'poetry' has no grading instruction" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generation_through_transformers_for_non_llama_models(eval_assets, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from tokenizer.hf import save_hf_tokenizer

    folder = tmp_path / "qwen2"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=256)).save_pretrained(folder)
    save_hf_tokenizer(eval_assets["tokenizer"], tmp_path / "tok")
    AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(folder)
    loaded = load(folder, None, "cpu", "float32")
    assert loaded.backend == "transformers"
    from evaluation.generation import generate_answers
    from model.generate import SamplingParams

    template = question_template(folder, loaded.tokenizer)
    records = generate_answers(loaded, template, ["法律", "Which law applies here?"],
                               SamplingParams(max_tokens=5), batch_size=2)
    prompts = encode_prompts(loaded.tokenizer, template, ["法律", "Which law applies here?"])
    for p, r in zip(prompts, records):  # left padding in the batch changes nothing: each alone, greedy
        alone = loaded.model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False,
                                      suppress_tokens=list(range(600, 640)))[0, len(p):].tolist()
        assert r["new_tokens"] == 5 and r["answer"] == loaded.tokenizer.decode(alone).strip()
