"""GAOKAO-Bench and AGIEval: reading, exclusions, the seeded shot split, end-to-end runs, bad input."""
import json
from pathlib import Path

import pytest

from evaluation import evaluate_agieval, evaluate_gaokao
from evaluation.data import gaokao_options, read_agieval_jsonl, read_gaokao_json, read_jsonl, shot_split
from fixtures_eval import write_agieval_dir, write_gaokao_dir


def test_gaokao_reader_excludes_and_counts(tmp_path):
    root = write_gaokao_dir(tmp_path / "g")
    questions, excluded = read_gaokao_json(root / "2010-2022_Physics_MCQs.json")
    # items 3 and 7 have two answers, item 5 has "E"
    assert excluded == {"multi_answer": 2, "answer_outside_options": 1}
    assert [q.index for q in questions] == [0, 1, 2, 4, 6, 8]
    assert all(q.answer in "ABCD" and all(q.choices) for q in questions)
    english, none = read_gaokao_json(root / "2010-2013_English_MCQs.json")
    assert len(english) == 9 and none == {}


def test_gaokao_options_parse():
    assert gaokao_options("题 A．一 B．二\nC. 三 D、四") == ("一", "二", "三", "四")
    assert gaokao_options("no options here, A．only one") is None


def test_agieval_reader(tmp_path):
    root = write_agieval_dir(tmp_path / "a")
    zh, ex = read_agieval_jsonl(root / "logiqa-zh.jsonl")
    assert ex == {"multi_answer": 1} and len(zh) == 8
    raw = [obj for _, obj in read_jsonl(root / "logiqa-zh.jsonl")]
    assert zh[0].question == raw[0]["passage"] + "\n" + raw[0]["question"]  # the passage joined
    assert zh[0].choices[0] == raw[0]["options"][0][3:]  # "(A)" taken off; the prompt writes "A. "
    lsat, ex = read_agieval_jsonl(root / "lsat-ar.jsonl")
    assert lsat == [] and ex == {"not_four_options": 9}


def test_shot_split_is_seeded_and_disjoint(tmp_path):
    questions, _ = read_gaokao_json(write_gaokao_dir(tmp_path / "g") / "2010-2013_English_MCQs.json")
    a = shot_split(questions, 5, 1234, "x")
    assert a == shot_split(questions, 5, 1234, "x")
    assert [q.index for q in a[0]] != [q.index for q in shot_split(questions, 5, 99, "x")[0]]
    assert len(a[0]) == 5 and len(a[1]) == 4
    assert {q.index for q in a[0]}.isdisjoint(q.index for q in a[1])
    assert [q.index for q in a[1]] == sorted(q.index for q in a[1])


def run_gaokao(assets, data, out, *extra):
    evaluate_gaokao.main(["--model", str(assets["model"]), "--data_dir", str(data), "--output_dir", str(out),
                          "--batch_size", "3", *extra])
    return json.loads((out / "results.json").read_text())


