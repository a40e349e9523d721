"""GSM8K, k-shot chain of thought by greedy generation (XVERSE-13B reports 4-shot).

    python evaluation/evaluate_gsm8k.py --model M --data_dir D --output_dir O [--shots 4] [--limit N]
    python evaluation/evaluate_gsm8k.py --samples replies.jsonl --data_dir D --output_dir O

D holds test.jsonl (and train.jsonl for the shots): lines {"question", "answer"}, the answer ending in
`#### NUMBER`. The shots are a seeded random choice of train.jsonl items (written into results.json), their worked
answers with the <<calculator>> notes removed and the final line written "The answer is N.". A prompt is

    Question: {question}\\nAnswer: {reasoning} The answer is {N}.\\n\\n      (each shot)
    Question: {question}\\nAnswer:

Replies are generated greedily in batches with the KV cache and cut at the next "Question:" (or a blank line
followed by one). The predicted answer is the number after "The answer is" or "####", else the last number in
the reply; it is compared with the reference as a number (commas and "$" stripped). --samples scores replies
given as JSONL lines {"index": row of test.jsonl (optional; else file order), "reply": text}.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a file: see evaluation/_bootstrap.py
    import _bootstrap
    _bootstrap.run_as_module(__file__)

import argparse
import random
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from common import cli
from common.errors import MissingFileError, UserError
from common.io import check_output_dir
from evaluation.data import field, read_jsonl
from evaluation.decoding import generate_until
from evaluation.gen_runner import build_parser, check_args
from evaluation.report import write_outputs
from evaluation.runner import model_settings, open_from_args

STOPS = ("Question:", "\n\n\n")
NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"(?:The answer is|####)\s*:?\s*(" + NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(NUMBER)
_CALC = re.compile(r"<<[^>]*>>")


def to_number(text: str) -> Decimal | None:
    """'$1,234.50' -> Decimal('1234.50'); None when it is not a number."""
    clean = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Decimal(clean)
    except InvalidOperation:
        return None


def extract_answer(reply: str) -> str | None:
    """The number after the first "The answer is" / "####", else the last number in the reply, else None."""
    m = _ANSWER_IS.search(reply)
    if m:
        return m.group(1).strip()
    numbers = _ANY_NUMBER.findall(reply)
    return numbers[-1].strip() if numbers else None


def same_number(predicted: str | None, reference: str) -> bool:
    a, b = (to_number(predicted) if predicted is not None else None), to_number(reference)
    return a is not None and b is not None and a == b


def read_gsm8k(path: Path) -> list[tuple[str, str, str]]:
    """(question, worked answer without the final line, reference number) of each line of a GSM8K file."""
    rows = []
    for line_no, obj in read_jsonl(path):
        where = f"line {line_no}"
        question = field(path, where, obj, "question", str)
        answer = field(path, where, obj, "answer", str)
        if "####" not in answer:
            raise UserError(f"{path}, {where}: field 'answer' has no '#### NUMBER' final answer")
        reasoning, final = answer.rsplit("####", 1)
        if to_number(final.strip()) is None:
            raise UserError(f"{path}, {where}: field 'answer' ends in {final.strip()!r}, not a number")
        rows.append((question.strip(), reasoning.strip(), final.strip().replace(",", "")))
    if not rows:
        raise UserError(f"{path}: no questions in file")
    return rows


def shot_text(question: str, reasoning: str, number: str) -> str:
    steps = " ".join(line.strip() for line in _CALC.sub("", reasoning).splitlines() if line.strip())
    return f"Question: {question}\nAnswer: {steps} The answer is {number}.\n\n"


def item_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def pick_shots(train: list[tuple[str, str, str]], shots: int, seed: int) -> list[int]:
    order = list(range(len(train)))
    random.Random(f"{seed}:gsm8k").shuffle(order)
    return order[:shots]


def read_samples(path: Path, count: int) -> list[str]:
    """Replies of a --samples file: lines {"reply", "index" (optional)}, one per test question."""
    replies: list[str | None] = [None] * count
    for n, (line_no, obj) in enumerate(read_jsonl(path)):
        where = f"line {line_no}"
        reply = field(path, where, obj, "reply", str)
        index = field(path, where, obj, "index", int, optional=True)
        index = n if index is None else index
        if not 0 <= index < count:
            raise UserError(f"{path}, {where}: index {index} is outside the {count} questions evaluated")
        if replies[index] is not None:
            raise UserError(f"{path}, {where}: a second reply for index {index}")
        replies[index] = reply
    absent = [i for i, r in enumerate(replies) if r is None]
    if absent:
        raise UserError(f"{path}: no reply for {len(absent)} of the {count} questions (first: index {absent[0]})")
    return replies  # type: ignore[return-value]


def build_prompts(tokenizer, bos: bool, shots: list[str], items: list[str], room: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each prompt and the shots it kept: shots are dropped from the end while it is longer than
    `room` tokens (as the other evaluators do); a question still too long keeps its last `room` tokens."""
    prompts, kept = [], []
    full = tokenizer.encode_batch(["".join(shots) + item for item in items], bos=bos)
    for item, ids in zip(items, full):
        k = len(shots)
        while len(ids) > room and k > 0:
            k -= 1
            ids = tokenizer.encode("".join(shots[:k]) + item, bos=bos)
        prompts.append(ids[-room:])
        kept.append(k)
    return prompts, kept


