"""MMLU k-shot evaluation with the prompts of Hendrycks' original evaluate.py.

    python -m evaluation.evaluate_mmlu --model M --data_dir D --output_dir O [--split test] [--ntrain 5]

D holds {dev,val,test}/{subject}_{split}.csv without a header (question,A,B,C,D,answer). The prediction is the
argmax of the next-token logits of " A", " B", " C", " D" after "Answer:"; the score is the question-weighted
accuracy over the 57 subjects (plus the subject average), with 17 subcategories and 4 categories.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

from evaluation.runner import Benchmark, build_parser, main_for
from evaluation.data import Question, read_mmlu_csv
from evaluation.scoring import SubjectPrompts
from evaluation.subjects import MMLU_CATEGORIES, MMLU_SUBJECTS, mmlu_groups


def format_subject(subject: str) -> str:
    """'abstract_algebra' -> ' abstract algebra' (each word after a space, as the original does)."""
    return "".join(" " + word for word in subject.split("_"))


def header(subject: str) -> str:
    # The format string adds a space before format_subject's own: "about  abstract algebra." as in the original.
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def subject_prompts(subject: str, shots: list[Question], questions: list[Question]) -> SubjectPrompts:
    return SubjectPrompts.build(subject, header(subject), shots, questions, cue="\nAnswer:", answer_sep=" ")


def _subcategory_order() -> list[str]:
    return [sub for subs in MMLU_CATEGORIES.values() for sub in subs]


MMLU = Benchmark(
    name="mmlu",
    subjects=MMLU_SUBJECTS,
    splits=("test", "val"),
    read=lambda path, need_answer: read_mmlu_csv(path),
    prompts=subject_prompts,
    groups_of=mmlu_groups,
    order={"subcategories": _subcategory_order(), "categories": list(MMLU_CATEGORIES)},
    headline="weighted",
)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(MMLU, "python -m evaluation.evaluate_mmlu",
                          "MMLU few-shot evaluation (Hendrycks et al. prompts and scoring).",
                          ["--ntrain", "-k"], default_split="test")
    main_for(MMLU, parser, argv)


if __name__ == "__main__":
    main()
