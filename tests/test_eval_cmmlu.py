"""CMMLU: the official prompt format byte for byte, the official rule for too-long prompts, the CLI end to end,
partial data folders, bad files; and models/tokenizers that are not ours: tokenizer.json-only folders and
non-LLaMA architectures through transformers."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_eval import CMMLU_FIXTURE_SUBJECTS, eval_assets, write_cmmlu_dir  # noqa: F401  (pytest fixture)

from evaluation import evaluate_cmmlu, evaluate_mmlu
from evaluation.backends import HFTokenizer, score_transformers
from evaluation.runner import load_data
from evaluation.data import Question, read_cmmlu_csv
from evaluation.scoring import build_requests, score_plain
from evaluation.subjects import CMMLU_SUBJECTS, cmmlu_groups
from model import Transformer
from tokenizer import Tokenizer
from tokenizer.hf import save_hf_tokenizer


def q(text, choices, answer):
    return Question(0, "0", text, tuple(choices), answer)


SHOTS = [q("甲是什么", ["一", "二", "三", "四"], "B"), q("乙，\n第二行", ["x", "y, z", "w", "v"], "D")]
ITEMS = [q("丙？", ["1", "2", "3", "4"], "A")]


def test_prompt_is_the_official_format_byte_for_byte():
    p = evaluate_cmmlu.subject_prompts("agronomy", SHOTS, ITEMS)
    expected = ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
                "题目：甲是什么\nA. 一\nB. 二\nC. 三\nD. 四\n答案是：B\n\n"
                "题目：乙，\n第二行\nA. x\nB. y, z\nC. w\nD. v\n答案是：D\n\n"
                "题目：丙？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")
    assert p.prompt(0, 2) == expected
    assert p.prompt(0, 0) == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：丙？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是："
    assert evaluate_cmmlu.header("high_school_physics") == "以下是关于高中物理学的单项选择题，请直接给出正确答案的选项。\n\n"


@pytest.mark.parametrize("header, item, shots, max_length, kept", [
    (10, 10, [5, 7, 7, 3], 100, [0, 1, 2, 3]),   # fits: 22 < 80
    (10, 10, [5, 7, 7, 3], 42, [0, 3]),          # 22 >= 22: both 7s go at once (ties removed together)
    (10, 10, [5, 7, 7, 3], 43, [0, 1, 2, 3]),    # 22 < 23
    (10, 10, [5, 7, 7, 3], 28, [3]),             # 22 >= 8, then 8 >= 8, then 3 < 8: the longest go first
    (10, 10, [5, 7, 7, 3], 23, []),              # ... and 3 >= 3: the last one goes too
    (10, 10, [5, 7, 7, 3], 20, []),              # header + question fill the context exactly: no shots left
    (10, 11, [5, 7, 7, 3], 20, None),            # header + question longer than the context: the question alone
    (10, 10, [], 50, []),
])
def test_official_shot_dropping_rule(header, item, shots, max_length, kept):
    assert evaluate_cmmlu.fit_shots(header, item, shots, max_length) == kept


def official_gen_prompt(tok: Tokenizer, subject, shots, item, k, max_length):
    """The official gen_prompt written out again (each piece encoded on its own, with BOS)."""
    head = evaluate_cmmlu.header(subject)
    end = evaluate_cmmlu.format_example(item, False)
    start_end = len(tok.encode(head, bos=True)) + len(tok.encode(end, bos=True))
    if start_end > max_length:
        return end
    examples = [(e, len(tok.encode(e, bos=True))) for e in (evaluate_cmmlu.format_example(s, True) for s in shots[:k])]
    while examples and sum(n for _, n in examples) >= max_length - start_end:
        longest = max(n for _, n in examples)
        examples = [e for e in examples if e[1] != longest]
    return head + "".join(e for e, _ in examples) + end


def test_requests_follow_the_official_rule_on_fixture_rows(eval_assets, tmp_path):  # noqa: F811
    tok = Tokenizer(eval_assets["tokenizer"])
    data = load_data(evaluate_cmmlu.CMMLU, write_cmmlu_dir(tmp_path / "cmmlu"), "test", list(CMMLU_FIXTURE_SUBJECTS), 5)
    seen_kept = set()
    for subject, (dev, items) in data.items():
        prompts = evaluate_cmmlu.subject_prompts(subject, dev, items)
        for max_length in (4096, 220, 160, 90, 40):
            reqs = evaluate_cmmlu.build_cmmlu_requests(tok, prompts, max_length, True)
            for i, req in enumerate(reqs):
                text = official_gen_prompt(tok, subject, dev, items[i], 5, max_length)
                expected = tok.encode(text, bos=True)
                assert list(req.tokens) == expected[-max_length:]
                assert req.truncated == (not text.startswith("以下是") or len(expected) > max_length)
                seen_kept.add((req.shots, req.truncated))
                assert req.choice_ids == tuple(tok.encode("答案是：" + x)[-1] for x in "ABCD")
    # the sizes above exercise all shots, some dropped, none, and the question alone
    assert {5, 0} <= {k for k, _ in seen_kept} and any(0 < k < 5 for k, _ in seen_kept) and (0, True) in seen_kept


def run_cmmlu(model, data, out, *extra):
    evaluate_cmmlu.main(["--model", str(model), "--data_dir", str(data), "--output_dir", str(out),
                         "--batch_size", "3", *extra])
    return json.loads((out / "results.json").read_text())


def test_cmmlu_end_to_end_partial_folder(eval_assets, tmp_path, capsys):  # noqa: F811
    data = write_cmmlu_dir(tmp_path / "cmmlu")
    results = run_cmmlu(eval_assets["model"], data, tmp_path / "out")
    err = capsys.readouterr().err
    assert "holds 3 of the 67 cmmlu subjects" in err and "missing, not evaluated: anatomy" in err
    assert results["benchmark"] == "cmmlu" and results["complete"] is False and results["headline"] == "macro"
    assert set(results["missing_subjects"]) == set(CMMLU_SUBJECTS) - set(CMMLU_FIXTURE_SUBJECTS)
    assert list(results["subjects"]) == sorted(CMMLU_FIXTURE_SUBJECTS)
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    for subject in CMMLU_FIXTURE_SUBJECTS:
        rows = [p for p in preds if p["subject"] == subject]
        answers = [x.answer for x in read_cmmlu_csv(data / "test" / f"{subject}.csv")]
        assert [p["answer"] for p in rows] == answers and [p["index"] for p in rows] == list(range(len(rows)))
        correct = sum(p["prediction"] == p["answer"] for p in rows)
        assert results["subjects"][subject]["correct"] == correct and results["subjects"][subject]["shots"] == 5
    acc = {s: r["accuracy"] for s, r in results["subjects"].items()}
    # agronomy: Other; chinese_history: Humanities and China specific; college_mathematics: STEM
    assert cmmlu_groups("chinese_history") == {"categories": ["Humanities", "China specific"]}
    assert results["categories"]["China specific"]["accuracy"] == pytest.approx(acc["chinese_history"])
    assert results["categories"]["Other"]["accuracy"] == pytest.approx(acc["agronomy"])
    assert results["overall"]["accuracy"] == pytest.approx(sum(acc.values()) / 3)
    assert results["settings"]["answer_tokens"] == ["A", "B", "C", "D"]
    assert results["settings"]["backend"] == "ours" and results["settings"]["prefix_cache"] is True

    # --subjects still picks explicitly (and a subject whose file is missing is then an error)
    picked = run_cmmlu(eval_assets["model"], data, tmp_path / "out2", "--subjects", "agronomy")
    assert list(picked["subjects"]) == ["agronomy"] and picked["complete"] is False
    assert picked["subjects"]["agronomy"] == results["subjects"]["agronomy"]
    with pytest.raises(SystemExit, match=r"anatomy\.csv: subject file not found"):
        run_cmmlu(eval_assets["model"], data, tmp_path / "out3", "--subjects", "anatomy")


@pytest.mark.parametrize("content, message", [
    (",Question,A,B,C,D\n0,q,a,b,c,d\n", "line 1: header ',Question,A,B,C,D' lacks column(s) Answer"),
    (",Question,A,B,D,Answer\n0,q,a,b,d,A\n", "lacks column(s) C"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", "line 3 (row 1): answer 'E' is not one of A, B, C, D"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d\n", "line 2 (row 0): expected 7 columns"),
])
def test_bad_cmmlu_file_names_file_and_line(eval_assets, tmp_path, content, message):  # noqa: F811
    data = write_cmmlu_dir(tmp_path / "cmmlu")
    bad = data / "test" / "chinese_history.csv"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        run_cmmlu(eval_assets["model"], data, tmp_path / "out")
    assert str(e.value).startswith(f"error: {bad}") and message in str(e.value)
    assert not (tmp_path / "out").exists()


def tokenizer_json_only(src_model: Path, tokenizer_model: Path, out: Path) -> Path:
    """The model folder with its tokenizer as transformers saves it (tokenizer.json, no tokenizer.model)."""
    from transformers import AutoTokenizer

    save_hf_tokenizer(tokenizer_model, out / "exported")
    shutil.copytree(src_model, out / "model")
    (out / "model" / "tokenizer.model").unlink()
    AutoTokenizer.from_pretrained(out / "exported").save_pretrained(out / "model")
    assert not (out / "model" / "tokenizer.model").exists() and (out / "model" / "tokenizer.json").exists()
    return out / "model"


def test_tokenizer_json_only_folder_gives_the_same_predictions(eval_assets, tmp_path):  # noqa: F811
    folder = tokenizer_json_only(eval_assets["model"], eval_assets["tokenizer"], tmp_path)
    data = write_cmmlu_dir(tmp_path / "cmmlu")
    def run_mmlu(model, out):
        evaluate_mmlu.main(["--model", str(model), "--data_dir", str(eval_assets["mmlu"]), "--output_dir", str(out),
                            "--subjects", "anatomy"])

    for name, run in (("cmmlu", lambda m, o: run_cmmlu(m, data, o)), ("mmlu", run_mmlu)):
        run(eval_assets["model"], tmp_path / f"{name}_sp")
        run(folder, tmp_path / f"{name}_json")
        sp = (tmp_path / f"{name}_sp" / "predictions.jsonl").read_text()
        js = (tmp_path / f"{name}_json" / "predictions.jsonl").read_text()
        assert sp == js, name
        settings = json.loads((tmp_path / f"{name}_json" / "results.json").read_text())["settings"]
        sp_settings = json.loads((tmp_path / f"{name}_sp" / "results.json").read_text())["settings"]
        assert settings["tokenizer_kind"] == "transformers" and sp_settings["tokenizer_kind"] == "sentencepiece"
        assert settings["answer_tokens"] == sp_settings["answer_tokens"] and settings["bos"] is True


def test_transformers_scoring_matches_our_model(eval_assets):  # noqa: F811
    """The plain transformers path against our own model on the same LLaMA weights and requests."""
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(eval_assets["tokenizer"])
    data = load_data(evaluate_mmlu.MMLU, eval_assets["mmlu"], "test", ["anatomy"], 5)
    dev, items = data["anatomy"]
    reqs = build_requests(tok, evaluate_mmlu.subject_prompts("anatomy", dev, items), 1024, True)
    ours = score_plain(Transformer.from_hf(eval_assets["model"]).eval(), reqs)
    hf = AutoModelForCausalLM.from_pretrained(eval_assets["model"], dtype=torch.float32).eval()
    theirs = score_transformers(hf, reqs)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_non_llama_model_runs_through_transformers(eval_assets, tmp_path, capsys):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "qwen2"
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    save_hf_tokenizer(eval_assets["tokenizer"], tmp_path / "tok")
    AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(folder)

    data = write_cmmlu_dir(tmp_path / "cmmlu")
    results = run_cmmlu(folder, data, tmp_path / "out", "--subjects", "agronomy")
    assert "through transformers, one prompt at a time" in capsys.readouterr().err
    s = results["settings"]
    assert s["backend"] == "transformers" and s["prefix_cache"] is False and "qwen2" in s["backend_note"]
    assert s["max_length"] == 512

    # the first question again, by hand: the official prompt, tokenized as the reference scripts do
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dev, items = load_data(evaluate_cmmlu.CMMLU, data, "test", ["agronomy"], 5)["agronomy"]
    text = evaluate_cmmlu.subject_prompts("agronomy", dev, items).prompt(0, 5)
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    letters = [hf_tok(text + x)["input_ids"][-1] for x in "ABCD"]
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[0, -1, letters], dim=-1).numpy()
    first = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(first["probs"], probs, atol=1e-5)
    assert first["prediction"] == "ABCD"[int(probs.argmax())]


def test_hf_tokenizer_wrapper_encodes_like_sentencepiece(eval_assets, tmp_path):  # noqa: F811
    save_hf_tokenizer(eval_assets["tokenizer"], tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").unlink()
    hf, sp = HFTokenizer(tmp_path / "tok"), Tokenizer(eval_assets["tokenizer"])
    texts = ["题目：甲\nA. 乙\n答案是：", "The answer is  A", " 前导空格"]
    assert hf.encode_batch(texts, bos=True) == sp.encode_batch(texts, bos=True)
    assert hf.adds_bos and (hf.bos_id, hf.eos_id) == (sp.bos_id, sp.eos_id)


def test_cmmlu_subject_table_is_the_published_one():
    assert len(CMMLU_SUBJECTS) == 67
    sizes: dict[str, int] = {}
    for subject in CMMLU_SUBJECTS:
        for cat in cmmlu_groups(subject)["categories"]:
            sizes[cat] = sizes.get(cat, 0) + 1
    # haonan-li/CMMLU categories.py: every subject counts towards the category of each of its subcategories
    assert sizes == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}
    assert CMMLU_SUBJECTS["chinese_driving_rule"] == ("中国驾驶规则", ["other", "china specific"])
