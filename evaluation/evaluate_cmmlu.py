"""CMMLU k-shot evaluation with the prompts of the official haonan-li/CMMLU code (src/mp_utils.py).

    python -m evaluation.evaluate_cmmlu --model M --data_dir D --output_dir O [--num_few_shot 5] [--subjects S ...]

D holds dev/{subject}.csv and test/{subject}.csv with a header `,Question,A,B,C,D,Answer` (the first column is a
row number). A prompt is

    以下是关于{Chinese subject name}的单项选择题，请直接给出正确答案的选项。\\n\\n
    题目：{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：{X}\\n\\n        (each shot: the first k dev rows)
    题目：{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：

and the prediction is the argmax of the next-token logits of the letters as tokenized right after "答案是：". Too
long prompts follow the official gen_prompt: with L(x) the token count of x encoded on its own (BOS included where
the tokenizer adds one), when L(header) + L(question) > max_length the question is scored alone, without header or
shots; otherwise, while the shots' L sum to max_length - L(header) - L(question) or more, every shot of the longest
L is removed. Scores: per subject, per category (STEM, Humanities, Social Science, Other, China specific: the
average over the category's subjects) and overall (the average over subjects), as the official get_results.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)


import numpy as np

from evaluation.runner import Benchmark, build_parser, main_for
from evaluation.data import LETTERS, Question, read_cmmlu_csv
from evaluation.scoring import Request, SubjectPrompts, answer_letter_ids
from evaluation.subjects import CMMLU_CATEGORIES, CMMLU_SUBJECTS, CMMLU_SUBJECTS_SORTED, cmmlu_groups


def header(subject: str) -> str:
    return f"以下是关于{CMMLU_SUBJECTS[subject][0]}的单项选择题，请直接给出正确答案的选项。\n\n"


def format_example(q: Question, include_answer: bool) -> str:
    """The official format_example: 题目：question, the lettered choices, 答案是：, and for a shot the letter and a
    blank line."""
    text = "题目：" + q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\n答案是："
    return (text + f"{q.answer}\n\n") if include_answer else text


def subject_prompts(subject: str, shots: list[Question], questions: list[Question]) -> SubjectPrompts:
    return SubjectPrompts(subject, header(subject), [format_example(q, True) for q in shots],
                          [format_example(q, False) for q in questions], answer_sep="")


def fit_shots(header_len: int, item_len: int, shot_lens: list[int], max_length: int) -> list[int] | None:
    """Indices of the shots the official gen_prompt keeps, or None when it drops the header too (the question alone).

    Lengths are of each piece encoded on its own. Shots of the longest length are removed together (ties
    included) while the kept ones sum to max_length - header_len - item_len or more (>=, as the original).
    """
    start_end = header_len + item_len
    if start_end > max_length:
        return None
    kept = list(range(len(shot_lens)))
    while kept and sum(shot_lens[j] for j in kept) >= max_length - start_end:
        longest = max(shot_lens[j] for j in kept)
        kept = [j for j in kept if shot_lens[j] != longest]
    return kept


def build_cmmlu_requests(tokenizer, prompts: SubjectPrompts, max_length: int, bos: bool) -> list[Request]:
    """Tokenize each question's prompt with the shots the official rule keeps. A prompt that still exceeds
    max_length (the question alone, too long) keeps its last max_length tokens; both count as truncated."""
    if not prompts.items:
        return []
    full = prompts.header + "".join(prompts.shots)
    choice_ids = answer_letter_ids(tokenizer, full + prompts.items[0], prompts.answer_sep, bos)
    header_len = len(tokenizer.encode(prompts.header, bos=bos))
    shot_lens = [len(ids) for ids in tokenizer.encode_batch(prompts.shots, bos=bos)]
    item_lens = [len(ids) for ids in tokenizer.encode_batch(prompts.items, bos=bos)]
    kept_of = [fit_shots(header_len, n, shot_lens, max_length) for n in item_lens]
    texts = [item if kept is None else prompts.header + "".join(prompts.shots[j] for j in kept) + item
             for item, kept in zip(prompts.items, kept_of)]
    requests = []
    for i, (tokens, kept) in enumerate(zip(tokenizer.encode_batch(texts, bos=bos), kept_of)):
        truncated = kept is None or len(tokens) > max_length
        tokens = tokens[-max_length:]
        requests.append(Request(prompts.subject, i, np.asarray(tokens, dtype=np.int64), len(kept or []),
                                truncated, choice_ids))
    return requests


CMMLU = Benchmark(
    name="cmmlu",
    subjects=CMMLU_SUBJECTS_SORTED,
    splits=("test", "dev"),
    read=lambda path, need_answer: read_cmmlu_csv(path),
    prompts=subject_prompts,
    groups_of=cmmlu_groups,
    order={"categories": list(CMMLU_CATEGORIES)},
    headline="macro",
    file_name=lambda subject, split: f"{subject}.csv",
    layout="dev/ and test/",
    build_requests=build_cmmlu_requests,
)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(CMMLU, "python -m evaluation.evaluate_cmmlu", "CMMLU few-shot evaluation (official haonan-li/CMMLU prompts and scoring).",
                          ["--num_few_shot", "--shot", "--ntrain", "-k"], default_split="test")
    main_for(CMMLU, parser, argv)


if __name__ == "__main__":
    main()