def test_gaokao_end_to_end(eval_assets, tmp_path, capsys):
    data = write_gaokao_dir(tmp_path / "g")
    r = run_gaokao(eval_assets, data, tmp_path / "o1")
    assert r["benchmark"] == "gaokao" and r["complete"] is False  # 2 of the 9 files
    assert r["missing_subjects"] and "2010-2022_Biology_MCQs" in r["missing_subjects"]
    assert r["excluded"] == {"2010-2022_Physics_MCQs": {"multi_answer": 2, "answer_outside_options": 1}}
    assert r["excluded_total"] == {"answer_outside_options": 1, "multi_answer": 2}
    assert r["subjects"]["2010-2013_English_MCQs"]["count"] == 4 and r["subjects"]["2010-2022_Physics_MCQs"]["count"] == 1
    assert r["groups"]["GAOKAO-English"]["accuracy"] == r["subjects"]["2010-2013_English_MCQs"]["accuracy"]
    ids = r["shot_split"]["shot_ids"]
    items, _ = read_gaokao_json(data / "2010-2013_English_MCQs.json")
    assert ids["2010-2013_English_MCQs"] == [q.id for q in shot_split(items, 5, 1234, "2010-2013_English_MCQs")[0]]
    preds = [json.loads(line) for line in (tmp_path / "o1" / "predictions.jsonl").read_text().splitlines()]
    shot_idx = {int(i) for i in ids["2010-2013_English_MCQs"]}
    assert not shot_idx & {p["index"] for p in preds if p["subject"] == "2010-2013_English_MCQs"}
    assert "answer key outside the options" in capsys.readouterr().err
    again = run_gaokao(eval_assets, data, tmp_path / "o2")
    assert again["shot_split"] == r["shot_split"] and again["subjects"] == r["subjects"]
    other = run_gaokao(eval_assets, data, tmp_path / "o3", "--seed", "7")
    assert other["shot_split"]["shot_ids"] != r["shot_split"]["shot_ids"]


def test_agieval_end_to_end_and_shots_dropped(eval_assets, tmp_path, capsys):
    data = write_agieval_dir(tmp_path / "a")
    out = tmp_path / "o"
    evaluate_agieval.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir", str(out),
                           "--tasks", "logiqa-zh", "sat-math", "lsat-ar", "--shots", "2"])
    r = json.loads((out / "results.json").read_text())
    assert set(r["subjects"]) == {"logiqa-zh", "sat-math"} and r["complete"] is False
    assert r["excluded"]["lsat-ar"]["not_four_options"] == 9
    assert set(r["languages"]) == {"Chinese", "English"}
    assert r["settings"]["answer_tokens"][0] in ("A", "▁A")
    # A context that cannot hold the shots: they are dropped, counted and said.
    evaluate_agieval.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir",
                           str(tmp_path / "short"), "--tasks", "sat-math", "--shots", "5", "--max_length", "90"])
    short = json.loads((tmp_path / "short" / "results.json").read_text())
    assert short["subjects"]["sat-math"]["shots_dropped"] == 4 and short["shots"] != 5
    assert "dropped shots" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [
    ('{"passage": null, "question": "q", "options": ["(A)a","(B)b","(C)c","(D)d"], "label": "A"}\n{bad json\n',
     "sat-math.jsonl, line 2: malformed JSON"),
    ('{"passage": null, "options": ["(A)a","(B)b","(C)c","(D)d"], "label": "A"}\n',
     "sat-math.jsonl, line 1: missing field 'question'"),
    ('{"passage": null, "question": 3, "options": [], "label": "A"}\n',
     "sat-math.jsonl, line 1: field 'question' must be str"),
])
def test_agieval_bad_input_one_line(eval_assets, tmp_path, capsys, content, expected):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "sat-math.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        evaluate_agieval.main(["--model", str(eval_assets["model"]), "--data_dir", str(data), "--output_dir",
                               str(tmp_path / "o"), "--tasks", "sat-math"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1] and err[-1].startswith("error:")
    assert not (tmp_path / "o" / "results.json").exists()


def test_gaokao_wrong_shape_names_field(eval_assets, tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "2010-2013_English_MCQs.json").write_text('{"keywords": "x", "examples": []}')
    with pytest.raises(SystemExit):
        run_gaokao(eval_assets, data, tmp_path / "o")
    assert "'example' list" in capsys.readouterr().err.strip().splitlines()[-1]


def test_gaokao_quantize_flag_reaches_the_model(eval_assets, tmp_path):
    """The new evaluators open the model through the same function as the others, so --quantize applies."""
    data = write_gaokao_dir(tmp_path / "g")
    r = run_gaokao(eval_assets, data, tmp_path / "q", "--quantize", "int8", "--subjects", "2010-2013_English_MCQs")
    assert r["settings"]["quantize"] == "int8" and r["subjects"]["2010-2013_English_MCQs"]["count"] == 4
