"""Evaluation input: CSV parsing in both official layouts, bad-input errors, subject tables, exact prompts."""
from pathlib import Path

import pytest

from evaluation import evaluate_mmlu, evaluate_zh
from evaluation.data import Question, read_ceval_csv, read_mmlu_csv, split_file
from evaluation.subjects import (CEVAL_CATEGORIES, CEVAL_HARD, CEVAL_SUBJECTS, MMLU_CATEGORIES, MMLU_SUBCATEGORIES,
                                 MMLU_SUBJECTS, ceval_groups, mmlu_groups)


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_mmlu_csv_quoted_newlines_crlf_and_text_kept_verbatim(tmp_path):
    data = (b'"Line one\r\nline two, with comma",None,0.50,"say ""hi""",4,B\r\n'
            b'\r\n'  # a blank line is not a row
            b'Plain question?,a,b,c,d, C \r\n')
    rows = read_mmlu_csv(write_bytes(tmp_path / "x_test.csv", data))
    assert rows == [
        Question(0, "0", "Line one\r\nline two, with comma", ("None", "0.50", 'say "hi"', "4"), "B"),
        Question(1, "1", "Plain question?", ("a", "b", "c", "d"), "C"),
    ]


def test_ceval_csv_header_layouts(tmp_path):
    dev = write_bytes(tmp_path / "dev.csv", "id,question,A,B,C,D,answer,explanation\r\n"
                      '7,"问题\r\n第二行",甲,乙,丙,丁,D,"1. 解释"\r\n'.encode())
    test = write_bytes(tmp_path / "test.csv", "\ufeffid,question,A,B,C,D\r\n3,题,a,b,c,d\r\n".encode())
    assert read_ceval_csv(dev, need_answer=True) == [Question(0, "7", "问题\r\n第二行", ("甲", "乙", "丙", "丁"), "D")]
    assert read_ceval_csv(test, need_answer=False) == [Question(0, "3", "题", ("a", "b", "c", "d"), None)]


@pytest.mark.parametrize("content, reader, expected", [
    (b"q,a,b,c,d,A\r\nq2,a,b,c,A\r\n", read_mmlu_csv, r"x\.csv, line 2 \(row 1\): expected 6 columns .* found 5"),
    (b'q,a,b,c,d,A\r\n"multi\r\nline",a,b,c,d,A,extra\r\n', read_mmlu_csv, r"line 2 \(row 1\): .* found 7"),
    (b'"q\r\n",a,b,c,d,A\r\nq,a,b,c,d,E\r\n', read_mmlu_csv, r"line 3 \(row 1\): answer 'E' is not one of A, B, C, D"),
    (b"", read_mmlu_csv, r"x\.csv: no questions"),
    (b'"unterminated,a,b,c,d,A\r\n', read_mmlu_csv, r"x\.csv, line \d+: malformed CSV"),
    (b"\xff\xfeq,a\r\n", read_mmlu_csv, r"x\.csv: not UTF-8"),
    (b"id,question,A,B,C\r\n1,q,a,b,c\r\n", lambda p: read_ceval_csv(p, False),
     r"line 1: header .* lacks column\(s\) D"),
    (b"id,question,A,B,C,D\r\n1,q,a,b,c,d\r\n", lambda p: read_ceval_csv(p, True), r"lacks column\(s\) answer"),
    (b"id,question,A,B,C,D,answer\r\n1,q,a,b,c,d,A\r\n2,q,a,b,c,d\r\n", lambda p: read_ceval_csv(p, True),
     r"line 3 \(row 1\): expected 7 columns"),
    (b"id,question,A,B,C,D,answer\r\n1,q,a,b,c,d,a\r\n", lambda p: read_ceval_csv(p, True), r"answer 'a' is not"),
    (b"id,question,A,B,C,D\r\n1,q,a,b,c,d\r\n1,q,a,b,c,d\r\n", lambda p: read_ceval_csv(p, False),
     r"line 3 \(row 1\): id '1' repeats row 0"),
])
def test_bad_rows_name_file_line_and_row(tmp_path, content, reader, expected):
    with pytest.raises(ValueError, match=expected):
        reader(write_bytes(tmp_path / "x.csv", content))


def test_missing_split_dir_and_subject_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test: split directory not found"):
        split_file(tmp_path, "test", "anatomy")
    (tmp_path / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"anatomy_test\.csv: subject file not found"):
        split_file(tmp_path, "test", "anatomy")


def test_subject_tables_match_the_published_ones():
    assert len(MMLU_SUBJECTS) == 57
    subcats = {s for subs in MMLU_SUBCATEGORIES.values() for s in subs}
    assert len(subcats) == 17 and subcats == {s for subs in MMLU_CATEGORIES.values() for s in subs}
    assert list(MMLU_CATEGORIES) == ["STEM", "humanities", "social sciences", "other (business, health, misc.)"]
    assert all(len(mmlu_groups(s)["categories"]) == 1 for s in MMLU_SUBJECTS)
    assert mmlu_groups("abstract_algebra") == {"subcategories": ["math"], "categories": ["STEM"]}
    assert mmlu_groups("professional_accounting")["categories"] == ["other (business, health, misc.)"]

    assert len(CEVAL_SUBJECTS) == 52
    counts = {c: sum(v[2] == c for v in CEVAL_SUBJECTS.values()) for c in CEVAL_CATEGORIES}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert len(CEVAL_HARD) == 8 and set(CEVAL_HARD) <= set(CEVAL_SUBJECTS)
    assert all(CEVAL_SUBJECTS[s][2] == "STEM" for s in CEVAL_HARD)
    assert ceval_groups("college_physics") == {"categories": ["STEM"], "subsets": ["Hard"]}
    assert ceval_groups("law") == {"categories": ["Humanities"], "subsets": []}
    assert CEVAL_SUBJECTS["accountant"][1] == "注册会计师"


SHOTS = [Question(0, "0", "1+1?", ("1", "2", "3", "4"), "B"),
         Question(1, "1", "Sky\r\ncolour?", ("red", "blue", "x", "y"), "B")]
ITEM = Question(0, "0", "2+2?", ("3", "4", "5", "6"), "A")


def test_mmlu_prompt_is_the_original_format():
    p = evaluate_mmlu.subject_prompts("abstract_algebra", SHOTS, [ITEM])
    assert p.prompt(0, 2) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Sky\r\ncolour?\nA. red\nB. blue\nC. x\nD. y\nAnswer: B\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert p.prompt(0, 1).endswith("Answer: B\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert p.prompt(0, 0) == ("The following are multiple choice questions (with answers) about  abstract algebra."
                              "\n\n2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert p.answer_sep == " "
    assert evaluate_mmlu.header("high_school_us_history").endswith("about  high school us history.\n\n")


def test_ceval_prompt_is_the_official_format():
    p = evaluate_zh.subject_prompts("accountant", SHOTS[:1], [ITEM])
    assert p.prompt(0, 1) == (
        "以下是中国关于注册会计师考试的单项选择题，请选出其中的正确答案。\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\n答案：")
    assert p.answer_sep == ""
