"""GAOKAO-Bench objective questions, k-shot, scored like MMLU/C-Eval (answer-letter logits after the cue).

    python evaluation/evaluate_gaokao.py --model M --data_dir D --output_dir O [--shots 5] [--seed 1234]

D holds GAOKAO-Bench's objective files ({years}_{subject}.json, {"example": [{"question", "answer": [..]}]}). Only
single-answer items whose question text holds options A-D are scored (Baichuan-7B's "single-choice questions
only"); multi-answer and multi-blank items are excluded and counted in results.json. Each file's shots are a
seeded random choice of its items (written into results.json; the same on every run), the rest are scored. A
prompt is

    以下是中国高考{科目}单项选择题，请选出其中的正确答案。\\n\\n
    {question with its options}\\n答案：{X}\\n\\n     (each shot)
    {question with its options}\\n答案：

Scores: per file, GAOKAO-English (2010-2013_English_MCQs), the other subjects, and the average over files.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

from evaluation.data import Question, read_gaokao_json
from evaluation.runner import Benchmark, build_parser, main_for, seeded_files_loader
from evaluation.scoring import SubjectPrompts
from evaluation.subjects import GAOKAO_GROUPS, GAOKAO_SUBJECTS, gaokao_groups

CUE = "\n答案："


def header(subject: str) -> str:
    return f"以下是中国高考{GAOKAO_SUBJECTS[subject][0]}单项选择题，请选出其中的正确答案。\n\n"


def subject_prompts(subject: str, shots: list[Question], questions: list[Question]) -> SubjectPrompts:
    # The options are inside the question text, as the files write them.
    return SubjectPrompts(subject, header(subject), [f"{q.question}{CUE}{q.answer}\n\n" for q in shots],
                          [q.question + CUE for q in questions], answer_sep="")


GAOKAO = Benchmark(
    name="gaokao",
    subjects=list(GAOKAO_SUBJECTS),
    splits=("test",),
    read=lambda path, need_answer: read_gaokao_json(path)[0],
    prompts=subject_prompts,
    groups_of=gaokao_groups,
    order={"groups": GAOKAO_GROUPS},
    headline="macro",
    file_name=lambda subject, split: f"{subject}.json",
    layout="the GAOKAO-Bench objective files ({years}_{subject}.json)",
    load=seeded_files_loader("GAOKAO-Bench", list(GAOKAO_SUBJECTS), lambda s: f"{s}.json", read_gaokao_json),
    seeded=True,
)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(GAOKAO, "python -m evaluation.evaluate_gaokao",
                          "GAOKAO-Bench single-answer objective questions, few-shot, scored like MMLU/C-Eval.",
                          ["--shot", "--ntrain", "-k"], default_split="test")
    main_for(GAOKAO, parser, argv)


if __name__ == "__main__":
    main()
