"""C-Eval k-shot evaluation with the prompts of the official hkust-nlp/ceval code.

    python -m evaluation.evaluate_zh --model M --data_dir D --output_dir O [--split val|test] [--shot 5]

D holds {dev,val,test}/{subject}_{split}.csv with a header (id,question,A,B,C,D[,answer[,explanation]]). The
prediction is the argmax of the next-token logits of the letters as tokenized right after "答案：" (not of "A"
encoded alone, the bug of Baichuan-7B's script). The score is the average over subjects, as on the C-Eval
leaderboard, per category, overall and for C-Eval Hard. The test split has no answers: its predictions go to
submission_test.json in the official {subject: {id: letter}} form.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

from evaluation.runner import Benchmark, build_parser, main_for
from evaluation.data import Question, read_ceval_csv
from evaluation.scoring import SubjectPrompts
from evaluation.subjects import CEVAL_CATEGORIES, CEVAL_SUBJECTS, CEVAL_SUBJECTS_SORTED, ceval_groups


def header(subject: str) -> str:
    return f"以下是中国关于{CEVAL_SUBJECTS[subject][1]}考试的单项选择题，请选出其中的正确答案。\n\n"


def subject_prompts(subject: str, shots: list[Question], questions: list[Question]) -> SubjectPrompts:
    return SubjectPrompts.build(subject, header(subject), shots, questions, cue="\n答案：", answer_sep="")


CEVAL = Benchmark(
    name="ceval",
    subjects=CEVAL_SUBJECTS_SORTED,
    splits=("val", "test"),
    read=read_ceval_csv,
    prompts=subject_prompts,
    groups_of=ceval_groups,
    order={"categories": CEVAL_CATEGORIES, "subsets": ["Hard"]},
    headline="macro",
    submission=True,
)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(CEVAL, "python -m evaluation.evaluate_zh",
                          "C-Eval few-shot evaluation (official hkust-nlp/ceval prompts).",
                          ["--shot", "--ntrain", "-k"], default_split="val")
    main_for(CEVAL, parser, argv)


if __name__ == "__main__":
    main()
