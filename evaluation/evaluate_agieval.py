"""AGIEval v1, the single-answer four-option tasks, k-shot, scored like MMLU/C-Eval (answer-letter logits).

    python evaluation/evaluate_agieval.py --model M --data_dir D --output_dir O [--shots 5] [--tasks T ...]

D holds AGIEval's {task}.jsonl files (lines {"passage", "question", "options": ["(A)...", ...], "label"}). Items
with four options and one correct letter are scored (Baichuan-7B's "four-option single-answer questions"); items
with several correct letters, other than four options (LSAT and AQuA-RAT have five) or open answers (MATH,
gaokao-mathcloze) are excluded and counted in results.json. Each task's shots are a seeded random choice of its
items (written into results.json), the rest are scored. The passage is joined to the question; a prompt is

    {header}{passage}\\n{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{X}\\n\\n   (Chinese tasks; each shot)
    ...\\nAnswer: {X}\\n\\n                                                          (English tasks)

Scores: per task, the Chinese and English tasks' averages and the average over tasks (the official language
lists of AGIEval's dataset_loader.py).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

from evaluation.data import Question, read_agieval_jsonl
from evaluation.runner import Benchmark, build_parser, main_for, seeded_files_loader
from evaluation.scoring import SubjectPrompts
from evaluation.subjects import AGIEVAL_TASKS, AGIEVAL_TASKS_SORTED, agieval_groups

HEADERS = {"Chinese": "以下是单项选择题，请选出其中的正确答案。\n\n",
           "English": "The following are multiple choice questions (with answers).\n\n"}


def subject_prompts(task: str, shots: list[Question], questions: list[Question]) -> SubjectPrompts:
    if AGIEVAL_TASKS[task] == "Chinese":
        return SubjectPrompts.build(task, HEADERS["Chinese"], shots, questions, cue="\n答案：", answer_sep="")
    return SubjectPrompts.build(task, HEADERS["English"], shots, questions, cue="\nAnswer:", answer_sep=" ")


AGIEVAL = Benchmark(
    name="agieval",
    subjects=AGIEVAL_TASKS_SORTED,
    splits=("test",),
    read=lambda path, need_answer: read_agieval_jsonl(path)[0],
    prompts=subject_prompts,
    groups_of=agieval_groups,
    order={"languages": ["Chinese", "English"]},
    headline="macro",
    file_name=lambda task, split: f"{task}.jsonl",
    layout="AGIEval's {task}.jsonl files",
    load=seeded_files_loader("AGIEval", AGIEVAL_TASKS_SORTED, lambda t: f"{t}.jsonl", read_agieval_jsonl),
    seeded=True,
)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(AGIEVAL, "python -m evaluation.evaluate_agieval",
                          "AGIEval single-answer four-option tasks, few-shot, scored like MMLU/C-Eval.",
                          ["--shot", "--ntrain", "-k"], default_split="test")
    main_for(AGIEVAL, parser, argv)


if __name__ == "__main__":
    main()