def run(args: argparse.Namespace, model=None) -> dict[str, Any]:
    """Evaluate (generate or read --samples), write the outputs, print the score; returns results.json's content."""
    start = time.perf_counter()
    check_args(args)
    if args.shots < 0:
        raise UserError(f"--shots must be >= 0, got {args.shots}")
    check_output_dir(args.output_dir, args.overwrite)
    data_dir = Path(args.data_dir)
    test_path = data_dir / "test.jsonl"
    if not test_path.is_file():
        raise MissingFileError(f"{test_path}: GSM8K test file not found; --data_dir must hold test.jsonl "
                               "(and train.jsonl for the shots)")
    all_test = read_gsm8k(test_path)
    test = all_test[:args.limit]
    settings: dict[str, Any] = {"seed": args.seed}
    shot_ids: list[int] = []
    if args.samples:
        replies = read_samples(Path(args.samples), len(test))
        kept = [None] * len(test)
        settings["samples"] = str(Path(args.samples).resolve())
    else:
        shots: list[str] = []
        if args.shots:
            train_path = data_dir / "train.jsonl"
            if not train_path.is_file():
                raise MissingFileError(f"{train_path}: GSM8K train file not found; the shots come from it "
                                       "(or pass --shots 0)")
            train = read_gsm8k(train_path)
            shot_ids = pick_shots(train, args.shots, args.seed)
            shots = [shot_text(*train[i]) for i in shot_ids]
        loaded, device, dtype = model or open_from_args(args)
        max_new = args.max_new_tokens or 256
        max_length = args.max_length or loaded.max_len
        room = min(max_length, loaded.max_len) - max_new
        if room < 1:
            raise UserError(f"--max_new_tokens {max_new} leaves no room for a prompt in {max_length} tokens")
        prompts, kept = build_prompts(loaded.tokenizer, loaded.bos, shots, [item_text(q) for q, _, _ in test], room)
        dropped = sum(k < len(shots) for k in kept)
        if dropped:
            print(f"warning: gsm8k: {dropped} of {len(test)} prompts dropped shots to fit {room} tokens (as few as "
                  f"{min(kept)} of {len(shots)})", file=sys.stderr)
        gen_start = time.perf_counter()
        outs = generate_until(loaded, prompts, max_new, STOPS, args.batch_size, desc="gsm8k")
        replies = [o["text"] for o in outs]
        settings.update(model_settings(args, loaded, device, dtype), max_new_tokens=max_new, max_length=max_length,
                        batch_size=args.batch_size, stops=list(STOPS), shot_train_rows=shot_ids,
                        generation_seconds=round(time.perf_counter() - gen_start, 3))
    predictions = []
    for n, ((question, _, reference), reply) in enumerate(zip(test, replies)):
        predicted = extract_answer(reply)
        predictions.append({"index": n, "reply": reply, "predicted": predicted, "answer": reference,
                            "correct": same_number(predicted, reference), "shots": kept[n]})
    correct = sum(p["correct"] for p in predictions)
    results: dict[str, Any] = {
        "benchmark": "gsm8k", "split": "test", "shots": args.shots if not args.samples else None,
        "shots_dropped": sum(1 for k in kept if k is not None and k < args.shots),
        "accuracy": 100.0 * correct / len(test), "correct": correct, "count": len(test),
        "complete": len(test) == len(all_test),
        "settings": {**settings, "total_seconds": round(time.perf_counter() - start, 3)},
    }
    write_outputs(Path(args.output_dir), results, predictions)
    print(f"gsm8k: {correct}/{len(test)} correct, accuracy {results['accuracy']:.2f}%; wrote "
          f"{Path(args.output_dir) / 'results.json'}")
    return results


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m evaluation.evaluate_gsm8k", "GSM8K k-shot chain of thought by greedy generation.",
                     "folder holding GSM8K's test.jsonl and train.jsonl")
    p.add_argument("--shots", "--shot", "-k", dest="shots", type=int, default=4,
                   help="worked examples from train.jsonl in the prompt")
    p.add_argument("--seed", type=int, default=1234, help="seed of the choice of shots (written into results.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cli.run_main(run, args)


if __name__ == "__main__":
    main()
